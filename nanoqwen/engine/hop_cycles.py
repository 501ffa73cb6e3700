"""A JSON Schema's `$ref` hops (object_runs' is_hop: bare `$ref`s) that name each other in a cycle: llguidance compiles
each as its target, so the cycle is a rule with nothing to match. Where a value must be one (the root, a required
property, an item of a minItems, every option of an `anyOf`) llguidance still compiled the grammar, and the answer
failed at its first token (the root: NoExtensionBias) or where the value begins (`{"x": `, past the 200). Which places
must hold a value is llguidance's own rule: a copy of the schema with each such hop `false` is checked by it, which
drops an optional place (a property not required, an option beside others) and refuses a place that must hold one
(`Unsatisfiable schema: required property 'x' is unsatisfiable`: profiles/RESULTS.md, lane fuzz41fix). An optional
place llguidance still offered (`{"x": `, then nothing could follow: the answer failed there); that copy is what is
compiled instead (cut_hops, before the schema is weighed), which never offers it."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llguidance import LLMatcher

from nanoqwen.engine.object_runs import is_hop
from nanoqwen.engine.schema_keywords import pointed

if TYPE_CHECKING:
    from nanoqwen.engine.grammar_rows import SchemaLinks

Path = tuple[str, ...]


class HopCycle(ValueError):
    """A schema whose hop cycle (hop_cycle's) is where a value must be: nothing matches it."""


def cut_hops(schema: Any, links: SchemaLinks, as_sent: bool = False) -> Any:
    """The schema a JSON Schema's own grammar is to hold: `schema` itself where its hops form no cycle (hop_cycle's), or
    where llguidance refuses it as sent for another want of a value (its own 400 says why); where the cycle is only
    where a value may be absent, its copy with each hop of the cycle `false` (the answer still matches the schema as
    sent). HopCycle where the cycle is where a value must be, or, `as_sent` (a Lark grammar's `%json`, compiled as
    sent: the cycle's place would be offered and then fail), wherever it is. `links`: schema_links' walk of it."""
    cycle = hop_cycle(schema, links.refs, {id(node) for node, _ in links.in_data})
    if not cycle:
        return schema
    copy = _with_false(schema, cycle)
    error = _unsatisfiable(copy)
    where = ", ".join("#" + "".join(f"/{part}" for part in path) for path in cycle)
    said = f"the schema's bare `$ref`s at {where} lead only to one another, a cycle that nothing matches, where a value"
    if error and not _unsatisfiable(schema):
        raise HopCycle(f"{said} must be one (read as `false`: {error})")
    if as_sent and not error:
        raise HopCycle(f"{said} may be absent: as a grammar's %json it would be offered and then fail; send the schema "
                       "itself (response_format, guided_json) or leave the cycle out")
    return schema if error else copy


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


def _with_false(schema: Any, cycle: list[Path]) -> Any:
    """`schema` with each hop of `cycle` `false`: the objects and lists on the way to each copied, all else shared with
    `schema` (neither is changed after), where a copy of it whole cost a second parse of its JSON."""
    if () in cycle:
        return False
    made: set[int] = set()  # the ids of the copies made (kept alive by `top`)

    def fresh(node: Any) -> Any:
        copy = dict(node) if isinstance(node, dict) else list(node)
        made.add(id(copy))
        return copy

    top = fresh(schema)
    for *way, last in cycle:  # sorted: a hop before those in its own `$defs`, which its `false` then holds
        node = top
        for part in way:
            key = int(part) if isinstance(node, list) else part
            if node[key] is False:
                break
            if id(node[key]) not in made:
                node[key] = fresh(node[key])
            node = node[key]
        else:
            node[int(last) if isinstance(node, list) else last] = False
    return top


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
