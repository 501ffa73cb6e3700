"""Where a JSON schema's patterns are rewritten to ECMA-262's `\\s` (nanoqwen/api/schema_patterns.py), and where not;
what the grammar compiled from a rewritten pattern takes, character by character (the server's wiring of it:
test_server_structured.py)."""
from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from engine_util import shared_tokenizer
from nanoqwen.api import schema_patterns, structured
from nanoqwen.api.schema_patterns import CLASS_ESCAPES, ecma_pattern, ecma_patterns
from nanoqwen.engine import grammar as engine_grammar
from nanoqwen.engine.grammar import MAX_PATTERN_CHARS, MAX_PROPERTIES, MAX_RULES, Grammars, SchemaBudget, ToolSpec
from nanoqwen.engine.grammar_rows import schema_links as real_links
from nanoqwen.engine.schema_values import MAX_VALUES
from nanoqwen.engine.validation import InvalidRequest
from nanoqwen.text import TokenBytes

SPACE, NOT_SPACE = CLASS_ESCAPES["s"], CLASS_ESCAPES["S"]
FIELD = "response_format"


def test_only_a_class_escape_is_spelled_out() -> None:
    assert ecma_pattern(r"^a\sb\S$") == f"^a{SPACE}b{NOT_SPACE}$"
    assert ecma_pattern(r"[\s,]") == f"[{SPACE},]"  # a nested class inside a class
    assert ecma_pattern(r"\\s\d\w\b\.") == r"\\s\d\w\b\."  # an escaped backslash, then a plain s; other escapes kept
    assert ecma_pattern("a\\") == "a\\"  # a trailing backslash stays the grammar engine's error


def test_patterns_are_found_in_subschemas_and_not_in_const_or_enum_values() -> None:
    """Wherever a schema is read, `default` or `examples` data a `$ref` points into too; a const or enum value is
    left alone."""
    schema = {
        "type": "object",
        "properties": {"pattern": {"type": "string", "pattern": r"\s"},  # a property named "pattern"
                       "const": {"const": {"pattern": r"\s"}},  # a value to match, not a schema
                       "list": {"type": "array", "items": [{"pattern": r"\s"}]}},
        "patternProperties": {r"^\s": {"enum": [r"\s"]}},
        "$defs": {"d": {"anyOf": [{"pattern": r"\S"}]},  # below, data a `$ref` points into: llguidance's schemas
                  "e": {"default": {"pattern": r"\s"}, "examples": [{"items": {"pattern": r"\S"}}]}},
        "allOf": [{"$ref": "#/$defs/e/default"}, {"$ref": "#/$defs/e/examples/0"}],
    }
    out = ecma_patterns(schema, FIELD)
    assert out["properties"]["pattern"]["pattern"] == SPACE
    assert out["properties"]["const"] == {"const": {"pattern": r"\s"}}  # the value to match
    assert out["properties"]["list"]["items"][0]["pattern"] == SPACE
    assert out["patternProperties"] == {f"^{SPACE}": {"enum": [r"\s"]}}
    assert out["$defs"]["d"]["anyOf"][0]["pattern"] == NOT_SPACE
    assert out["$defs"]["e"] == {"default": {"pattern": SPACE}, "examples": [{"items": {"pattern": NOT_SPACE}}]}
    assert schema["properties"]["pattern"]["pattern"] == r"\s"  # a copy: the request's schema is left as sent
    assert ecma_patterns(None, FIELD) is None


def test_integral_float_counts_become_ints_and_others_stay() -> None:
    """JSON Schema draft 6 on: `2.0` is an integer; llguidance takes only an int. `2.5`, one past 2**53, a count named
    as a property, a const value: as sent."""
    schema = {"type": "array", "maxItems": 2.0, "minItems": 2.5, "items": {"minLength": 3.0, "maxLength": 1e300},
              "properties": {"maxItems": {"const": {"maxItems": 1.0}}}}
    out = ecma_patterns(schema, FIELD)
    assert out["maxItems"] == 2 and type(out["maxItems"]) is int and out["minItems"] == 2.5
    assert type(out["items"]["minLength"]) is int and out["items"]["maxLength"] == 1e300
    assert out["properties"] == {"maxItems": {"const": {"maxItems": 1.0}}}
    assert type(out["properties"]["maxItems"]["const"]["maxItems"]) is float


def test_data_no_ref_reads_is_left_as_sent() -> None:
    """`default` and `examples` data is read as a schema only where a `$ref` points into it (there, and in what it
    holds, its patterns are rewritten); the rest nothing reads: each `\\s` rewritten grew it 30 times."""
    data = {"pattern": r"\s", "items": {"pattern": r"\S"}, "default": {"pattern": r"\s"}}
    schema = {"type": "object", "default": data, "examples": [data, data],
              "properties": {"a": {"$ref": "#/$defs/read/default/items"}},
              "$defs": {"read": {"default": data, "examples": [data]}}}
    out = ecma_patterns(schema, FIELD)
    assert out["$defs"]["read"]["default"] == {"pattern": r"\s", "items": {"pattern": NOT_SPACE},
                                               "default": {"pattern": r"\s"}}
    assert {"default": out["default"], "examples": out["examples"]} == {"default": data, "examples": [data, data]}
    assert out["$defs"]["read"]["examples"] == [data]
    long = {"type": "integer", "examples": [{"pattern": r"\s" * 1000}] * 5}
    assert ecma_patterns(long, FIELD) == long
    sent = {"$id": "http://x/" + "a" * 3000, "$ref": "#/default", "default": data}
    assert ecma_patterns(sent, FIELD) == {
        "$id": "http://x/" + "a" * 3000, "$ref": "#/default", "default": data}  # refused later (LongReference)


