"""CPU seconds of grammar_rows.schema_weight (the weighing of a JSON Schema's rows before llguidance sees it) on the
worst shapes its `anyOf`/`oneOf` walk meets, each weighed in a fresh parse of its JSON (as a request body is); and
`served`: a request's JSON answer as structured.py checks it, the pattern rewrite's object checks (ecma_patterns) then
grammar.check_json_schema without llguidance's own check (MAX_RULES counted, a hop cycle cut, the schema weighed;
schema_weight alone takes a schema as a Lark grammar's `%json` compiles it, as sent); `checked`: that check_json_schema
alone (the served one less the pattern rewrite's copy and checks).

    python profiles/bench_schema_weight.py [--rounds 3] [--shape NAME ...]

Prints, per shape, its JSON's size, what it weighs (or the refusal's class) and the median of `time.process_time`
over the rounds, for each. To compare two trees, run this file from each in turn (it imports the tree it is in).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nanoqwen.api.schema_patterns import ecma_patterns  # noqa: E402
from nanoqwen.engine import grammar, grammar_rows  # noqa: E402
from nanoqwen.engine.object_runs import Merges  # noqa: E402
from schema_shapes import hop_chain  # noqa: E402

T = {"$ref": "#/$defs/t"}
OPTIONAL_T = {"anyOf": [T, {"type": "null"}]}


def _chain(links: int) -> dict[str, Any]:
    defs = {f"c{i}": {"anyOf": [{"$ref": f"#/$defs/c{i + 1}"}, {"type": "integer"}]} for i in range(links)}
    return {"$ref": "#/$defs/c0", "$defs": {**defs, f"c{links}": {"type": "integer"}}}


def _objects(options: int, properties: int, loose: bool = False) -> dict[str, Any]:
    objects = [{"type": "object", "properties": {f"p{i}": OPTIONAL_T for i in range(properties)},
                **({"additionalProperties": OPTIONAL_T} if loose else {})} for _ in range(options)]
    return {"anyOf": objects, "$defs": {"t": {"type": "integer"}}}


def _refs(options: int) -> dict[str, Any]:
    defs = {f"o{j}": {"type": "object", "properties": {"a": T}} for j in range(options)}
    return {"anyOf": [{"$ref": f"#/$defs/o{j}"} for j in range(options)], "$defs": {**defs, "t": {"type": "integer"}}}


def _nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        node = {"anyOf": [{"type": "object", "properties": {"x": T}}, node]}
    return {**node, "$defs": {"t": {"type": "integer"}}}


def _lists(lists: int, properties: int, distinct: bool) -> dict[str, Any]:
    big = {"type": "object", "properties": {f"p{i}": T for i in range(properties)}, "required": [f"p{i}" for i in
                                                                                               range(properties)]}
    own = [{"type": "object", "properties": {"z": T}}] if distinct else []
    return {"type": "object", "properties": {f"q{j}": {"anyOf": [{"$ref": "#/$defs/big"}, *own, {"type": "null"}]}
                                             for j in range(lists)}, "$defs": {"big": big, "t": {"type": "integer"}}}


def _hop_cycle(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (an object) with an optional property that is a cycle of bare `$ref`s: weighing it runs hop_cycles'
    check, llguidance's compile and validate of the schema as sent and of its copy with the cycle `false`."""
    defs = {**schema["$defs"], "a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}
    return {**schema, "properties": {**schema["properties"], "cycle": {"$ref": "#/$defs/a"}}, "$defs": defs}


SHAPES: dict[str, Callable[[], dict[str, Any]]] = {
    "a chain of 5,900 $ref'd anyOfs": lambda: _chain(5_900),
    "a chain of 500 bare $refs": lambda: {"$ref": "#/$defs/h0", "$defs": hop_chain(500)},
    "a chain of 5,000 bare $refs": lambda: {"$ref": "#/$defs/h0", "$defs": hop_chain(5_000)},
    "1,000 objects of 5 anyOf [$ref, null]": lambda: _objects(1_000, 5),
    "1,000 objects of 5, additionalProperties anyOf [$ref, null]": lambda: _objects(1_000, 5, loose=True),
    "2,000 $ref options": lambda: _refs(2_000),
    "200 nested anyOf levels": lambda: _nested(200),
    "300 Optional[big of 1,000]": lambda: _lists(300, 1_000, False),
    "140 Optional[big of 2,000]": lambda: _lists(140, 2_000, False),
    "600 distinct lists naming big of 2,000": lambda: _lists(600, 2_000, True),
    "140 Optional[big of 2,000], an optional hop cycle": lambda: _hop_cycle(_lists(140, 2_000, False)),
    "20 lists of 6,000 properties": lambda: _lists(20, 6_000, False),
    "20 lists of 6,000 properties, an optional hop cycle": lambda: _hop_cycle(_lists(20, 6_000, False)),
    # a large text for a cheap walk: where counting its rules (rules_bound, a pass over the text) shows
    "4,000 required properties described in 400 characters": lambda: {
        "type": "object", "properties": {f"p{i}": {"type": "integer", "description": "d" * 400} for i in range(4_000)},
        "required": [f"p{i}" for i in range(4_000)]},
}


def _served(schema: dict[str, Any]) -> int:
    merges = Merges()
    rewritten = ecma_patterns(schema, "response_format", merges=merges)
    return grammar.check_json_schema(rewritten, True, "response_format", validate=False, merges=merges)


def _checked(schema: dict[str, Any]) -> int:
    return grammar.check_json_schema(schema, True, "response_format", validate=False)


WEIGHINGS: dict[str, Callable[[dict[str, Any]], int]] = {"schema_weight": grammar_rows.schema_weight,
                                                         "served": _served, "checked": _checked}


def weighed(text: str, how: str) -> tuple[str, float]:
    schema = json.loads(text)
    started = time.process_time()
    try:
        outcome = str(WEIGHINGS[how](schema))
    except ValueError as exc:  # a refusal (ManyOptions, the walks' own bounds, a hop cycle; served: the 400's words)
        outcome = type(exc).__name__ + (f" ({str(exc).split(': ', 1)[-1][:60]}...)" if how == "served" else "")
    return outcome, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", action="append", choices=list(SHAPES))
    args = parser.parse_args()
    for name in args.shape or SHAPES:
        text = json.dumps(SHAPES[name]())
        for how in WEIGHINGS:
            runs = [weighed(text, how) for _ in range(args.rounds)]
            print(f"{name}: {len(text) / 1000:.0f} KB, {how}: {runs[0][0]}, "
                  f"{statistics.median(seconds for _, seconds in runs):.3f} s CPU")


if __name__ == "__main__":
    main()
