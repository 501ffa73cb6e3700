"""JSON Schema's `pattern`s are ECMA-262 regexes; llguidance reads them as Rust regexes, where `\\d` and `\\w` are
made ASCII as ECMA's are, but `\\s` is Unicode's White_Space: U+0085 in, U+FEFF out, the reverse of ECMA's. Here each
`\\s` / `\\S` of a schema's patterns becomes ECMA's class (a nested class inside a class, which Rust regexes take),
and those of the `default` and `examples` data a `$ref` points into, which llguidance reads as a schema
(engine/grammar_rows.schema_links); other data nothing reads: kept as sent (a `\\s` grows 30 times rewritten: a 1 MB
body of them in `examples` compiled ~20 times slower, profiles/RESULTS.md lane gaps26). `const` and `enum` values
are what the answer must be, byte for byte: kept as sent. vLLM's `structured_outputs.regex` is no JSON Schema and
keeps its Python-like Unicode classes; a schema inside a Lark grammar (`%json{...}`) is the grammar engine's, not
rewritten either."""
from __future__ import annotations

import json
from typing import Any

from nanoqwen.engine.grammar import MAX_RULES
from nanoqwen.engine.grammar_rows import LongReference, schema_links
from nanoqwen.engine.schema_keywords import subschemas

# ECMA-262's WhiteSpace and LineTerminator: \s
ECMA_SPACE = r"\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
CLASS_ESCAPES = {"s": f"[{ECMA_SPACE}]", "S": f"[^{ECMA_SPACE}]"}
ANNOTATIONS = ("default", "examples")  # data keywords whose values a `$ref` reads are rewritten as schemas


def ecma_pattern(pattern: str) -> str:
    """The pattern with ECMA's `\\s` and `\\S` spelled out (an escaped backslash before an `s` stays as it is)."""
    out: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        out.append(CLASS_ESCAPES.get(escaped, char + escaped))
    return "".join(out)


def ecma_patterns(schema: Any) -> Any:
    """A copy of the schema with each `pattern` and `patternProperties` key through ecma_pattern, in its subschemas
    and in the ANNOTATIONS' data a `$ref` reads as a schema. Iterative: the schema is as deep as a body may be. The
    `$ref`s are resolved only where the schema has ANNOTATIONS data and passes check_bounds' cheap count (each `$ref`
    twice against MAX_RULES): a schema it refuses is not worth resolving (30,000 `$ref`s: 0.6 s)."""
    out = json.loads(json.dumps(schema))
    stack: list[Any] = [out]
    refs, data = 0, False  # the schema's `$ref`s (its data's not counted: a lower bound), and ANNOTATIONS data
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            _rewrite(node)
            refs += isinstance(node.get("$ref"), str)
            data = data or any(isinstance(node.get(key), (dict, list)) for key in ANNOTATIONS)
            stack.extend(value for _, value in subschemas(node))
    if refs and data and 2 * refs <= MAX_RULES:
        try:
            in_data = [node for node, keyword in schema_links(out).in_data if keyword in ANNOTATIONS]
        except LongReference:  # the schema is refused (check_bounds weighs it): its data left as sent
            in_data = []
        for node in in_data:  # each once, with the objects in it
            _rewrite(node)
    return out


def _rewrite(node: dict[str, Any]) -> None:
    """The schema object's own `pattern` and `patternProperties` keys through ecma_pattern, in place."""
    if isinstance(node.get("pattern"), str):
        node["pattern"] = ecma_pattern(node["pattern"])
    if isinstance(node.get("patternProperties"), dict):
        node["patternProperties"] = {ecma_pattern(key): value for key, value in node["patternProperties"].items()}
