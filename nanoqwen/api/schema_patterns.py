"""JSON Schema's `pattern`s are ECMA-262 regexes; llguidance reads them as Rust regexes, where `\\d` and `\\w` are made
ASCII as ECMA's are, but `\\s` is Unicode's White_Space: U+0085 in, U+FEFF out, the reverse of ECMA's. Here each
`\\s` / `\\S` of a schema's patterns becomes ECMA's class, spelled as Rust's with U+FEFF added and U+0085 taken away
(a class-set difference, a nested class inside a class: 18 characters where ECMA's list took 74), and those of the
`default` and `examples` data a `$ref` points into, which llguidance reads as a schema (engine/grammar_rows'
schema_links); other data nothing reads: kept as sent (lane gaps26). A request's schemas' patterns, rewritten, past
engine/grammar's MAX_PATTERN_CHARS in all (with those of the const and enum data a `$ref` reads, as sent; its
SchemaBudget) are refused: llguidance builds its lexer from their text at seconds a megabyte, on a compile thread other
requests' grammars wait for (a 1.5 MB body of `\\s`: 30 s before its own 400, profiles/RESULTS.md lane edges27). `const`
and `enum` values are what the answer must be, byte for byte: kept as sent, and a `$ref` that reads a `\\s` in them (as
Rust's) refused. vLLM's `structured_outputs.regex` is no JSON Schema and keeps its Python-like Unicode classes; a
schema inside a Lark grammar (`%json{...}`) is the grammar engine's, not rewritten either (both bounded there, a
`%json` by its patterns' characters, MAX_PROPERTIES and MAX_PATTERN_PROPERTIES, in the data a `$ref` reads too).
Each `\\cX` (ECMA's control escape, which Rust's regex lacks) becomes its code point (patternProperties keys made one
regex one key, `allOf` their subschemas), and a count written as an integral float (`"maxItems": 2.0`, an integer
since draft 6, which llguidance refuses) an int, in the same walk."""
from __future__ import annotations

import json
from typing import Any

from nanoqwen.engine.grammar import MAX_RULES, SchemaBudget, object_properties
from nanoqwen.engine.grammar_rows import LongReference, schema_links
from nanoqwen.engine.object_runs import Merges, SchemaObjects
from nanoqwen.engine.schema_keywords import DATA_KEYWORDS, own_patterns, schema_objects, subschemas
from nanoqwen.engine.schema_values import values_weight
from nanoqwen.engine.validation import InvalidRequest

# ECMA-262's WhiteSpace and LineTerminator (\s): Unicode's White_Space with U+FEFF, without U+0085
CLASS_ESCAPES = {"s": r"[\x{feff}\s--\x85]", "S": r"[^\x{feff}\s--\x85]"}
# the patterns' bound's 400 says how they are counted
NOTE = f" (each \\s counting {len(CLASS_ESCAPES['s'])} and each \\S {len(CLASS_ESCAPES['S'])}, ECMA's class)"
ANNOTATIONS = ("default", "examples")  # data keywords whose values a `$ref` reads are rewritten as schemas
# the other data keywords (const, enum): their values are also what the answer must be, byte for byte, so a `$ref`
# that reads a `\s` in them is refused (llguidance reads it as Rust's: U+0085 in, U+FEFF out; rewritten, the value
# would no longer match as sent)
VALUES = DATA_KEYWORDS - set(ANNOTATIONS)
# the keywords whose value is a count (a non-negative integer), which JSON Schema draft 6 on may write `2.0`
COUNTS = frozenset(("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
                    "maxContains"))
MAX_COUNT = 2 ** 53  # the largest a float holds exactly; a larger one is left to llguidance (its 400)
# pydantic's pattern for a `Decimal` given as a string: its lookahead (which llguidance refuses, as every look-around)
# only keeps out strings of signs and dots alone, so it is served as the same language without one: a sign, then digits
# with an optional dot, or a dot and digits (equal to it on every string: tests/test_structured_patterns.py). Any other
# look-around stays llguidance's 400, which quotes the pattern.
DECIMAL_PATTERN = r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$"
DECIMAL_SERVED = r"^[+-]?(?:\d+\.?\d*|\.\d+)$"


def ecma_pattern(pattern: str) -> str:
    """The pattern with ECMA's `\\s` and `\\S` spelled out and each `\\cX` as its code point (an escaped backslash
    before an `s` or a `c` stays as it is)."""
    out: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        if escaped == "c":  # ECMA's control escape, which Rust's regex lacks: `\cJ` is U+000A (its letter mod 32)
            letter = next(chars, "")
            out.append(f"\\x{{{ord(letter) % 32:02x}}}" if letter.isascii() and letter.isalpha() else "\\c" + letter)
            continue
        out.append(CLASS_ESCAPES.get(escaped, char + escaped))
    return "".join(out)


def served_pattern(pattern: str) -> str:
    """A schema's pattern as llguidance is given it: ecma_pattern's, pydantic's Decimal pattern without lookahead."""
    return DECIMAL_SERVED if pattern == DECIMAL_PATTERN else ecma_pattern(pattern)


