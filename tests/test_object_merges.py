"""A structured request's schema objects merged once: the pattern rewrite's checks (ecma_patterns) and the weighing
(check_json_schema's AlikeChains) share one object_runs.Merges, each walk charged its own work as if it had merged
alone."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from nanoqwen.api.schema_patterns import ecma_patterns
from nanoqwen.engine import object_runs
from nanoqwen.engine.call_arguments import call_arguments
from nanoqwen.engine.grammar import check_json_schema
from nanoqwen.engine.grammar_rows import schema_weight
from nanoqwen.engine.object_runs import Merged, Merges, SchemaObjects, TooLarge
from nanoqwen.engine.schema_keywords import schema_objects
from schema_shapes import chain_defs

T = {"$ref": "#/$defs/t"}
# options that go on alike (AlikeChains merges each), `$ref`s among their parts, no `type` at the root (a tool's
# parameters call_arguments wraps)
OPTIONS: dict[str, Any] = {
    "anyOf": [{"type": "object", "properties": {"x": T, **{f"p{j}": {"anyOf": [T, {"type": "null"}]}
                                                            for j in range(i)}}} for i in range(4)]
    + [{"allOf": [{"$ref": "#/$defs/o"}], "properties": {"y": T}}],
    "$defs": {"t": {"type": "integer"}, "o": {"type": "object", "properties": {"x": {"type": "string"}}}},
}


@pytest.mark.parametrize("wrap", [lambda schema: schema, call_arguments], ids=["answer", "tool"])
def test_the_weighing_merges_no_object_the_rewrites_checks_merged(wrap: Callable[[Any], Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer's schema, and a tool's wrapped by call_arguments (a new root, its objects the same): the weighing
    merges none of the objects the rewrite's checks merged again, and weighs as it does alone."""
    merges = Merges()
    out = ecma_patterns(OPTIONS, "response_format", merges=merges)
    made: list[object_runs.Merged] = []
    monkeypatch.setattr(object_runs, "Merged", lambda *args: made.append(Merged(*args)) or made[-1])
    weight = check_json_schema(wrap(out), True, "response_format", merges=merges)
    assert made == [] and len(merges.merged) >= len(OPTIONS["anyOf"])
    unshared = schema_weight(wrap(json.loads(json.dumps(out))))
    assert made and weight == unshared > 0  # merged afresh where the weighing walks alone


def _checked_until_spent(objects: SchemaObjects) -> int:
    """The objects of `objects`' root merged in turn until its work is spent (TooLarge): how many were."""
    checked = 0
    try:
        for node in schema_objects(objects.root):
            objects.merged(objects.parts(node))
            checked += 1
    except TooLarge:
        return checked
    raise AssertionError("the walk's work was never spent")


# 800 `$ref`s each beside a type (a part of its own, no object: no MAX_PARTS), each naming the next: the parts of each
# are the rest of the chain
TYPED_LINKS = {"$ref": "#/$defs/h0", "$defs": {f"h{i}": {"type": "integer", "$ref": f"#/$defs/h{i + 1}"}
                                               for i in range(800)} | {"h800": {"type": "integer"}}}


@pytest.mark.parametrize("root", [TYPED_LINKS,
                                  {"$defs": {f"o{i}": {"properties": dict.fromkeys(map(str, range(3_000)), True)}
                                             for i in range(100)}}], ids=["parts", "names"])
def test_a_walk_sharing_merges_is_charged_as_if_it_merged_alone(root: dict[str, Any]) -> None:
    """A chain of `$ref`s whose parts, or objects whose names, pass MAX_WORK: a second walk that finds every
    object already merged (the weighing after the rewrite's checks) is refused at the same object as a walk of its
    own."""
    merges = Merges()
    first = _checked_until_spent(SchemaObjects(root, merges))
    assert merges.parts and merges.merged
    assert _checked_until_spent(SchemaObjects(root, merges)) == _checked_until_spent(SchemaObjects(root)) == first > 0


@pytest.mark.parametrize("keyword", ["patternProperties", "pattern%50roperties"])
def test_a_ref_through_patterns_the_rewrite_merges_is_walked_afresh(keyword: str) -> None:
    """`\\cJ` and `\\x{0a}` made one key (`allOf` both): a `$ref` to the second key's value (`keyword` spelling its
    name map), met by the rewrite's checks before that object is rewritten, points at the two merged afterwards, as
    the weighing finds them: its option goes on alike with another after `p` (two 300-link chains), not as the
    second's `q` alone (606, served)."""
    def named(name: str, chain: str) -> dict[str, Any]:
        return {"type": "object", "properties": {name: {"$ref": f"#/$defs/{chain}0"}}}

    sent = {"properties": {"b": {"patternProperties": {"\\cJ": named("p", "c1_"), "\\x{0a}": named("q", "c2_")}},
                           "o": {"anyOf": [{"$ref": f"#/properties/b/{keyword}/%5Cx%7B0a%7D"},
                                           named("p", "c3_")]}},
            "$defs": {**chain_defs("c1_", 300), **chain_defs("c2_", 300), **chain_defs("c3_", 300)}}
    merges = Merges()
    out = ecma_patterns(sent, "response_format", merges=merges)
    assert schema_weight(out, merges) == schema_weight(json.loads(json.dumps(out))) == 1_206
