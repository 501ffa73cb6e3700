"""A short run of profiles/fuzz_schemas.py through the shared gunicorn server: random strict JSON Schemas' ended
answers validate (`jsonschema`), a keyword the engine cannot enforce put in one is a 400 naming it, random regexes'
answers match, each bound's grammar a 400 naming the field, and /health held no longer than HELD_S meanwhile; and a
short seed of its `--weigh` mode (no server): the row weighing's domain weighed as llguidance follows it."""
from __future__ import annotations

import random
import sys

import pytest

from chat_http import HELD_S, health_polled, most_held
from nanoqwen.engine import grammar, grammar_rows
from schema_shapes import ALIKE
from server_process import REPO_ROOT, GunicornServer

sys.path.insert(0, str(REPO_ROOT / "profiles"))
from fuzz_schemas import Fuzz, Weighing, shrunk  # noqa: E402


def test_fuzzed_schemas_and_regexes_are_followed_or_refused_naming_the_keyword(server: GunicornServer) -> None:
    fuzz = Fuzz(server, random.Random(3))
    with health_polled(server, 0.01) as polls:
        fuzz.bounds()
        fuzz.schemas(6)
        fuzz.regexes(3)
    assert not fuzz.failures
    assert fuzz.passed >= 5 + 6 + 2  # each bound, each schema's refused keyword, answers that ended
    assert max(p.held for p in polls) <= HELD_S, most_held(polls)


def test_min_properties_beside_optional_properties_is_followed_or_refused_naming_it(server: GunicornServer) -> None:
    """llguidance refuses some objects that bound their count of properties where not all are required (a 400 naming
    min/maxProperties, as README has an invalid schema): fuzz_schemas' generator makes such objects (seed 38 did),
    and the refusal is not a failure; it is one where every property is required."""
    fuzz = Fuzz(server, random.Random(38))
    optional = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}}, "required": [],
                "additionalProperties": False, "minProperties": 2}
    fuzz.schema(optional)
    assert not fuzz.failures
    assert fuzz.optional_counted == 1
    fuzz.schema({**optional, "required": ["a", "b"]})
    assert not fuzz.failures and fuzz.optional_counted == 1


@pytest.fixture(scope="module")
def weighing() -> Weighing:
    return Weighing(random.Random(3), slow_s=float("inf"), instances=3, walks=1)


def test_weighed_schemas_are_served_where_llguidance_follows_them_and_refused_where_it_fails(
        weighing: Weighing) -> None:
    """A seed of the weighing's domain that makes schemas served and refused for their row: none served past
    llguidance's row (its instances' or a steered walk's), none refused that llguidance holds within MAX_ROW (the CPU
    time is the profile's to judge)."""
    weighing.run(3)  # its draws: 1 refused for its row (the costly one), 1 served
    assert not weighing.under and not weighing.over
    assert weighing.counts["served"] >= 1 and weighing.counts["refused"] >= 1


@pytest.mark.parametrize("links", [240, 80])
def test_a_steered_walk_reads_the_row_where_options_go_on_alike_a_level_down(weighing: Weighing, links: int) -> None:
    """5 options `{"x": {"y": chain j}}`: llguidance's row after `{"x": {"y": ` holds every chain (2,405 items at
    240 links, past its 2,000; 805 at 80). The walk, steered by the rows it reads, goes there and reads it."""
    schema = ALIKE["objects' objects"].schema(5, links)
    row, typed = weighing.steered(schema, grammar._json_grammar(schema, True, "p"), random.Random(0))
    assert 5 * (2 * links + 1) <= row <= 5 * (2 * links + 1) + 30, typed


def test_the_shrinker_cuts_a_schema_down_while_it_holds() -> None:
    """5 options of chains of 120 links, weighed past MAX_ROW (1,205): the shrinker halves chains while the weight
    stays past it, to a smaller schema that still is."""
    def past(schema: dict) -> bool:
        return grammar_rows.schema_weight(schema) > grammar.MAX_ROW

    schema = ALIKE["objects' one property"].schema(5, 120)
    small = shrunk(schema, past, 2)
    assert past(small)
    assert len(small["$defs"]) < len(schema["$defs"]) - 60