def ecma_patterns(schema: Any, param: str, budget: SchemaBudget | None = None, merges: Merges | None = None) -> Any:
    """A copy of the schema with each `pattern` and `patternProperties` key through ecma_pattern, in its subschemas
    and in the ANNOTATIONS' data a `$ref` reads as a schema; InvalidRequest naming `param` where they (and those of
    VALUES' data a `$ref` reads) pass MAX_PATTERN_CHARS, its `properties` MAX_PROPERTIES or its const and enum values
    MAX_VALUES (engine/schema_values: llguidance's compile panics or overflows its stack), with those of the request's
    other schemas (`budget`'s, then charged with this one's; none: the schema alone), where an object's
    patternProperties keys pass MAX_PATTERN_PROPERTIES (all counted in any data a `$ref` reads too), or where a `$ref`
    reads a `\\s`, `\\S` or `\\cX` in VALUES' data. The objects its checks merge are kept in `merges`, for the
    copy's weighing (held_json_schema's) to merge each once.
    Iterative: the schema is as deep as a body may be. The `$ref`s are resolved only where the schema has such data
    and passes check_bounds' cheap count (each `$ref` twice against MAX_RULES): a schema it refuses is not worth
    resolving (30,000 `$ref`s: 0.6 s)."""
    budget = SchemaBudget() if budget is None else budget
    out = json.loads(json.dumps(schema))
    refs, data = 0, False  # the schema's `$ref`s (its data's not counted: a lower bound), and data a `$ref` may read
    chars = properties = weight = 0  # the patterns' characters, the properties, the const and enum values' weight
    objects = SchemaObjects(out, merges)
    for node in schema_objects(out):  # each rewritten before its subschemas are read
        chars += _rewrite(node, param)
        properties += object_properties(node, param, objects)
        weight += values_weight(node, budget.left(weight))
        budget.counted(param, chars, properties, NOTE, weight)
        refs += isinstance(node.get("$ref"), str)
        data = data or any(isinstance(node.get(key), (dict, list)) for key in ANNOTATIONS) or any(
            _holds_objects(node.get(key)) for key in VALUES)
    if refs and data and 2 * refs <= MAX_RULES:
        try:
            in_data = schema_links(out).in_data
        except LongReference:  # the schema is refused (check_bounds weighs it): its data left as sent
            in_data = []
        values = _in_values(out) if in_data else {}
        for node, sent in in_data:  # each once, with the objects in it
            keyword = values.get(id(node), sent)  # a const in default data is a value all the same
            own = _rewrite(node, param) if keyword in ANNOTATIONS else _as_sent(node, keyword, param)
            chars += own
            properties += object_properties(node, param, objects)  # llguidance compiles what a `$ref` reads, data too
            if sent in ANNOTATIONS:  # const and enum data: weighed whole where the walk met its owner
                weight += values_weight(node, budget.left(weight))
            budget.counted(param, chars, properties, NOTE, weight)
    budget.charge(param, chars, properties, weight)
    return out


def _as_sent(node: dict[str, Any], keyword: str, param: str) -> int:
    """A VALUES object a `$ref` reads: its patterns' length, as sent (llguidance compiles them too); InvalidRequest
    naming `param` where one would need ECMA's rewrite, which the value, matched byte for byte, cannot take."""
    patterns = own_patterns(node)
    if any(ecma_pattern(pattern) != pattern for pattern in patterns):
        raise InvalidRequest(f"invalid {param}: a $ref reads a pattern with \\s, \\S or \\cX in {keyword} data, "
                             "which must match as sent: its class cannot be ECMA's there", param=param)
    return sum(map(len, patterns))


def _rewrite(node: dict[str, Any], param: str) -> int:
    """The schema object's own `pattern` and `patternProperties` keys through served_pattern, and its COUNTS that are
    integral floats (`"maxItems": 2.0`, an integer since draft 6; llguidance refuses any float there) as ints, in
    place; the patterns' length."""
    node.update({key: int(value) for key in COUNTS & node.keys()
                 if isinstance(value := node[key], float) and value.is_integer() and 0 <= value <= MAX_COUNT})
    if isinstance(node.get("pattern"), str):
        node["pattern"] = served_pattern(node["pattern"])
    if isinstance(node.get("patternProperties"), dict):
        node["patternProperties"] = _merged(node["patternProperties"])
    return sum(map(len, own_patterns(node)))


def _merged(patterns: dict[str, Any]) -> dict[str, Any]:
    """patternProperties with each key through ecma_pattern; keys made one regex (`\\cJ`, `\\cj` and `\\x{0a}`: `\\cX`
    is the one rewrite two keys can share, since a spelled-out `\\s` holds a `\\s`) one key whose subschema is `allOf`
    theirs, in the order sent: JSON Schema's meaning (a name the regex matches follows each), where the last one's
    had silently taken the others' place (llguidance refuses keys that differ and overlap: not these; `\\n` beside
    `\\cJ` is its 400 "not disjoint", which quotes the rewritten `\\x{0a}`, not the key sent)."""
    grouped: dict[str, list[Any]] = {}
    for key, value in patterns.items():
        grouped.setdefault(served_pattern(key), []).append(value)
    return {key: values[0] if len(values) == 1 else {"allOf": values} for key, values in grouped.items()}


def _in_values(schema: Any) -> dict[int, str]:
    """The ids of the objects inside a VALUES keyword's value anywhere in the schema, each with that keyword: the
    schema walked as llguidance reads it (ANNOTATIONS' data too, which a `$ref` may read as a schema), so that a
    `$ref` into `default` data reaching a `const` there finds a value, and a property named `const` is none."""
    inside: dict[int, str] = {}
    stack: list[tuple[Any, str | None]] = [(schema, None)]
    while stack:
        node, keyword = stack.pop()
        if isinstance(node, list):
            stack.extend((value, keyword) for value in node)
        elif isinstance(node, dict) and keyword is not None:  # in a value: all of it is
            inside[id(node)] = keyword
            stack.extend((value, keyword) for value in node.values())
        elif isinstance(node, dict):
            stack.extend((value, None) for _, value in subschemas(node))
            stack.extend((node[key], key if key in VALUES else None) for key in DATA_KEYWORDS & node.keys())
    return inside


def _holds_objects(value: Any) -> bool:
    """Whether a const or enum value is or lists an object or array, which a `$ref` may read as a schema."""
    return isinstance(value, dict) or isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value)
