"""Where a JSON schema's patterns are rewritten to ECMA-262's `\\s` (nanoqwen/api/schema_patterns.py), and where not:
the grammar the server compiles from them is tested through the server (test_server_structured.py)."""
from __future__ import annotations

from nanoqwen.api.schema_patterns import ECMA_SPACE, ecma_pattern, ecma_patterns

SPACE, NOT_SPACE = f"[{ECMA_SPACE}]", f"[^{ECMA_SPACE}]"


def test_only_a_class_escape_is_spelled_out() -> None:
    assert ecma_pattern(r"^a\sb\S$") == f"^a{SPACE}b{NOT_SPACE}$"
    assert ecma_pattern(r"[\s,]") == f"[{SPACE},]"  # a nested class inside a class
    assert ecma_pattern(r"\\s\d\w\b\.") == r"\\s\d\w\b\."  # an escaped backslash, then a plain s; other escapes kept
    assert ecma_pattern("a\\") == "a\\"  # a trailing backslash stays the grammar engine's error


def test_patterns_are_found_in_subschemas_and_not_in_values() -> None:
    schema = {
        "type": "object",
        "properties": {"pattern": {"type": "string", "pattern": r"\s"},  # a property named "pattern"
                       "const": {"const": {"pattern": r"\s"}},  # a value to match, not a schema
                       "list": {"type": "array", "items": [{"pattern": r"\s"}]}},
        "patternProperties": {r"^\s": {"enum": [r"\s"]}},
        "$defs": {"d": {"anyOf": [{"pattern": r"\S"}]}},
    }
    out = ecma_patterns(schema)
    assert out["properties"]["pattern"]["pattern"] == SPACE
    assert out["properties"]["const"] == {"const": {"pattern": r"\s"}}
    assert out["properties"]["list"]["items"][0]["pattern"] == SPACE
    assert out["patternProperties"] == {f"^{SPACE}": {"enum": [r"\s"]}}
    assert out["$defs"]["d"]["anyOf"][0]["pattern"] == NOT_SPACE
    assert schema["properties"]["pattern"]["pattern"] == r"\s"  # a copy: the request's schema is left as sent
    assert ecma_patterns(None) is None
