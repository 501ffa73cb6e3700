"""Where a JSON Schema's subschemas are, the one reading of its keywords that grammar_rows (its `$ref` chains, a
Lark grammar's `%json` patterns) and schema_patterns (its `pattern`s) walk: each keyword's value may hold subschemas
but a data keyword's, and a name map's keys are names (a property named `default` or `pattern` is no keyword), its
values subschemas."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

# keywords whose value is data, not a schema: a `$ref`, `$id` or `pattern` in them is a value, unless a `$ref` points
# into it (llguidance resolves a JSON pointer anywhere and reads its target as a schema: grammar_rows walks it then)
DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples"))
# keywords whose value maps names to subschemas: drafts 2019-09 and 2020-12's, and the older drafts' `definitions` and
# `dependencies` (draft 4 to 7: by property name, a subschema or a list of names; llguidance implements neither it nor
# `dependentSchemas`, a 400 where strict, but leniently its `$ref`s resolve into them)
NAME_MAPS = frozenset(("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"))


def subschemas(node: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Each value of a schema `node` that may be or hold a subschema (a list: its items), and its keys from `node`:
    (keyword,), or (keyword, name) for a name map's."""
    for key, value in node.items():
        if key in NAME_MAPS and isinstance(value, dict):
            yield from (((key, str(name)), sub) for name, sub in value.items())
        elif key not in DATA_KEYWORDS:
            yield (key,), value


def own_patterns(node: dict[str, Any]) -> list[str]:
    """The schema object's own `pattern` and `patternProperties` keys."""
    patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    if isinstance(node.get("patternProperties"), dict):
        patterns.extend(node["patternProperties"])
    return patterns


def schema_objects(schema: Any) -> Iterator[dict[str, Any]]:
    """Each schema object of `schema` and its subschemas, as a Lark grammar's `%json` holds them (no `$ref` followed).
    Iterative: the schema is as deep as a body may be."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(value for _, value in subschemas(node))


def pointer_way(schema: Any, parts: Iterable[str]) -> list[Any] | None:
    """The values a JSON pointer's (unescaped) `parts` pass through from `schema`, its target last: a dict's by key, a
    list's by index; None where one is not there."""
    way: list[Any] = []
    node = schema
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        way.append(node)
    return way


def pointer_parts(fragment: str) -> tuple[str, ...]:
    """A JSON pointer's parts (`/$defs/a~1b` -> `$defs`, `a/b`), unescaped; `` (the root) none."""
    return tuple(part.replace("~1", "/").replace("~0", "~") for part in fragment.split("/")[1:])


def local_target(ref: Any, root: Any) -> dict[str, Any] | None:
    """The subschema a local `$ref` (`#`, `#/$defs/x`) points at in `root`; None for any other (an anchor, another
    URI) or none there."""
    return pointed(root, local_pointer(ref))


def local_pointer(ref: Any) -> tuple[str, ...] | None:
    """A local `$ref`'s JSON pointer parts (pointer_parts'); None for any other `$ref`."""
    if not isinstance(ref, str) or not ref.startswith("#") or ref[1:2] not in ("", "/"):
        return None
    return pointer_parts(unquote(ref[1:]))


def pointed(root: Any, parts: tuple[str, ...] | None) -> dict[str, Any] | None:
    """The subschema at a local `$ref`'s pointer `parts` (local_pointer's) in `root`; None where there is none."""
    way = None if parts is None else pointer_way(root, parts)
    node = None if way is None else way[-1] if way else root
    return node if isinstance(node, dict) else None
