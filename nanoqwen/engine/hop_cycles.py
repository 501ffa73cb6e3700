"""A JSON Schema's `$ref` hops (object_runs' is_hop: bare `$ref`s) that name each other in a cycle: llguidance compiles
each as its target, so the cycle is a rule with nothing to match. Where a value must be one (the root, a required
property, an item of a minItems, every option of an `anyOf`) llguidance still compiled the grammar, and the answer
failed at its first token (the root: NoExtensionBias) or where the value begins (`{"x": `, past the 200). Which places
must hold a value is llguidance's own rule: a copy of the schema with each such hop `false` is checked by it, which
drops an optional place (a property not required, an option beside others) and refuses a place that must hold one
(`Unsatisfiable schema: required property 'x' is unsatisfiable`: profiles/RESULTS.md, lane fuzz41fix). An optional
place llguidance still offered (`{"x": `, then nothing could follow: the answer failed there); that copy is what is
compiled instead (HopsCut), which never offers it."""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from llguidance import LLMatcher

from nanoqwen.engine.object_runs import is_hop
from nanoqwen.engine.schema_keywords import pointed, pointer_way

Path = tuple[str, ...]


class HopCycle(ValueError):
    """A schema whose hop cycle (hop_cycle's) is where a value must be: nothing matches it."""


class HopsCut(Exception):  # noqa: N818 (a signal, not an error)
    """A schema whose hop cycle (hop_cycle's) is only where a value may be absent: `schema`, its copy with each hop of
    the cycle `false`, is what to compile (the answer still matches the schema as sent)."""

    def __init__(self, schema: Any) -> None:
        super().__init__("a cycle of bare `$ref`s where a value may be absent")
        self.schema = schema


def hop_cycle(schema: Any, refs: Iterable[tuple[Path, Path]], in_data: set[int]) -> list[Path]:
    """The paths of the hops in a cycle of them or leading into one, sorted, of `refs` (each resolved `$ref`: where it
    is, where it points; schema_links'); none where there is no such cycle. Those in data (`in_data`: the ids of data
    objects a `$ref` reads as schemas, schema_links') are left out: cut, they would change what a const or an enum
    holds; the hops in the schema that lead into them are cut instead."""
    hops = {path: target for path, target in refs if is_hop(pointed(schema, path))}
    ended: set[Path] = set()  # hops whose chain leaves the hops (to a node of its own, or nowhere)
    cycled: dict[Path, None] = {}
    for start in hops:
        chain: dict[Path, None] = {}
        at = start
        while at in hops and at not in ended and at not in cycled and at not in chain:
            chain[at] = None
            at = hops[at]
        (cycled if at in cycled or at in chain else ended).update(dict.fromkeys(chain))
    return sorted(path for path in cycled if id(pointed(schema, path)) not in in_data)


def check_satisfiable(schema: Any, cycle: list[Path]) -> None:
    """HopCycle where llguidance refuses the schema with each hop of `cycle` (hop_cycle's) `false`, for want of a
    value that must be (where it refuses the schema as sent so, its own check's 400 says why); else HopsCut with that
    copy."""
    copy = json.loads(json.dumps(schema))
    for path in cycle:
        if not path:
            copy = False
            break
        parent = (pointer_way(copy, path[:-1]) or [copy])[-1]  # the root's way is empty
        parent[int(path[-1]) if isinstance(parent, list) else path[-1]] = False
    error = _unsatisfiable(copy)
    if error and not _unsatisfiable(schema):
        where = ", ".join("#" + "".join(f"/{part}" for part in path) for path in cycle)
        raise HopCycle(f"the schema's bare `$ref`s at {where} lead only to one another, a cycle that nothing matches, "
                       f"where a value must be one (read as `false`: {error})")
    if not error:
        raise HopsCut(copy)


def _unsatisfiable(schema: Any) -> str:
    """llguidance's refusal of `schema` (lenient: its unknown keywords aside) for want of a value, else ""."""
    if isinstance(schema, dict):
        options = schema.get("x-guidance")
        schema = {**schema, "x-guidance": {**(options if isinstance(options, dict) else {}), "lenient": True}}
    try:
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except ValueError:
        return ""
    return error.splitlines()[0] if "Unsatisfiable schema" in error else ""