def test_refs_are_resolved_only_for_data_of_a_schema_the_rule_count_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema check_bounds' cheap count refuses (each `$ref` twice past MAX_RULES) is not resolved for its data,
    even with `"examples": []`; one it takes is."""
    calls: list[object] = []
    monkeypatch.setattr(schema_patterns, "schema_links", lambda schema: calls.append(schema) or real_links(schema))
    refs = MAX_RULES // 2
    for count, resolved in ((refs, 1), (refs + 1, 0)):
        calls.clear()
        schema = {"type": "array", "examples": [], "$defs": {"a": {"type": "integer"}},
                  "prefixItems": [{"$ref": "#/$defs/a"}] * count}
        ecma_patterns(schema, FIELD)
        assert len(calls) == resolved, count
    calls.clear()
    ecma_patterns({"type": "array", "prefixItems": [{"$ref": "#/$defs/a"}] * 10, "$defs": {"a": {}}}, FIELD)
    assert calls == []  # no data: nothing to resolve for


@pytest.mark.parametrize("keyword, value, pointer", [
    ("const", {"type": "string", "pattern": r"^a\s$"}, ""), ("enum", [1, {"pattern": r"\S"}], "/1"),
    ("const", {"items": {"patternProperties": {r"\s": {}}}}, "/items"),
])
def test_a_ref_reading_a_space_class_in_const_or_enum_data_is_refused(keyword: str, value: Any, pointer: str) -> None:
    """llguidance reads a `$ref`'s target in const or enum data as a schema, its `\\s` Rust's (U+0085 in, U+FEFF out),
    and the value must match as sent: not rewritten, the 400 naming the field. Without a `\\s`, or with no `$ref`
    reading it, the value is served as sent."""
    schema = {"$ref": f"#/$defs/c/{keyword}{pointer}", "$defs": {"c": {keyword: value}}}
    within_default = {"properties": {"a": {"$ref": "#/$defs/h/default"}, "b": {"$ref": f"#/$defs/h/default/{keyword}"
                                                                              f"{pointer}"}},
                      "$defs": {"h": {"default": {keyword: value}}}}  # the second `$ref` reads a value in data
    for refused_schema in (schema, within_default):
        with pytest.raises(InvalidRequest, match=f"in {keyword} data") as refused:
            ecma_patterns(refused_schema, "tools")
        assert refused.value.param == "tools"
    plain = {"$ref": f"#/$defs/c/{keyword}{pointer}", "$defs": {"c": {keyword: json.loads(
        json.dumps(value).replace("\\\\s", "b").replace("\\\\S", "b"))}}}
    assert ecma_patterns(plain, FIELD) == plain
    unread = {"type": "object", "$defs": {"c": {keyword: value}}, "properties": {"a": {"$ref": "#/$defs/c"}}}
    assert ecma_patterns(unread, FIELD) == unread
    named = {"properties": {keyword: {"default": {"pattern": r"\s"}}, "x": {"$ref": f"#/properties/{keyword}/default"}},
             "$defs": {keyword: {"default": {"pattern": r"\s"}}}, "$ref": f"#/$defs/{keyword}/default"}
    rewritten = ecma_patterns(named, FIELD)  # subschemas named like the keyword: their data is no value
    assert rewritten["properties"][keyword]["default"] == rewritten["$defs"][keyword]["default"] == {
        "pattern": CLASS_ESCAPES["s"]}


def test_patterns_past_their_bound_are_refused_naming_the_field() -> None:
    """A schema's patterns and patternProperties keys, rewritten (each `\\s` ECMA's class, in `$ref`-read data too),
    count against MAX_PATTERN_CHARS in all: past it, the 400 naming the field, before llguidance builds a lexer from
    them (a 1.5 MB body of `\\s` held a compile thread 30 s; as ECMA's list, a `\\s` grew 37 times)."""
    assert len(ecma_pattern(r"\s")) <= 18 and len(ecma_pattern(r"\S")) <= 19
    within = MAX_PATTERN_CHARS // len(SPACE)
    spaces = r"\s" * within
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": spaces}}}
    assert ecma_patterns(schema, FIELD)["properties"]["a"]["pattern"] == SPACE * within
    passed = [{"type": "object", "properties": {"a": {"type": "string", "pattern": spaces + "a" * len(SPACE)}}},
              {"type": "object", "patternProperties": {spaces: {}}, "properties": {"b": {"pattern": r"\s" * 3}}},
              {"$ref": "#/$defs/d/default", "$defs": {"d": {"default": {"pattern": spaces, "items": {"pattern": "b"}}}},
               "pattern": "a" * len(SPACE)},
              # const and enum data a `$ref` reads: llguidance compiles its patterns (as sent) too
              {"$ref": "#/$defs/c/const", "$defs": {"c": {"const": {"pattern": "a" * (MAX_PATTERN_CHARS + 1)}}}},
              {"$ref": "#/$defs/c/enum/1",
               "$defs": {"c": {"enum": [1, {"patternProperties": {"a" * MAX_PATTERN_CHARS: {}, "b": {}}}]}}}]
    for schema in passed:
        with pytest.raises(InvalidRequest, match=f"longer than {MAX_PATTERN_CHARS} characters") as refused:
            ecma_patterns(schema, "text.format")
        assert refused.value.param == "text.format"
    unread = {"type": "integer", "examples": [{"pattern": spaces * 2}]}  # data nothing reads: not counted
    assert ecma_patterns(unread, FIELD) == unread


def test_patternproperties_keys_made_one_regex_are_one_key_following_each_subschema() -> None:
    """`\\cJ`, `\\cj` and `\\x{0a}` are one regex once `\\cX` is rewritten: one key whose subschema is allOf theirs,
    in the order sent (the last one's had silently won), in subschemas and in data a `$ref` reads; a spelled-out
    `\\s` class sent as a key is rewritten again (it holds a `\\s`), no key of `\\s`'s."""
    colliding = {"^\\cJ$": {"enum": [1, 2]}, "^\\x{0a}$": {"enum": [2, 3]}, "^\\cj$": {"pattern": "\\s"}, "b": {}}
    out = ecma_patterns({"type": "object", "patternProperties": colliding,
                         "$ref": "#/$defs/d/default", "$defs": {"d": {"default": {"patternProperties": colliding}}}},
                        FIELD)
    merged = {"^\\x{0a}$": {"allOf": [{"enum": [1, 2]}, {"enum": [2, 3]}, {"pattern": SPACE}]}, "b": {}}
    assert out["patternProperties"] == merged and out["$defs"]["d"]["default"]["patternProperties"] == merged
    spelled = ecma_patterns({"patternProperties": {"\\s": {"enum": [1]}, SPACE: {"enum": [2]}}}, FIELD)
    assert len(spelled["patternProperties"]) == 2, spelled
    overlapping = ecma_patterns({"patternProperties": {"^k\\n?$": {}, "^k\\cJ?$": {}}}, FIELD)  # llguidance's 400
    assert list(overlapping["patternProperties"]) == ["^k\\n?$", "^k\\x{0a}?$"], overlapping


def test_properties_past_their_bound_are_refused_naming_the_field() -> None:
    """OpenAI's limit, 5,000 `properties` in a schema in all (llguidance compiled one object's 10,000 in 16 s): at it,
    kept; one more, in another object, the 400 naming the field; names in `required` or data are no properties."""
    def objects(*counts: int) -> dict[str, Any]:
        required = [f"p{i}" for i in range(9_000)]  # each property (no long run of optional ones), and more
        return {"type": "object", "required": required, "default": {"properties": {"x": {}}},
                "anyOf": [{"properties": {f"p{i}": {} for i in range(n)}, "required": required} for n in counts]}
    at = objects(MAX_PROPERTIES - 1, 1)
    assert ecma_patterns(at, FIELD) == at
    with pytest.raises(InvalidRequest, match=f"more than {MAX_PROPERTIES} properties in all") as refused:
        ecma_patterns(objects(MAX_PROPERTIES - 1, 2), "text.format")
    assert refused.value.param == "text.format"
    many = {"properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}, "required": [f"p{i}" for i in range(9_000)]}
    for keyword, value in (("default", many), ("const", many), ("enum/0", [many])):  # data a `$ref` reads: compiled
        # a const or enum value so large is past MAX_VALUES too, weighed first
        refusal = f"more than {MAX_PROPERTIES} properties in all" if keyword == "default" else "too large to serve"
        with pytest.raises(InvalidRequest, match=refusal):
            ecma_patterns({"$ref": f"#/$defs/d/{keyword}", "$defs": {"d": {keyword.split("/")[0]: value}}}, FIELD)


def test_patternproperties_past_their_bound_in_one_object_are_refused_naming_the_field() -> None:
    """llguidance checks one object's patternProperties keys pairwise, worse than quadratic (400 keys: 20 s): at the
    bound in each of two objects, kept; one more in one (or in `default` data a `$ref` reads as a schema), the 400
    naming the field; keys made one regex count once."""
    bound = engine_grammar.MAX_PATTERN_PROPERTIES

    def keys(count: int, prefix: str) -> dict[str, Any]:
        return {f"^{prefix}{i}$": {"type": "integer"} for i in range(count)}
    at = {"type": "object", "patternProperties": keys(bound, "a"),
          "properties": {"o": {"patternProperties": keys(bound, "b")}}}
    assert ecma_patterns(at, FIELD) == at
    made_one = {**keys(bound - 1, "a"), "^\\cJ$": {}, "^\\cj$": {}}
    assert len(ecma_patterns({"patternProperties": made_one}, FIELD)["patternProperties"]) == bound
    read = [{"$ref": f"#/$defs/d/{keyword}", "$defs": {"d": {keyword: {"patternProperties": keys(bound + 1, "a")}}}}
            for keyword in ("default", "const")] + [
        {"$ref": "#/$defs/d/enum/0", "$defs": {"d": {"enum": [{"patternProperties": keys(bound + 1, "a")}]}}}]
    for past in ({"anyOf": [{"patternProperties": keys(bound + 1, "a")}]}, *read):
        with pytest.raises(InvalidRequest, match=f"more than {bound} patternProperties") as refused:
            ecma_patterns(past, "tools")
        assert refused.value.param == "tools"


def test_a_requests_schemas_share_one_budget_naming_the_largest_field() -> None:
    """A request's schemas (its tools', then its answer's) are charged to one Budget: a bound of each alone let N tools
    cost N times it (2 forced tools of 5,000 properties held a compile thread 33 s, load 11). At the bounds in all,
    kept; past, the 400 naming the field with the largest part; a refused schema adds nothing."""
    def spread(count: int) -> dict[str, Any]:
        names = [f"p{i}" for i in range(count)]
        return {"properties": {name: {} for name in names}, "required": names}
    budget = SchemaBudget()
    ecma_patterns(spread(3_000), "tools", budget)
    ecma_patterns(spread(MAX_PROPERTIES - 3_000), FIELD, budget)
    with pytest.raises(InvalidRequest, match=f"more than {MAX_PROPERTIES} properties in all") as refused:
        ecma_patterns(spread(1), FIELD, budget)
    assert refused.value.param == "tools"  # its 3,000 the largest part
    budget = SchemaBudget()
    ecma_patterns({"pattern": "a" * 1_000}, "tools", budget)
    with pytest.raises(InvalidRequest, match=f"longer than {MAX_PATTERN_CHARS} characters in all") as refused:
        ecma_patterns({"pattern": "a" * (MAX_PATTERN_CHARS - 999)}, FIELD, budget)
    assert refused.value.param == FIELD
    assert (budget.chars, budget.properties) == (1_000, 0)
    ecma_patterns({"pattern": "a" * (MAX_PATTERN_CHARS - 1_000)}, FIELD, budget)  # at the bound in all


def _keys(count: int) -> dict[str, int]:
    return {f"k{i}": i for i in range(count)}


@pytest.mark.parametrize("schema, over", [
    (lambda n: {"const": _keys(n)}, (MAX_VALUES - 1) // 4 + 1),  # a value 1, a key 3 more and its value's 1
    (lambda n: {"const": list(range(n))}, MAX_VALUES),
    (lambda n: {"enum": [[i] for i in range(n)]}, MAX_VALUES // 2 + 1),
    (lambda n: {"type": "object", "properties": {f"p{i}": {"const": [i] * 6} for i in range(n)},
                "required": [f"p{i}" for i in range(n)]}, MAX_VALUES // 7 + 1),
    # default and examples data a `$ref` reads: llguidance compiles it as a schema, its const too
    (lambda n: {"$ref": "#/$defs/d/default", "$defs": {"d": {"default": {"const": _keys(n)}}}},
     (MAX_VALUES - 1) // 4 + 1),
    (lambda n: {"$ref": "#/$defs/d/examples/0", "$defs": {"d": {"examples": [{"const": list(range(n))}]}}},
     MAX_VALUES),
])
def test_const_and_enum_values_past_their_bound_are_refused_before_llguidance_sees_them(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars, schema: Any, over: int) -> None:
    """llguidance compiles a const or enum object or array into symbols, ~4 an object's key, 1 an item: past u16::MAX it
    panics (a 17,000-key object const) and, on an 8 MB stack, a 30,000-key one killed the process (rc 139). Their
    weight in all is bounded at a quarter of that: at the bound served, past it the 400 naming the field."""
    assert ecma_patterns(schema(over - 1), FIELD) == schema(over - 1)
    grammars.json_schema(schema(over - 1), strict=False, param=FIELD)
    with pytest.raises(InvalidRequest, match="const and enum values are too large to serve") as refused:
        ecma_patterns(schema(over), FIELD)
    assert refused.value.param == FIELD


def test_a_const_a_ref_reads_inside_a_const_is_weighed_once() -> None:
    """The walk weighs a const value whole, nested consts too: one a `$ref` reads there was weighed again (2,500 keys
    refused; llguidance compiles the target once, 16,000 keys too)."""
    schema = {"$ref": "#/$defs/d/const", "$defs": {"d": {"const": {"const": _keys(2_500)}}}}
    assert ecma_patterns(schema, FIELD) == schema


def test_const_and_enum_values_are_one_budget_across_a_requests_schemas() -> None:
    """Each schema's values under the bound add up in the grammar the request's schemas make: the 400 names the field
    with the largest part; a lone object const 4,000 keys of a 17,000 that panicked."""
    budget = SchemaBudget()
    ecma_patterns({"enum": list(range(20_000)), "const": list(range(10_000))}, "tools", budget)  # scalars: lexemes
    with pytest.raises(InvalidRequest, match="too large to serve") as refused:
        ecma_patterns({"const": _keys(2_000)}, FIELD, budget)
    assert refused.value.param == "tools"
    assert budget.values == 10_001
    assert ecma_patterns({"const": _keys(1_000)}, FIELD, budget) == {"const": _keys(1_000)}


def test_a_large_const_named_by_many_options_costs_no_work_per_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `$def` with a 3,000-key const on its first required property, named by 300 options each adding a property:
    its JSON was written at each merge, the work not charged (40,000 keys: 11 s of CPU, then a 200). Now an object
    or array const tells no option apart, and is never written out per merge."""
    big = _keys(3_000)
    written: list[Any] = []
    dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda value, **kwargs: written.append(value) or dumps(value, **kwargs))
    schema = {"$defs": {"K": {"type": "object", "properties": {"kind": {"const": big}}, "required": ["kind"]}},
              "type": "object", "properties": {"p": {"anyOf": [{"$ref": "#/$defs/K", "properties": {f"x{i}": {}}}
                                                                for i in range(300)]}}}
    ecma_patterns(schema, FIELD)
    assert not any(value == big for value in written)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> PreTrainedTokenizerFast:
    return shared_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def grammars(tokenizer: PreTrainedTokenizerFast) -> Grammars:
    return Grammars(tokenizer, TokenBytes(tokenizer), len(tokenizer), [tokenizer.eos_token_id])


@pytest.mark.parametrize("escape, char, ecma", [
    ("\\s", "\ufeff", True), ("\\S", "\ufeff", False),  # ECMA's space, not Unicode's White_Space (Rust's \s)
    ("\\s", "\u0085", False), ("\\S", "\u0085", True),  # the reverse
    ("\\s", "\u3000", True), ("\\d", "\u0663", False), ("\\d", "3", True), ("\\w", "\u00e9", False),
    ("[\\s\\d]", "\ufeff", True), ("[\\s\\d]", "\u0085", False), ("[\\s\\d]", "3", True),  # a class in a class
    ("[^\\s]", "\ufeff", False), ("[^\\s]", "\u0085", True),  # and negated
    ("\\cJ", "\n", True), ("\\cj", "\n", True), ("\\cJ", "J", False), ("[\\cA-\\cC]", "\x02", True),  # \cX: X mod 32
])
def test_the_compiled_grammar_takes_ecmas_classes(tokenizer: PreTrainedTokenizerFast, grammars: Grammars,
                                                  escape: str, char: str, ecma: bool) -> None:
    """Every token of the JSON string `"a<char>"` is taken by the grammar of `^a<escape>$` exactly where ECMA's
    class holds the character (llguidance alone takes Rust's `\\s`: the U+FEFF and U+0085 cases fail)."""
    schema = ecma_patterns({"type": "string", "pattern": f"^a{escape}$"}, FIELD)
    matcher = grammars.json_schema(schema, strict=True, param="response_format").matcher()
    tokens = tokenizer.encode(json.dumps("a" + char, ensure_ascii=False))
    assert (matcher.validate_tokens(tokens) == len(tokens)) == ecma, (tokens, matcher.validate_tokens(tokens))


def test_a_lark_grammars_json_schemas_are_bounded_as_a_requests(grammars: Grammars) -> None:
    """A Lark grammar's `%json` schemas were bounded by their patterns only (10,000 properties in one held a compile
    thread 17 s; 300 patternProperties keys 3.6 s): their `properties` in all and each object's patternProperties keys
    now have the bounds of a request's schemas, the 400 naming the field."""
    def grammar(*schemas: dict[str, Any]) -> str:
        return "start: " + " | ".join(f"j{i}" for i in range(len(schemas))) + "\n" + "\n".join(
            f"j{i}: %json {json.dumps(schema)}" for i, schema in enumerate(schemas))
    half = MAX_PROPERTIES // 2
    nested = {"properties": {f"o{j}": {"properties": {f"p{i}": {} for i in range(49)}} for j in range(50)}}  # 2,500
    def required(names: list[str]) -> dict[str, Any]:  # each required: no run of optional ones
        return {"properties": {name: {} for name in names}, "required": names}
    grammars.from_text("grammar", grammar(nested, required([f"q{i}" for i in range(MAX_PROPERTIES - half)])), "p")
    keys = {f"^k{i}$": {} for i in range(engine_grammar.MAX_PATTERN_PROPERTIES + 1)}
    past_properties = grammar(required([f"p{i}" for i in range(half)]),
                              {"items": required([f"q{i}" for i in range(half + 1)])})
    for past, what in ((past_properties, "properties in all"),
                       (grammar({"items": {"patternProperties": keys}}), "patternProperties")):
        with pytest.raises(InvalidRequest, match=what) as refused:
            grammars.from_text("grammar", past, "guided_grammar")
        assert refused.value.param == "guided_grammar"


def test_a_lenient_tool_with_free_calls_is_not_charged_to_the_requests_bounds(grammars: Grammars) -> None:
    """Under "auto" a lenient tool that no grammar holds (an anyOf of 1,001 objects, past the parser row's bound) has
    free calls, its schema never compiled: its 4,004 properties are not counted beside a strict tool's 1,500 (they
    were: the 400 "more than 5000 properties in all" naming tools). Unit-level: the tools as a prompt pass the test
    server's context."""
    objects = [{"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(4)}} for _ in range(1_001)]
    names = [f"s{i}" for i in range(1_500)]
    strict = {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names,
              "additionalProperties": False}
    tools = [ToolSpec("free", {"anyOf": objects}), ToolSpec("s", strict, strict=True)]
    calls = structured._tool_calls(grammars, tools, True, None, True, ("free and strict", ""))
    assert '"s1499"' in calls.text and '"k0"' not in calls.text


@pytest.mark.parametrize("lenient_first, strict_answer", [(False, False), (True, False), (True, True)])
def test_a_lenient_tool_gives_way_to_a_strict_one_whatever_the_order_sent(grammars: Grammars, lenient_first: bool,
                                                                         strict_answer: bool) -> None:
    """Under "auto" a lenient tool of 4,000 properties beside a strict schema of 2,000 (a tool's, or the JSON
    answer's): the strict one is charged first whatever the order sent, so the lenient one's calls are free and the
    request served (sent first, it took the budget and the strict one was the 400 "more than 5000 properties in all":
    each was served at 2b54a0e)."""
    def schema(name: str, count: int) -> dict[str, Any]:
        names = [f"{name}{i}" for i in range(count)]
        return {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": names,
                "additionalProperties": False}
    lenient = ToolSpec("free", schema("free", 4_000))
    if strict_answer:
        tools, answer = [lenient], structured.JsonAnswer(schema("s", 2_000), True, "response_format")
    else:
        tools, answer = [lenient, ToolSpec("s", schema("s", 2_000), strict=True)], None
    calls = structured._tool_calls(grammars, tools if lenient_first else tools[::-1], True, answer, True,
                                   ("lenient and strict", f"{lenient_first} {strict_answer}"))
    assert '"s1999"' in calls.text and '"free0"' not in calls.text


@pytest.mark.parametrize("layout, closed, bound", [
    ("[n]", False, 498), ("[n]", True, 500), ("[n] r o600", False, 666), ("r [n] r", False, 999),
    ("r [n]", False, 998), ("r [n]", True, 999), ("o400 r [n]", False, 797), ("o400 r o100 r [n]", True, 799),
    ("o400 r [n] r", False, 998), ("o10 r o10 r [n] r", False, 999), ("o100 r r [n] r", False, 999),
    ("o5 r o5 r o5 r [n] r", True, 999)])
def test_a_run_of_optional_properties_is_bounded_where_llguidances_parser_row_holds_it(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars, layout: str, closed: bool, bound: int) -> None:
    """llguidance's row where a run of optional properties may begin holds items in proportion to it, as many as where
    it stands (before, between or after required properties `r`, `oN` a run of N): past its 2,000 the answer fails
    there, after the compile. At the bound, compiled as sent, the answers taking the run's first or last property
    follow it; one more fails there, and is refused before, saying where the run stands (the whole object's bound was
    taken for every run: runs of 499-998 beside required properties, served, were refused; after a second required
    property with some leading, 999 was refused)."""
    def schema(n: int) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required = []
        for part in layout.replace("[n]", f"n{n}").split():  # the run under test's names `n...`
            names = [f"{part[0]}{len(properties) + i}" for i in range(int(part[1:] or 1))]
            properties.update({name: {"type": "integer"} for name in names})
            required += names if part == "r" else []
        return {"type": "object", "properties": properties, "required": required,
                **({"additionalProperties": False} if closed else {})}

    def follows(n: int) -> bool:
        matcher = grammars.json_schema(schema(n), strict=False, param=FIELD).matcher()
        run = [name for name in schema(n)["properties"] if name.startswith("n")]
        for taken in (run[0], run[-1]):
            answer = {name: 1 for name in schema(n)["properties"] if name == taken or name.startswith("r")}
            if not all(matcher.consume_token(token) for token in tokenizer.encode(json.dumps(answer))):
                return False
            matcher = grammars.json_schema(schema(n), strict=False, param=FIELD).matcher()
        return True
    assert follows(bound) and not follows(bound + 1)
    assert ecma_patterns(schema(bound), FIELD) == schema(bound)
    past = f"{bound + 1} optional properties in a row.*past {bound} there"
    with pytest.raises(InvalidRequest, match=past) as refused:
        ecma_patterns({"items": schema(bound + 1)}, "tools")
    assert refused.value.param == "tools"


def test_a_lenient_tool_past_the_requests_budget_has_free_calls(grammars: Grammars) -> None:
    """Under "auto" the lenient tool whose schema would pass the request's budget has free calls (any JSON object),
    the tools before it keep theirs; strict, the same tools are the 400 naming tools."""
    def tools(strict: bool) -> list[ToolSpec]:
        return [ToolSpec(f"t{i}", {"type": "object", "properties": {"s": {"type": "string", "pattern": f"^{c * n}$"}}},
                         strict) for i, (c, n) in enumerate((("a", 40_000), ("b", 30_000)))]
    lenient = structured._tool_calls(grammars, tools(False), False, None, True, ("lenient", ""))
    assert "a" * 40_000 in lenient.text and "b" * 30_000 not in lenient.text
    with pytest.raises(InvalidRequest, match=f"longer than {MAX_PATTERN_CHARS} characters in all") as refused:
        structured._tool_calls(grammars, tools(True), False, None, True, ("strict", ""))
    assert refused.value.param == "tools"


@pytest.mark.parametrize("tools, where", [(2, "the parameters of function 't1'"), (1, "the schema of text.format")])
def test_the_tools_grammars_lexer_limit_names_the_schema_not_our_grammars_line(grammars: Grammars, tools: int,
                                                                              where: str) -> None:
    """llguidance's lexer limit in the calls' grammar (every schema of the request compiled as one): two forced tools,
    or a tool beside the JSON answer under "auto", of 20,000 enum strings each. Its 400 names what the client sent at
    the line it points at, without its excerpt of the grammar we generated (it quoted `  11 | arguments_0: %json
    {...`)."""
    def schema(name: str) -> dict[str, Any]:
        return {"type": "object", "properties": {"e": {"enum": [f"{name}{i}" for i in range(20_000)]}},
                "required": ["e"]}
    specs = [ToolSpec(f"t{i}", schema(f"t{i}_"), strict=True) for i in range(tools)]
    answer = structured.JsonAnswer(schema("a"), True, "text.format") if tools == 1 else None
    with pytest.raises(InvalidRequest, match="lexer configuration") as refused:
        structured._tool_calls(grammars, specs, True, answer, answer is not None, ("lexer limit", str(tools)))
    assert refused.value.param == "tools"
    assert str(refused.value).endswith(f" (at {where}: the request's schemas compile as one grammar)")
    assert "%json" not in str(refused.value) and "|" not in str(refused.value)


@pytest.mark.parametrize("strict", [False, True])
def test_a_lenient_tool_past_the_calls_grammars_lexer_limit_has_free_calls(grammars: Grammars, strict: bool) -> None:
    """Under "auto" a lenient tool whose schema (an enum of 40,000 strings) passes llguidance's check alone but not
    the lexer limit of the calls' grammar gives way: its calls free, the strict tool's kept (it was the 400 naming
    it). Strict, it is still that 400."""
    big = {"type": "object", "properties": {"e": {"enum": [f"x{i}" for i in range(40_000)]}}, "required": ["e"]}
    kept = {"type": "object", "properties": {"kept": {"type": "integer"}}, "required": ["kept"]}
    tools = [ToolSpec("kept", kept, strict=True), ToolSpec("big", big, strict=strict)]
    if not strict:
        calls = structured._tool_calls(grammars, tools, True, None, True, ("lexer limit, lenient", ""))
        assert '"kept"' in calls.text and '"x0"' not in calls.text
        return
    with pytest.raises(InvalidRequest, match="lexer configuration.*at the parameters of function 'big'") as refused:
        structured._tool_calls(grammars, tools, True, None, True, ("lexer limit, strict", ""))
    assert refused.value.param == "tools"


def _enum_tool(name: str, count: int, strict: bool = False) -> ToolSpec:
    return ToolSpec(name, {"type": "object", "properties": {"e": {"enum": [f"{name}_{i}" for i in range(count)]}},
                           "required": ["e"]}, strict)


def _counted_compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The param of each grammar Grammars compiles from here on."""
    compiles: list[str] = []
    compiled = Grammars._compiled

    def counted(self: Grammars, text: str, param: str, *args: Any, **kwargs: Any) -> engine_grammar.Grammar:
        compiles.append(param)
        return compiled(self, text, param, *args, **kwargs)
    monkeypatch.setattr(Grammars, "_compiled", counted)
    return compiles


@pytest.mark.parametrize("lenient_first", [True, False])
def test_the_lenient_tools_give_way_at_the_lexer_limit_whatever_the_order_sent(
        grammars: Grammars, monkeypatch: pytest.MonkeyPatch, lenient_first: bool) -> None:
    """Under "auto" a lenient tool of 18,000 enum strings beside a strict one of 18,000: llguidance's lexer limit
    names the line where the calls' grammar crossed it, not the schema that took it there, so sent first the lenient
    one had the 400 name the strict one (served the other way round). Every lenient tool gives way: served either
    way, the strict one's calls kept, in two compiles."""
    compiles = _counted_compiles(monkeypatch)
    tools = [_enum_tool("lenient", 18_000), _enum_tool("strict", 18_000, strict=True)]
    calls = structured._tool_calls(grammars, tools if lenient_first else tools[::-1], True, None, True,
                                   ("lexer limit, order", str(lenient_first)))
    assert '"strict_17999"' in calls.text and '"lenient_0"' not in calls.text
    assert compiles == ["tools", "tools"]


def test_many_lenient_tools_past_the_lexer_limit_cost_two_compiles(grammars: Grammars,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "auto" 64 lenient tools of 3,000 enum strings each, past the lexer limit together: all give way at the
    first refusal, the grammar compiled once more (one freed a compile: 57 compiles, 3.7 s of CPU; 128 of 1,500:
    112, 8.2 s), a strict tool beside them kept."""
    compiles = _counted_compiles(monkeypatch)
    kept = ToolSpec("kept", {"type": "object", "properties": {"kept": {"type": "integer"}}, "required": ["kept"]},
                    strict=True)
    tools = [kept, *(_enum_tool(f"b{i}", 3_000) for i in range(64))]
    calls = structured._tool_calls(grammars, tools, True, None, True, ("lexer limit, many lenient", ""))
    assert '"kept"' in calls.text and not any(f'"b{i}_0"' in calls.text for i in range(64))
    assert compiles == ["tools", "tools"]


@pytest.mark.parametrize("data, what", [
    ({"properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}, "required": [f"p{i}" for i in range(5_001)]},
     "properties in all"),
    ({"patternProperties": {f"^k{i}$": {} for i in range(engine_grammar.MAX_PATTERN_PROPERTIES + 1)}},
     "patternProperties"),
    ({"properties": {f"p{i}": {} for i in range(engine_grammar.ROW_ITEMS)}}, "optional properties in a row"),
    ({"pattern": "a" * (MAX_PATTERN_CHARS + 1)}, "with those of data a \\$ref reads"),
])
def test_data_a_ref_reads_in_a_lark_grammars_json_is_bounded(grammars: Grammars, data: dict[str, Any],
                                                               what: str) -> None:
    """llguidance compiles the `default` data a `$ref` points into as a schema: in a Lark grammar's `%json` its
    properties, patternProperties keys, runs of optional properties and patterns are bounded as the schema's own (they
    were not counted: compiled, 5,001 properties in 2-3 s), the 400 naming the field; unread, the data is not."""
    def grammar(ref: bool) -> str:
        schema = {"$defs": {"d": {"default": data}}, "type": "object", "properties": {"a": {"type": "integer"}}}
        if ref:
            schema["properties"]["a"] = {"$ref": "#/$defs/d/default"}
        return f"start: j\nj: %json {json.dumps(schema)}"
    with pytest.raises(InvalidRequest, match=what) as refused:
        grammars.from_text("grammar", grammar(True), "guided_grammar")
    assert refused.value.param == "guided_grammar"
    grammars.from_text("grammar", grammar(False), "guided_grammar")


@pytest.mark.parametrize("auto", [False, True])
def test_a_firm_tools_schema_is_checked_by_the_calls_grammars_compile_only(grammars: Grammars,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          auto: bool) -> None:
    """llguidance's check of a schema costs as much as its compile (64 K of `(?i)\\p{L}` patterns: 2.2 s): a strict or
    forced tool's was checked alone, then compiled again in the calls' grammar (two forced tools holding them: 4.85 s
    of CPU, now 2.35 s). Only a lenient tool's is checked alone (refused, its calls are free); a firm one's 400 is the
    calls' grammar's, with llguidance's reason and naming the function."""
    validated: list[str] = []
    real = engine_grammar.LLMatcher.validate_grammar
    monkeypatch.setattr(engine_grammar.LLMatcher, "validate_grammar",
                        staticmethod(lambda text: validated.append(text) or real(text)))
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}
    tools = [ToolSpec("ok", {"type": "object", "properties": {"b": {"type": "integer"}}}, strict=True),
             ToolSpec("bad", bad, strict=True)]
    with pytest.raises(InvalidRequest, match="(?s)regex parse error.*unclosed group") as refused:
        structured._tool_calls(grammars, tools, True, None, auto, ("firm", str(auto)))
    assert refused.value.param == "tools"
    assert "(at the parameters of function 'bad':" in str(refused.value) and "%json" not in str(refused.value)
    lenient = [ToolSpec("ok", tools[0].parameters, strict=True), ToolSpec("bad", bad)]
    calls = structured._tool_calls(grammars, lenient, True, None, True, ("lenient", str(auto)))
    assert '"pattern"' not in calls.text  # its calls free: checked alone, refused
    assert len(validated) == 1


def test_a_run_of_optional_properties_counts_those_allof_merges_in(tokenizer: PreTrainedTokenizerFast,
                                                                    grammars: Grammars) -> None:
    """llguidance merges an object's `allOf` subschemas into it (its own properties first, then theirs in turn): two
    of 250 optional properties are one run of 500, whose answer fails at its first key after the compile (each
    alone passed the bound); a `required` from `allOf` breaks the object's own run of 600, served (was refused)."""
    def optional(start: int, stop: int) -> dict[str, Any]:
        return {"properties": {f"p{i}": {"type": "integer"} for i in range(start, stop)}}
    merged = {"type": "object", "allOf": [optional(0, 250), optional(250, 500)]}
    matcher = grammars.json_schema(merged, strict=False, param=FIELD).matcher()
    assert not all(matcher.consume_token(token) for token in tokenizer.encode('{"p0": 1}'))
    with pytest.raises(InvalidRequest, match="500 optional properties in a row") as refused:
        ecma_patterns(merged, FIELD)
    assert refused.value.param == FIELD
    broken = {"type": "object", **optional(0, 600), "allOf": [{"required": ["p300"]}]}
    matcher = grammars.json_schema(ecma_patterns(broken, FIELD), strict=False, param=FIELD).matcher()
    tokens = tokenizer.encode('{"p0": 1, "p300": 2}')
    assert matcher.validate_tokens(tokens) == len(tokens)


def _optional(prefix: str, count: int) -> dict[str, Any]:
    return {f"{prefix}{i}": {"type": "integer"} for i in range(count)}


def _object(prefix: str, count: int, **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": _optional(prefix, count), **more}


def _required_first(first: dict[str, Any], prefix: str, count: int, last: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """An object of the required properties `first`, `count` optional ones, then the required `last`."""
    last = last or {}
    return {"type": "object", "properties": {**first, **_optional(prefix, count), **last}, "required": [*first, *last]}


# (the schema of n, the answers that take its runs' first keys, the largest n llguidance follows)
MERGED_LAYOUTS = {
    "anyOf of two objects": (lambda n: {"anyOf": [_object("a", n), _object("b", n)]}, [{"a0": 1}, {"b0": 1}], 248),
    "oneOf of two objects": (lambda n: {"oneOf": [_object("a", n), _object("b", n)]}, [{"a0": 1}, {"b0": 1}], 248),
    "anyOf of two objects' runs before a required property": (
        lambda n: {"anyOf": [{"type": "object", "properties": {**_optional("a", n), "ra": {}}, "required": ["ra"]},
                             {"type": "object", "properties": {**_optional("b", n), "rb": {}}, "required": ["rb"]}]},
        [{"a0": 1, "ra": 1}, {"b0": 1, "rb": 1}], 333),
    "anyOf of a $ref twice and two objects": (
        lambda n: {"$defs": {"A": _object("a", n)}, "anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/A"},
                                                              _object("b", n), _object("c", n)]},
        [{"a0": 1}, {"b0": 1}], 164),
    "nested anyOf beside a string": (
        lambda n: {"type": "object", "properties": {"x": {"anyOf": [{"anyOf": [_object("a", n)]}, {"type": "string"},
                                                                    _object("b", n)]}}},
        [{"x": {"a0": 1}}, {"x": {"b0": 1}}], 248),
    "own properties merged into each anyOf object": (
        lambda n: {**_object("p", n), "anyOf": [{"properties": _optional("q", n)}, {"type": "string"}]},
        [{"p0": 1}, {"q0": 1}], 249),
    "own properties and an allOf $ref's": (
        lambda n: {"$defs": {"R": {"properties": _optional("q", n)}}, **_object("p", n),
                   "allOf": [{"$ref": "#/$defs/R"}]},
        [{"p0": 1}, {"q0": 1}], 249),
    "an allOf $ref's required breaking the run": (
        lambda n: {"$defs": {"R": {"properties": {"r": {}}, "required": ["r"]}}, **_object("p", n),
                   "allOf": [{"$ref": "#/$defs/R"}]},
        [{"p0": 1, "r": 1}], 666),
    "closed by an allOf subschema": (
        lambda n: {"type": "object", "allOf": [{"properties": _optional("p", n), "additionalProperties": False}]},
        [{"p0": 1}], 500),
    "a required name not in properties": (lambda n: _object("p", n, required=["zz"]), [{"p0": 1, "zz": 1}], 666),
    "an allOf of [required r] then [n optional]": (
        lambda n: {"type": "object", "allOf": [{"properties": {"r": {}}, "required": ["r"]}, _object("p", n)]},
        [{"r": 1, "p0": 1}], 998),
    "an allOf of [n optional] then [required r]": (
        lambda n: {"type": "object", "allOf": [{"properties": _optional("p", n)}, {"required": ["r"]}]},
        [{"p0": 1, "r": 1}], 666),
    "nested allOf subschemas after own required r": (
        lambda n: {"type": "object", "properties": {"r": {}}, "required": ["r"],
                   "allOf": [{"allOf": [{"properties": _optional("p", n)}]}]},
        [{"r": 1, "p0": 1}], 998),
    "an allOf subschema a $ref also names": (
        lambda n: {"type": "object", "properties": {
            "m": {"type": "object", "allOf": [{"properties": {"r": {}}, "required": ["r"]}, _object("p", n)]},
            "alone": {"$ref": "#/properties/m/allOf/1"}}},
        [{"alone": {"p0": 1}}], 498),
    "an allOf of [n optional] written before own required r": (
        lambda n: {"type": "object", "allOf": [{"properties": _optional("p", n)}], "properties": {"r": {}},
                   "required": ["r"]},
        [{"p0": 1, "r": 1}], 666),
    "own r written before an allOf of [n optional], required after": (
        lambda n: {"type": "object", "properties": {"r": {}}, "allOf": [{"properties": _optional("p", n)}],
                   "required": ["r"]},
        [{"r": 1, "p0": 1}], 998),
    "a $ref to [required r] written before own n optional": (
        lambda n: {"$defs": {"R": {"properties": {"r": {}}, "required": ["r"]}}, "type": "object",
                   "$ref": "#/$defs/R", "properties": _optional("p", n)},
        [{"r": 1, "p0": 1}], 998),
    "own n optional written before a $ref to [required r]": (
        lambda n: {"$defs": {"R": {"properties": {"r": {}}, "required": ["r"]}}, "type": "object",
                   "properties": _optional("p", n), "$ref": "#/$defs/R"},
        [{"p0": 1, "r": 1}], 666),
    "a $ref to an allOf of [required r][10 optional] written before n optional": (
        lambda n: {"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "properties": _optional("z", n)}},
                   "$defs": {"A": {"type": "object", "allOf": [{"properties": {"r": {}}, "required": ["r"]},
                                                               {"properties": _optional("p", 10)}]}}},
        [{"a": {"r": 1, "z0": 1}}], 988),
    "an anyOf of two objects written before own required r": (
        lambda n: {"type": "object", "anyOf": [{"properties": _optional("a", n)}, {"properties": _optional("b", n)}],
                   "properties": {"r": {}}, "required": ["r"]},
        [{"a0": 1, "r": 1}, {"b0": 1, "r": 1}], 333),
    "options extending one $ref target, written first": (
        lambda n: {"$defs": {"X": _object("x", 1)}, "anyOf": [
            {"$ref": "#/$defs/X"}, {"$ref": "#/$defs/X", "properties": _optional("q", n)},
            {"$ref": "#/$defs/X", "properties": _optional("s", n)}]},
        [{"x0": 1, "q0": 1}, {"x0": 1, "s0": 1}], 245),
    "an anyOf of $refs before own required r, an allOf $ref to one after": (
        lambda n: {"$defs": {"X": {"properties": _optional("p", n)}, "Y": {"properties": _optional("y", n)}},
                   "type": "object", "anyOf": [{"$ref": "#/$defs/X"}, {"$ref": "#/$defs/Y"}],
                   "properties": {"r": {}}, "required": ["r"], "allOf": [{"$ref": "#/$defs/X"}]},
        [{"p0": 1, "r": 1}, {"y0": 1, "r": 1}], 333),
    **{f"an anyOf of {k} objects beginning with the same required id": (
        lambda n, k=k: {"anyOf": [_required_first({"id": {"type": "integer"}}, c, n) for c in "abcd"[:k]]},
        [{"id": 1, "a0": 1}, {"id": 1, "b0": 1}], bound) for k, bound in ((2, 498), (4, 248))},
    "four objects extending a $ref'd base of required id": (
        lambda n: {"$defs": {"Base": _required_first({"id": {"type": "integer"}}, "", 0)},
                   "anyOf": [{"$ref": "#/$defs/Base", "properties": _optional(c, n)} for c in "abcd"]},
        [{"id": 1, "a0": 1}, {"id": 1, "d0": 1}], 248),
    "two objects sharing required id and z, runs between": (
        lambda n: {"anyOf": [_required_first({"id": {}}, c, n, {"z": {}}) for c in "ab"]},
        [{"id": 1, "a0": 1, "z": 1}, {"id": 1, "b0": 1, "z": 1}], 499),
    "a const discriminator beside an unconstrained one": (
        lambda n: {"anyOf": [_required_first({"k": {"const": "a"}}, "a", n),
                             _required_first({"k": {"type": "string"}}, "b", n)]},
        [{"k": "a", "a0": 1}, {"k": "a", "b0": 1}], 498),
    "four objects told apart by a const discriminator": (
        lambda n: {"anyOf": [_required_first({"k": {"enum": [c]}}, c, n) for c in "abcd"]},
        [{"k": "a", "a0": 1}, {"k": "d", "d0": 1}], 998),
}


@pytest.mark.parametrize("layout", MERGED_LAYOUTS)
def test_a_run_of_optional_properties_is_bounded_as_llguidance_merges_and_alternates_objects(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars, layout: str) -> None:
    """llguidance's row where a value begins holds the first run of each of its anyOf or oneOf objects (two of 250
    optional properties: 2 x 1,007 items; each alone passed the bound, and the answer failed at `{"a0"` after the
    compile), each merged with the object's own properties, a `$ref`'s target counted once; it merges an allOf
    `$ref`'s target (not followed: two halves of 250 passed), is closed by an allOf subschema's additionalProperties
    (was read from the object's own: 499-500 refused) and puts a required name not in `properties` after them (was
    ignored: 499-666 refused); an `allOf` subschema is counted in the object it merges into, not alone as well (its
    runs of 499-998 after a required one were refused) unless a `$ref` names it; the parts merge in the order their
    keys are written (an allOf before own `properties` runs before them: 667-998 were served and failed at `{"p0"`; a
    `$ref` to a required r before them was refused from 667; an anyOf before them, its options' runs before them: two
    of 334-498 were served and failed). Options that begin with the same required properties, whose values no
    `const` tells apart, share the row after them too (four of [required id][n optional]: 248; up to 998 were served
    and failed, "Current row has 2412 items"); options extending one `$ref` target are each counted (245, was 497).
    At the bound the answers follow; one more fails there, and is refused before."""
    schema, answers, bound = MERGED_LAYOUTS[layout]
    assert _follows(tokenizer, grammars, schema(bound), answers)
    assert not _follows(tokenizer, grammars, schema(bound + 1), answers)
    assert ecma_patterns(schema(bound), FIELD) == schema(bound)
    with pytest.raises(InvalidRequest, match="optional properties") as refused:
        ecma_patterns(schema(bound + 1), FIELD)
    assert refused.value.param == FIELD


def _follows(tokenizer: PreTrainedTokenizerFast, grammars: Grammars, schema: dict[str, Any],
             answers: list[Any]) -> bool:
    """Whether llguidance, compiling `schema` as it is, follows each of the `answers`."""
    for answer in answers:
        matcher = grammars.json_schema(schema, strict=False, param=FIELD).matcher()
        if not all(matcher.consume_token(token) for token in tokenizer.encode(json.dumps(answer))):
            return False
    return True


def test_options_read_alike_from_a_property_required_in_one_share_the_row_after_it(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars) -> None:
    """After `{"x": 1,` llguidance holds both `[required x][n optional]` and `[optional x][n optional]` (their runs
    from there, 2 items each and 3 more, 4 each and 7 more): the answer fails past 332, though each alone passed to
    497, and 333-497 were served. Now refused from 332 (a run's row taken where an optional property was read: 1
    short of llguidance's)."""
    def schema(n: int) -> dict[str, Any]:
        return {"anyOf": [_required_first({"x": {"type": "integer"}}, "a", n),
                          {"type": "object", "properties": {"x": {"type": "integer"}, **_optional("b", n)}}]}
    _alike_bound(tokenizer, grammars, schema, [{"x": 1, "a0": 1}, {"x": 1, "b0": 1}], 332, 331, "x")


def _alike_bound(tokenizer: PreTrainedTokenizerFast, grammars: Grammars, schema: Callable[[int], dict[str, Any]],
                 answers: list[Any], follows: int, served: int, name: str) -> None:
    """llguidance follows the answers to schema(follows), not one more; ours serves schema(served) and refuses one
    more, its options going on alike from property `name`."""
    assert _follows(tokenizer, grammars, schema(follows), answers)
    assert not _follows(tokenizer, grammars, schema(follows + 1), answers)
    assert ecma_patterns(schema(served), FIELD) == schema(served)
    with pytest.raises(InvalidRequest, match=f"go on alike from their property '{name}'") as refused:
        ecma_patterns(schema(served + 1), FIELD)
    assert refused.value.param == FIELD


@pytest.mark.parametrize(("first", "second"), [(1, 1.0), (100, 1e2), ({"t": 1}, {"t": 1.0}), (2**53, 2**53 + 1)])
def test_consts_llguidance_reads_as_one_value_do_not_tell_options_apart(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars, first: Any, second: Any) -> None:
    """llguidance reads a number by its value: after `{"k": 1,` it holds both `[required k const 1][n]` and `[required
    k const 1.0][n]`, and the answer fails past 498 (each alone 997, ours was: 499-997 were served and failed, "Current
    row has 2406 items"). A const holding a float, or an object or array, tells no option apart: the rows sum (2 x
    (2n + 3) past 2,000 from 499, as llguidance's)."""
    def schema(n: int) -> dict[str, Any]:
        return {"anyOf": [_required_first({"k": {"const": value}}, "a", n) for value in (first, second)]}
    _alike_bound(tokenizer, grammars, schema, [{"k": first, "a0": 1}], 498, 498, "k")


def test_distinct_scalar_consts_tell_options_apart_true_from_1(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars) -> None:
    """Strings, integers, booleans and null are told apart by type and value (`true` is not `1`, as Python's hash
    has it): each option's row alone, 600 served as llguidance follows it (test above's control, 2 and 2.5 alike)."""
    values = (True, 1, None, "1", 2**53, 2**53 + 2, -2**53 - 2)  # f64s past 2**53: even ones held exactly
    schema = {"anyOf": [_required_first({"k": {"const": value}}, "a", 600) for value in values]}
    assert ecma_patterns(schema, FIELD) == schema
    assert _follows(tokenizer, grammars, schema, [{"k": value, "a0": 1} for value in values])


def _chain(links: int) -> dict[str, Any]:
    """A string behind `links` nested allOf wrappers."""
    node: dict[str, Any] = {"type": "string"}
    for _ in range(links):
        node = {"allOf": [node]}
    return node


# (a schema whose object merges many parts, an answer llguidance fails at its first key, the 400 it is)
MANY_PARTS = {
    "100 allOf subschemas of 5 optional properties": (
        {"type": "object", "allOf": [{"properties": _optional(f"m{p}_", 5)} for p in range(100)]}, {"m0_0": 1},
        f"merges more than {engine_grammar.MAX_PARTS} schemas"),
    "63 allOf subschemas with none, then 5 of 100": (  # the 63 annotations alone, links: the 500 counted, one run
        {"type": "object", "allOf": [*({"description": "x"} for _ in range(63)),
                                     *({"properties": _optional(f"k{p}_", 100)} for p in range(5))]}, {"k0_0": 1},
        "500 optional properties in a row"),
    "100 allOf subschemas of an anyOf of 5": (
        {"type": "object", "allOf": [{"anyOf": [{"properties": _optional(f"m{p}_", 5)}]} for p in range(100)]},
        {"m0_0": 1}, f"merges more than {engine_grammar.MAX_PARTS} schemas"),
    "110 60-link allOf chains beside 500": (  # the chains' walks spend the work before "big" is reached
        {"type": "object", "properties": {"big": {"type": "object", "properties": _optional("p", 500)},
                                          **{f"c{c}": _chain(60) for c in range(110)}},
         "required": [f"c{c}" for c in range(110)]}, {"big": {"p0": 1}}, "500 optional properties in a row|too many"),
    "120 $refs of 2,000 required names before 600 optional merged by $ref": (
        {"$defs": {"R": {"type": "object", "required": [f"r{r}" for r in range(2000)]},
                   "H": {"properties": _optional("h", 300)}},
         "type": "object", "properties": {"bad": {"$ref": "#/$defs/H", "properties": _optional("p", 300)},
                                          **{f"x{x}": {"$ref": "#/$defs/R"} for x in range(120)}}},
        {"bad": {"p0": 1}}, "optional properties in a row|too many"),
    "two deprecated $refs of 250 optional in an anyOf": (  # `deprecated` beside a `$ref`: two copies, not a link
        {"$defs": {"A": {"type": "object", "properties": _optional("p", 250)}},
         "anyOf": [{"$ref": "#/$defs/A", "deprecated": True}, {"$ref": "#/$defs/A", "deprecated": True}]},
        {"p0": 1}, "items in one parser row"),
    "250 optional beside an allOf's anyOf of two": (  # options reached through allOf share the row
        {"type": "object", "properties": _optional("p", 250),
         "allOf": [{"anyOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}]},
        {"p0": 1}, "items in one parser row"),
}


def test_an_object_named_by_many_refs_is_merged_once() -> None:
    """60 pydantic-style models of 60 `Optional[Model]` fields (`anyOf: [{$ref}, {type: null}]`, default None), which
    llguidance compiles: each `$ref` merged its target's names again, past the walk's work (a 400)."""
    models = {f"M{m}": {"type": "object", "properties": {
        f"f{f}": {"anyOf": [{"$ref": f"#/$defs/M{(m + f + 1) % 60}"}, {"type": "null"}], "default": None}
        for f in range(60)}} for m in range(60)}
    schema = {"$defs": models, "$ref": "#/$defs/M0"}
    assert ecma_patterns(schema, FIELD) == schema


@pytest.mark.parametrize("schema", [
    {"type": "string", "allOf": [{"minLength": i} for i in range(70)]},
    {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(100)} | {"d100": {"type": "integer"}},
     "$ref": "#/$defs/d0"},
    {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}", "default": i} for i in range(100)}
     | {"d100": {"type": "integer"}}, "$ref": "#/$defs/d0"},
    {"$defs": {"x": {"type": "string", "allOf": [{"minLength": i} for i in range(70)]}}, "$ref": "#/$defs/x"},
    {"allOf": [{"type": "string"}, *({"minLength": i} for i in range(70))]},
], ids=["a string of 70 allOf parts", "a 100-link $ref chain", "a 100-link $ref chain with defaults",
        "a $ref to a string of 70 allOf parts", "an allOf of a string and 70 parts"])
def test_links_and_other_types_are_not_counted_as_objects(schema: dict[str, Any]) -> None:
    """A schema whose `type` is not an object merges into no object, and a link (`$ref` beside annotations at most)
    merges nothing of its own: a string's `allOf` of 70 minLengths and a 100-link `$ref` chain to an integer, which
    llguidance compiles, were refused as objects merging more than 64 schemas."""
    assert ecma_patterns(schema, FIELD) == schema


@pytest.mark.parametrize("layout", MANY_PARTS)
def test_an_object_merging_more_parts_than_are_counted_is_refused(tokenizer: PreTrainedTokenizerFast,
                                                                  grammars: Grammars, layout: str) -> None:
    """An object's runs of optional properties are counted over at most MAX_PARTS merged parts (itself, `$ref`
    targets, `allOf` subschemas): past them the walk counted the first 64 only, so 500 optional properties in 101
    parts were served, and the answer failed at its first key after the compile. Now the 400 naming the field; 64
    parts are still counted and served, 65 refused."""
    schema, answer, refusal = MANY_PARTS[layout]
    matcher = grammars.json_schema(schema, strict=False, param=FIELD).matcher()
    assert not all(matcher.consume_token(token) for token in tokenizer.encode(json.dumps(answer)))
    with pytest.raises(InvalidRequest, match=refusal) as refused:
        ecma_patterns(schema, "tools")
    assert refused.value.param == "tools"
    def parts(count: int) -> dict[str, Any]:
        return {"type": "object", "allOf": [{"properties": {f"p{p}": {}}} for p in range(count - 1)]}
    assert ecma_patterns(parts(engine_grammar.MAX_PARTS), FIELD) == parts(engine_grammar.MAX_PARTS)
    with pytest.raises(InvalidRequest, match="merges more than"):
        ecma_patterns(parts(engine_grammar.MAX_PARTS + 1), FIELD)


def test_pydantics_decimal_pattern_is_served_by_the_same_language_without_lookahead(
        tokenizer: PreTrainedTokenizerFast, grammars: Grammars) -> None:
    """pydantic's schema of a `Decimal` given as a string is a pattern with a lookahead, which llguidance refuses (a
    model with a Decimal field was a 400). That pattern alone is served as one without it: equal on every string of
    up to 6 characters of an alphabet holding each character it names, a digit of each kind, a letter, a space and a
    non-ASCII digit (ECMA's `\\d` is ASCII: Python's `re` with ASCII is the oracle), and on 20,000 longer ones; a
    newline stays out, where Python's `$` differs from ECMA's. The grammar takes what the pattern takes. Another
    look-around is left as sent (llguidance's 400 quotes it)."""
    sent, served = (re.compile(p, re.ASCII) for p in (schema_patterns.DECIMAL_PATTERN, schema_patterns.DECIMAL_SERVED))
    alphabet = "+-.09e \u0663"
    strings = ["".join(chars) for n in range(7) for chars in itertools.product(alphabet, repeat=n)]
    rng = random.Random(32)
    strings += ["".join(rng.choices("+-.0123456789" if rng.random() < 0.8 else alphabet, k=rng.randint(7, 40)))
                for _ in range(20_000)]
    differ = [s for s in strings if bool(sent.search(s)) != bool(served.search(s))]
    assert differ == [] and sum(bool(sent.search(s)) for s in strings) > 1_000
    schema = {"type": "string", "pattern": schema_patterns.DECIMAL_PATTERN}
    assert ecma_patterns(schema, FIELD) == {"type": "string", "pattern": schema_patterns.DECIMAL_SERVED}
    for text in ("-0012.50", "+.5", "7.", "0", ".", "+", "", "1.2.3", "1e5", "--1"):
        matcher = grammars.json_schema(ecma_patterns(schema, FIELD), strict=True, param=FIELD).matcher()
        tokens = tokenizer.encode(json.dumps(text)) + [tokenizer.eos_token_id]
        assert (matcher.validate_tokens(tokens) == len(tokens)) == bool(sent.search(text)), text
    other = {"type": "string", "pattern": "^(?!^[-+]*$)[+-]?\\d*$"}
    assert ecma_patterns(other, FIELD) == other
    with pytest.raises(InvalidRequest, match="look-around") as refused:
        grammars.json_schema(other, strict=True, param=FIELD)
    assert refused.value.param == FIELD
