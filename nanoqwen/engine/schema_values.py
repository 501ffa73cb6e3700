"""The weight of a JSON Schema's `const` and `enum` values: the grammar symbols llguidance 1.9.1 compiles them into,
about 4 an object's key (and its value's), 1 an array's item or a scalar in an object or array; none a scalar const or
enum item, which is a lexeme (an enum of 12,000 strings or integers added none; the lexer's fuel bounds them). The
panic's bounds are below (profiles/RESULTS.md, lane surface32fix3)."""
from __future__ import annotations

from typing import Any

# A request's schemas' const and enum values in all, weighed so: llguidance panics past u16::MAX symbols in one grammar
# (a lone object const of 17,000 keys, an array const of 80,000 items, an enum of 700 arrays of 101 items; a 400
# quoting its assertion) and, compiling an object const of 30,000 keys on an 8 MB stack, overflows it: the process
# dies (rc 139). A quarter of u16::MAX: the rest of the schema (its properties, rules and lexemes) has its own symbols.
MAX_VALUES = 16_000
KEY_WEIGHT = 3  # an object's key, besides its value's own


def values_weight(node: dict[str, Any], limit: int) -> int:
    """The weight of the schema object's own `const` value and `enum` items that are objects or arrays, counted no
    further than past `limit` (the walk's work bounded by what is left of MAX_VALUES, not by the values' size)."""
    weight = 0
    given = [node["const"]] if "const" in node else []
    given += node["enum"] if isinstance(node.get("enum"), list) else []
    stack = [value for value in given if isinstance(value, (dict, list))]  # a scalar alone is a lexeme, no symbol
    while stack and weight <= limit:
        value = stack.pop()
        weight += 1
        if isinstance(value, dict):
            weight += KEY_WEIGHT * len(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return weight
