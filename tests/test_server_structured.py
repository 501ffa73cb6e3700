"""Constrained decoding and logit_bias through `gunicorn -k gevent server:app` and the `openai` client.

The random-weight checkpoint writes garbage, but under a grammar only garbage the grammar accepts:
so its answers must validate against their schemas, whatever the seed. The schemas bound every
string, number and array, or a random model would fill them forever.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pydantic
import pytest
import requests

from chat_http import (
    HELD_S,
    MODEL,
    VLLM_CHAT_DEFAULTS,
    VLLM_COMPLETION_DEFAULTS,
    cpu_env,
    engine_idle,
    health_polled,
    most_held,
    post_chat,
    server_stats,
    sse_payloads,
)
from checkpoints import END_THINK_ID, ENDOFTEXT_ID, IM_END_ID, THINK_ID, TOKEN_IDS, make_checkpoint
from engine_util import GRAMMAR_FAILED
from nanoqwen.api import schema_patterns
from nanoqwen.api.errors import error_body
from nanoqwen.engine import grammar, grammar_rows
from schema_shapes import (
    ALIKE,
    HOP_CYCLE,
    NAMED_BESIDE_LOOSE,
    ONE_LOOSE_VALUE,
    hop_chain,
    many_patterns,
    named_and_own_pattern,
    named_beside_loose,
    one_loose_value,
    patterns_of_patterns,
    ref_chain,
)
from server_process import GunicornServer
from waits import wait_for

USER = [{"role": "user", "content": "Describe a person as JSON."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
CHOICES = 4
# Within the grammar bounds, but their lexer gives out within a token or two (LIMITS' fuel): the requests fail
COSTLY = "a{100000}"
COSTLY_OBJECT = {"type": "object", "properties": {"k": {"type": "string", "pattern": f"^{COSTLY}$"}}, "required": ["k"],
                 "additionalProperties": False}
COSTLY_FORMAT = {"type": "json_schema", "json_schema": {"name": "costly", "schema": COSTLY_OBJECT, "strict": True}}
COSTLY_TOOL = {"type": "function", "function": {"name": "costly", "parameters": COSTLY_OBJECT, "strict": True}}
BESIDE_TOKENS = 900  # a stream long enough to be generating while the failing requests come and go
PAST = grammar.MAX_PATTERN_CHARS + 1  # regex characters past the bound


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="1024")
    srv = GunicornServer(env, tmp_path_factory.mktemp("structured") / "gunicorn.log").start()
    yield srv
    srv.stop()


def _create(srv: GunicornServer, **body: Any) -> Any:
    body = {"model": MODEL, "messages": USER, "max_tokens": 80, **body}
    body["extra_body"] = {**NO_THINKING, **body.get("extra_body", {})}
    return srv.openai_client(timeout=300).chat.completions.create(**body)


def _streamed(srv: GunicornServer, **body: Any) -> list[dict[str, Any]]:
    """Each choice's message reassembled from the stream, as the SDKs do: content, and tool calls by index."""
    messages: dict[int, dict[str, Any]] = {}
    for chunk in _create(srv, stream=True, **body):
        for choice in chunk.choices:
            message = messages.setdefault(choice.index, {"content": "", "tool_calls": {}, "finish_reason": None})
            message["content"] += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                slot = message["tool_calls"].setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            message["finish_reason"] = choice.finish_reason or message["finish_reason"]
    return [messages[i] for i in sorted(messages)]


def _calls(message: Any) -> list[dict[str, str]]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def test_health_answers_while_the_first_grammar_compiles(server: GunicornServer) -> None:
    """The first grammar's compile holds no poll (llguidance's tokenizer, ~0.5 s of CPU with the GIL, is built with
    the model: test_load_holds checks that, which a bound of HELD_S cannot)."""
    with health_polled(server, interval=0.01) as polls:
        answer = _create(server, response_format=PERSON_FORMAT, temperature=0, max_tokens=64)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert len(polls) >= 3, len(polls)  # it really was in flight meanwhile
    assert max(p.held for p in polls) < HELD_S, most_held(polls)


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_answers_validate_whatever_the_seed(server: GunicornServer, seed: int) -> None:
    answer = _create(server, response_format=PERSON_FORMAT, n=CHOICES, seed=seed, temperature=1.0)
    streamed = _streamed(server, response_format=PERSON_FORMAT, n=CHOICES, seed=seed, temperature=1.0)
    for choice, stream in zip(answer.choices, streamed, strict=True):
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert stream["content"] == choice.message.content and stream["finish_reason"] == "stop"
    assert len({c.message.content for c in answer.choices}) > 1  # n choices sample independently


def _token_ids(srv: GunicornServer, text: str) -> list[int]:
    return requests.post(f"{srv.url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=30).json()["tokens"]


# ECMA-262's classes, as a JSON Schema `pattern` means them (Python's `re` would take Unicode's digits and letters)
ECMA_SPACES = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000\ufeff"
ECMA_CLASSES: dict[str, Callable[[str], bool]] = {
    "\\d": lambda c: c in "0123456789", "\\w": lambda c: c.isascii() and (c.isalnum() or c == "_"),
    "\\s": lambda c: c in ECMA_SPACES, "\\S": lambda c: c not in ECMA_SPACES}


@pytest.mark.parametrize("escape, biased", [
    ("\\d", "\u0663"),  # Arabic-Indic three: Unicode's digit, not ECMA's
    ("\\w", "\u00e9"),
    ("\\s", "\ufeff"),  # ECMA's space, not Unicode's White_Space (nor Rust's \s)
])
@pytest.mark.parametrize("where", ["response_format", "structured_outputs", "tools", "a $ref into default"])
def test_schema_patterns_are_ecma_regexes(server: GunicornServer, escape: str, biased: str, where: str) -> None:
    """A pattern's `\\d`, `\\w`, `\\s` and `\\S` are ECMA-262's, as JSON Schema says, wherever a schema is (in
    `default` data that a `$ref` points into too: llguidance reads it as a schema; its `\\s` was Rust's): the
    answer's character (its tokens biased to a character on the border of the class) is in ECMA's class,
    and is the biased one when ECMA's class takes it. `\\b` is refused by the grammar engine (a 400, below)."""
    schema = {"type": "string", "pattern": f"^a{escape}$"}  # "a" first: no token joins the quote and the character
    body: dict[str, Any] = {"max_tokens": 40, "temperature": 0,
                            "logit_bias": {str(token): 100 for token in _token_ids(server, biased)}}
    if where == "a $ref into default":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "c", "schema": {"$ref": "#/$defs/c/default", "$defs": {"c": {"default": schema}}}}}
    elif where == "response_format":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema,
                                                                          "strict": True}}
    elif where == "structured_outputs":
        body["extra_body"] = {"structured_outputs": {"json": schema}}
    else:
        body |= {"tool_choice": "required", "parallel_tool_calls": False, "tools": [{"type": "function", "function": {
            "name": "put", "parameters": {"type": "object", "properties": {"c": schema}, "required": ["c"],
                                          "additionalProperties": False}}}]}
    message = _create(server, **body).choices[0].message
    value = json.loads(message.tool_calls[0].function.arguments)["c"] if where == "tools" else json.loads(
        message.content)
    assert len(value) == 2 and value[0] == "a" and ECMA_CLASSES[escape](value[1]), (escape, value)
    assert (value[1] == biased) == ECMA_CLASSES[escape](biased), (escape, value)


def _spaces(count: int) -> dict[str, Any]:
    """An object whose one string's pattern is `count` `\\s`: past grammar.MAX_PATTERN_CHARS at 4,000."""
    return {"type": "object", "properties": {"k": {"type": "string", "pattern": "^" + "\\s" * count + "$"}},
            "required": ["k"], "additionalProperties": False}


def test_patterns_past_their_bound_are_a_400_naming_the_field(server: GunicornServer) -> None:
    """A schema whose patterns, `\\s` spelled out as ECMA's class, pass grammar.MAX_PATTERN_CHARS (4,000 `\\s`:
    8,000 characters sent, 72,000 rewritten) is the 400 naming the field that sent it, in chat and in Responses; 3,000
    (54,000) are served."""
    client = server.openai_client(timeout=300)
    with pytest.raises(openai.BadRequestError, match="patterns are longer than") as refused:
        _create(server, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": _spaces(4_000)}})
    assert refused.value.body["param"] == "response_format", refused.value.body
    with pytest.raises(openai.BadRequestError, match="patterns are longer than") as refused:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=16, text={"format": {
            "type": "json_schema", "name": "s", "schema": _spaces(4_000), "strict": True}})
    assert refused.value.body["param"] == "text.format", refused.value.body
    answer = _create(server, max_tokens=8, response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": _spaces(3_000), "strict": True}})  # `{"k": "`: 7 tokens at most
    assert answer.choices[0].message.content.startswith('{"k": "'), answer


@pytest.mark.parametrize("endpoint, extra, param", [
    ("completions", {"structured_outputs": {"regex": "a" * PAST}}, "structured_outputs.regex"),
    ("chat", {"guided_regex": "a" * PAST}, "guided_regex"),
    ("completions", {"guided_grammar": f"start: /{'a' * PAST}/"}, "guided_grammar"),
    ("chat", {"guided_grammar": f"start: /a\n{'b' * PAST}/"}, "guided_grammar"),  # a regex across lines
    ("completions", {"guided_grammar": f"# it's /x\nstart: /(?x) a\n {'b' * PAST}/"}, "guided_grammar"),
    ("chat", {"structured_outputs": {"grammar": "root ::= " + "[ab]" * 16_000}}, "structured_outputs.grammar"),
    ("completions", {"structured_outputs": {"grammar": "start: %json " + json.dumps({"type": "string", "pattern": "a"
                                                                                     * PAST})}},
     "structured_outputs.grammar"),
    ("chat", {"guided_grammar": "start: %regex " + json.dumps({"substring_words": "a " * (PAST // 2)})},
     "guided_grammar"),
])
def test_regexes_past_their_bound_are_a_400_naming_the_field(server: GunicornServer, endpoint: str,
                                                             extra: dict[str, Any], param: str) -> None:
    """A vLLM regex, or a Lark or GBNF grammar's regexes (its terminals, classes, `%json` patterns, `%regex`
    substrings), past grammar.MAX_PATTERN_CHARS in all is the 400 naming the field, chat and completions: llguidance
    held a compile thread ~35 s a megabyte (`(?i)\\p{L}`) before its own 400, new grammars queued behind it."""
    client = server.openai_client(timeout=300)
    with pytest.raises(openai.BadRequestError, match="longer than 65536 characters in all") as refused:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_body=extra)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"


# A grammar's syntax: its head, the piece repeated up to its bound (Lark's within llguidance's symbols), the bound and
# the words of its refusal
SYNTAXES = {
    "GBNF": ('root ::= "a" ', '"b"', grammar.MAX_GBNF_CHARS, "a GBNF grammar longer than"),
    "Lark": ('start: "a" ', f'"{"b" * 1_000}" ', grammar.MAX_LARK_CHARS, "a Lark grammar longer than"),
}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("endpoint, field", [("chat", "guided_grammar"), ("completions", "structured_outputs")])
def test_a_grammar_past_its_bound_is_a_400_naming_the_field(server: GunicornServer, endpoint: str, field: str,
                                                            syntax: str) -> None:
    """GBNF is converted to Lark in Python, holding the GIL (~1.6 s a megabyte, superlinear in its comment lines):
    past grammar.MAX_GBNF_CHARS a 400 naming the field before it is (literals alone were converted and served); at
    the bound, served. Lark is weighed in Python (~3-6 us a character: 4 MiB of `(a)?` took 16 s of a compile thread),
    and past grammar.MAX_LARK_CHARS, which takes more, is the 400 too."""
    client = server.openai_client(timeout=300)

    def create(text: str) -> Any:
        extra = {"guided_grammar": text} if field == "guided_grammar" else {"structured_outputs": {"grammar": text}}
        if endpoint == "chat":
            return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0,
                                                  extra_body={**NO_THINKING, **extra}).choices[0].message.content
        return client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0,
                                         extra_body=extra).choices[0].text
    head, piece, bound, refusal = SYNTAXES[syntax]
    at_bound = head + piece * ((bound - len(head)) // len(piece))
    at_bound += " " * (bound - len(at_bound))
    assert create(at_bound).startswith("a")
    with pytest.raises(openai.BadRequestError, match=f"{refusal} {bound}") as refused:
        create(at_bound + '"c"')
    param = "guided_grammar" if field == "guided_grammar" else "structured_outputs.grammar"
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"


def test_a_lark_grammar_nested_past_its_bound_is_a_400_naming_the_field_and_holds_no_poll(
        server: GunicornServer) -> None:
    """Groups nested 2 M deep (a 4 MB body): llguidance refuses a 29th level, but the row walk before it kept every
    open group, 14 s of a compile thread's CPU that held the GIL ~1 s at a time. Now a 400 naming the field at
    grammar_rows.MAX_NESTING, and /health is answered meanwhile; here as deep as grammar.MAX_LARK_CHARS allows."""
    deep = grammar.MAX_LARK_CHARS // 2 - 8
    with health_polled(server, interval=0.01) as polls, pytest.raises(
            openai.BadRequestError, match=f"nested more than {grammar_rows.MAX_NESTING} deep") as refused:
        server.openai_client(timeout=300).completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_grammar": f'start: {"[" * deep}"a"{"]" * deep}'})
    assert refused.value.body["param"] == "guided_grammar" and refused.value.body["type"] == "invalid_request_error"
    assert polls and max(p.held for p in polls) < HELD_S, most_held(polls)


def test_regexes_within_their_bound_and_long_literals_are_served(server: GunicornServer) -> None:
    """A regex of grammar.MAX_PATTERN_CHARS characters; a grammar's literal strings do not count (8 MB in 0.7 s)."""
    client = server.openai_client(timeout=300)
    for extra in ({"guided_regex": "a" * grammar.MAX_PATTERN_CHARS},
                  {"guided_grammar": f'start: /a{{1,2}}/ "{"b" * 4 * grammar.MAX_PATTERN_CHARS}"'}):
        answer = client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0, extra_body=extra)
        assert answer.choices[0].text.startswith("a"), answer


@pytest.mark.parametrize("tool_choice, strict", [("auto", {"strict": True}), ("required", {})])
def test_a_strict_or_forced_tools_patterns_past_their_bound_are_a_400_naming_tools(server: GunicornServer,
                                                                                   tool_choice: str,
                                                                                   strict: dict[str, bool]) -> None:
    tool = {"type": "function", "name": "f", "parameters": _spaces(4_000), **strict}
    with pytest.raises(openai.BadRequestError, match="patterns are longer than") as refused:
        server.openai_client(timeout=300).responses.create(model=MODEL, input="hi", max_output_tokens=16,
                                                           tools=[tool], tool_choice=tool_choice)
    assert refused.value.body["param"] == "tools", refused.value.body


def test_integral_float_counts_and_control_escapes_are_served(server: GunicornServer) -> None:
    """`"maxItems": 2.0` is an integer since JSON Schema draft 6, and ECMA's `\\cC` is U+0003: both were 400s (the
    grammar engine's "Expected positive integer", Rust's regex has no `\\c`); `2.5` stays a 400 naming the field,
    in chat and in Responses' `text.format`."""
    def schema(count: float) -> dict[str, Any]:
        return {"type": "object", "properties": {"k": {"type": "string", "pattern": "^\\cC$"}, "n": {
            "type": "array", "items": {"type": "boolean"}, "minItems": count, "maxItems": count}},
            "required": ["k", "n"], "additionalProperties": False}
    answer = _create(server, max_tokens=60, response_format={"type": "json_schema", "json_schema": {
        "name": "c", "schema": schema(2.0), "strict": True}})
    value = json.loads(answer.choices[0].message.content)
    assert value["k"] == "\x03" and len(value["n"]) == 2, value
    with pytest.raises(openai.BadRequestError, match="Expected positive integer") as refused:
        _create(server, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema(2.5)}})
    assert refused.value.body["param"] == "response_format", refused.value.body
    with pytest.raises(openai.BadRequestError, match="Expected positive integer") as refused:
        server.openai_client(timeout=300).responses.create(model=MODEL, input="hi", max_output_tokens=16, text={
            "format": {"type": "json_schema", "name": "c", "schema": schema(2.5), "strict": True}})
    assert refused.value.body["param"] == "text.format", refused.value.body


@pytest.mark.parametrize("where", ["response_format", "tools"])
def test_patternproperties_keys_made_one_regex_follow_each_subschema(server: GunicornServer, where: str) -> None:
    """`^k\\cJ?$` and `^k\\cj?$` are one regex once ECMA's `\\cX` is rewritten: a name they match follows both
    subschemas (the second had silently won: biased to "maybe", the answer took it), each value "no"."""
    schema = {"type": "object", "patternProperties": {"^k\\cJ?$": {"enum": ["yes", "no"]},
                                                      "^k\\cj?$": {"enum": ["no", "maybe"]}},
              "required": ["k"], "additionalProperties": False}
    body: dict[str, Any] = {"max_tokens": 80, "temperature": 0,
                            "logit_bias": {str(token): 100 for token in _token_ids(server, "maybe")}}
    if where == "tools":
        body |= {"tool_choice": "required", "parallel_tool_calls": False,
                 "tools": [{"type": "function", "function": {"name": "put", "parameters": schema}}]}
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "k", "schema": schema,
                                                                          "strict": True}}
    message = _create(server, **body).choices[0].message
    answer = message.tool_calls[0].function.arguments if where == "tools" else message.content
    pairs = json.loads(answer, object_pairs_hook=list)  # "k\\n" may follow (the regex takes it), "k" once at least
    assert ("k", "no") in pairs and all(value == "no" for _, value in pairs), answer


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_properties_past_their_bound_are_a_400_naming_the_field(server: GunicornServer, endpoint: str) -> None:
    """OpenAI's 5,000 `properties` in a schema (llguidance compiles one object's in time quadratic in them: 10,000,
    a 200 KB body, held a compile thread 16 s): one more is the 400 naming the field (was compiled and served)."""
    names = [f"p{i}" for i in range(grammar.MAX_PROPERTIES + 1)]
    schema = {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names}
    client = server.openai_client(timeout=300)
    with pytest.raises(openai.BadRequestError, match="properties in all") as refused:
        if endpoint == "chat":
            _create(server, max_tokens=2, response_format={"type": "json_schema", "json_schema": {
                "name": "p", "schema": schema}})
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_json": schema})
    assert refused.value.body["param"] == ("response_format" if endpoint == "chat" else "guided_json")


@pytest.mark.parametrize("where", ["response_format", "tools", "const data"])
def test_patternproperties_past_their_bound_are_a_400_naming_the_field(server: GunicornServer, where: str) -> None:
    """One object's patternProperties keys past the bound (llguidance checks them pairwise, worse than quadratic: 400
    keys, a 12 KB body, held a compile thread 20 s), in a subschema or in data a `$ref` reads: the 400 naming the
    field (was served)."""
    past = grammar.MAX_PATTERN_PROPERTIES + 1
    schema = {"type": "object", "patternProperties": {f"^k{i}$": {"type": "integer"} for i in range(past)}}
    if where == "const data":
        schema = {"$ref": "#/$defs/c/const", "$defs": {"c": {"const": schema}}}
    if where == "tools":
        body: dict[str, Any] = {"tool_choice": "required",  # a lenient tool under "auto": its calls any object
                                "tools": [{"type": "function", "function": {"name": "put", "parameters": schema}}]}
    else:
        body = {"response_format": {"type": "json_schema", "json_schema": {"name": "k", "schema": schema}}}
    with pytest.raises(openai.BadRequestError, match="patternProperties") as refused:
        _create(server, max_tokens=2, **body)
    param = "tools" if where == "tools" else "response_format"
    assert refused.value.body["param"] == param, refused.value.body


def test_a_requests_schemas_share_the_properties_bound_naming_the_largest_field(server: GunicornServer) -> None:
    """A strict tool under "auto" beside a JSON response_format: their schemas share the request's bound (each was
    bounded alone, so N tools cost N times it: 2 forced tools of 5,000 properties held a compile thread 33 s, load 11).
    At it in all, served, /health held < HELD_S; one more, the 400 naming response_format, the largest part (was
    served), the tool forced too; 2 forced tools past it in all (each within it), the 400 naming tools (was
    compiled)."""
    integer = {"type": "integer"}
    tool = {"type": "function", "function": {"name": "put", "strict": True, "parameters": {
        "type": "object", "properties": {f"t{i}": integer for i in range(10)}, "additionalProperties": False}}}
    nested = {f"o{j}": {"type": "object", "properties": {f"p{i}": integer for i in range(49)}} for j in range(99)}

    def answer(top: int) -> dict[str, Any]:  # 99 * 50 + top properties
        schema = {"type": "object", "properties": {**nested, **{f"q{i}": integer for i in range(top)}}}
        return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    at = grammar.MAX_PROPERTIES - 10 - 99 * 50
    with health_polled(server, interval=0.01) as polls:
        served = _create(server, max_tokens=2, tools=[tool], response_format=answer(at))
    assert served.choices[0].finish_reason in ("stop", "length")  # sampled: `{}` may end it
    assert max(p.held for p in polls) < HELD_S, most_held(polls)
    for choice in ("auto", {"type": "function", "function": {"name": "put"}}):  # forced: the answer compiled apart
        with pytest.raises(openai.BadRequestError, match="properties in all") as refused:
            _create(server, max_tokens=2, tools=[tool], tool_choice=choice, response_format=answer(at + 1))
        assert refused.value.body["param"] == "response_format", refused.value.body
    names = [f"p{i}" for i in range(grammar.MAX_PROPERTIES // 2 + 1)]
    forced = [{"type": "function", "function": {"name": f"f{k}", "parameters": {
        "type": "object", "properties": {name: integer for name in names}, "required": names}}} for k in range(2)]
    with pytest.raises(openai.BadRequestError, match="properties in all") as refused:
        _create(server, max_tokens=2, tools=forced, tool_choice="required")
    assert refused.value.body["param"] == "tools", refused.value.body
    # the request's schemas in all: no one tool's fault (it named f1, whose walk crossed the bound)
    assert "in the parameters of function" not in refused.value.body["message"], refused.value.body


@pytest.mark.parametrize("required, bound", [(False, 498), (True, 666)])
def test_a_run_of_optional_properties_past_the_parser_row_is_a_400_naming_the_field(server: GunicornServer,
                                                                                    required: bool, bound: int) -> None:
    """An object's optional properties in a row: llguidance's row where they may begin holds items in proportion, 4
    each and 7 more in a whole open object, 3 each and 1 more before a required property; past 2,000 the answer failed
    at its first token, after the compile (streamed: a 200, then the error event). The longest run within the bound
    is served, streamed too; one more is the 400 naming the field (before a required property, 499-666 were refused
    as if the run took the whole object)."""
    def answer(optional: int) -> dict[str, Any]:
        schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(optional)}}
        if required:
            schema["properties"]["r"] = {"type": "integer"}
            schema["required"] = ["r"]
        return {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    at = answer(bound)
    assert _create(server, max_tokens=8, response_format=at).choices[0].finish_reason in ("stop", "length")
    assert _streamed(server, max_tokens=8, response_format=at)[0]["finish_reason"] in ("stop", "length")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=f"{bound + 1} optional properties in a row") as refused:
            list(_create(server, max_tokens=8, stream=stream, response_format=answer(bound + 1)))
        assert refused.value.body["param"] == "response_format", refused.value.body


@pytest.mark.parametrize("used, bound", [("merged", 998), ("also alone", 498), ("written first", 666)])
def test_an_allof_subschemas_run_is_bounded_where_llguidance_uses_it(server: GunicornServer, used: str,
                                                                      bound: int) -> None:
    """An object's `allOf` of [a required property] then [optional properties]: llguidance merges the run after the
    required one (2 items each, 3 more), and never compiles the subschema alone; checked alone too (4 each, 7 more),
    runs of 499-998 were refused. Where a `$ref` also names the subschema, used alone as a value, the whole-object
    bound holds (past it the answer fails at its first key). An `allOf` of the optional ones written before the
    object's own required property merges first, the run before it (3 each, 1 more: 667-998 were served and failed at
    the first key), its answer's first key one the schema names. At the bound served, streamed too; one more the 400
    naming the field, before any event."""
    def answer(optional: int) -> dict[str, Any]:
        run = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(optional)}}
        required = {"properties": {"r": {"type": "integer"}}, "required": ["r"]}
        merged = {"type": "object", "allOf": [required, run]}
        schema = {"merged": merged, "written first": {"type": "object", "allOf": [run], **required},
                  "also alone": {"type": "object", "properties": {"m": merged,
                                                                  "alone": {"$ref": "#/properties/m/allOf/1"}}}}[used]
        return {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    served = _create(server, max_tokens=24, response_format=answer(bound)).choices[0]
    streamed = _streamed(server, max_tokens=24, response_format=answer(bound))[0]
    assert served.finish_reason in ("stop", "length") and streamed["finish_reason"] in ("stop", "length")
    if used == "written first":  # r is required: the answer names a key first, r or one of the run's
        for content in (served.message.content, streamed["content"]):
            key = re.match(r'\{"(r|p(\d+))": ', content or "")
            assert key is not None and (key[2] is None or int(key[2]) < bound), content
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=f"{bound + 1} optional properties in a row") as refused:
            _create(server, max_tokens=8, stream=stream, response_format=answer(bound + 1))
        assert refused.value.body["param"] == "response_format", refused.value.body


@pytest.mark.parametrize("reached", ["alone", "through allOf", "through $ref"])
def test_anyof_objects_whose_first_runs_pass_the_parser_row_are_a_400_before_any_event(server: GunicornServer,
                                                                                     reached: str) -> None:
    """llguidance's row where an anyOf value begins holds each object's first run (4 items a property, 7 more): two
    objects of 249 optional properties each passed the bound alone, compiled, and the answer failed at its first key
    (streamed: a 200, then the error); so did an object's own optional properties merged into options of one it
    reached through an allOf or a `$ref`, which were not summed. Two of 248 are served, streamed too; of 249 the 400
    naming the field, before any event."""
    def answer(optional: int) -> dict[str, Any]:
        def properties(prefix: str, count: int) -> dict[str, Any]:
            return {f"{prefix}{i}": {"type": "integer"} for i in range(count)}
        if reached == "alone":
            schema = {"anyOf": [{"type": "object", "properties": properties(name, optional)} for name in "ab"]}
        else:  # the object's own, and one more in each option
            options = {"anyOf": [{"properties": properties(name, 1)} for name in "ab"]}
            schema = {"type": "object", "properties": properties("p", optional - 1)} | (
                {"allOf": [options]} if reached == "through allOf" else {"$defs": {"o": options}, "$ref": "#/$defs/o"})
        return {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    assert _create(server, max_tokens=8, response_format=answer(248)).choices[0].finish_reason in ("stop", "length")
    assert _streamed(server, max_tokens=8, response_format=answer(248))[0]["finish_reason"] in ("stop", "length")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="anyOf or oneOf objects .* 2006 items") as refused:
            _create(server, max_tokens=8, stream=stream, response_format=answer(249))
        assert refused.value.body["param"] == "response_format", refused.value.body


@pytest.mark.parametrize("written", ["whole", "extending a $ref'd base"])
def test_anyof_objects_beginning_with_the_same_required_key_share_the_row_after_it(server: GunicornServer,
                                                                                   written: str) -> None:
    """llguidance holds every anyOf object whose keys and values so far it cannot tell apart: four objects beginning
    with a required integer `id`, then optional properties, share the row after the id (2 items each, 3 more), past
    which the answer failed after the compile ("Current row has 2412 items"; 249-998 were served). Four of 248 are
    served, collected and streamed, the answer going on past the id to a key (there, at 249, llguidance's "Current row
    has 2004 items"); of 249 the 400 naming the field, before any event."""
    def schema(optional: int) -> dict[str, Any]:
        def properties(prefix: str) -> dict[str, Any]:
            return {f"{prefix}{i}": {"type": "integer"} for i in range(optional)}
        id_first = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
        if written == "whole":
            return {"anyOf": [{**id_first, "properties": {"id": {"type": "integer"}, **properties(c)}} for c in "abcd"]}
        return {"$defs": {"Base": id_first},
                "anyOf": [{"$ref": "#/$defs/Base", "properties": properties(c)} for c in "abcd"]}

    def answer(optional: int) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": "o", "schema": schema(optional)}}
    # (seed 0: the random model writes a key after the id, an extra one, as the options are open)
    served = _create(server, max_tokens=16, seed=0, response_format=answer(248)).choices[0]
    streamed = _streamed(server, max_tokens=16, seed=0, response_format=answer(248))[0]
    assert served.finish_reason == streamed["finish_reason"] == "length"
    assert served.message.content == streamed["content"]
    assert re.match(r'\{"id": -?\d+, "', served.message.content or ""), served.message.content
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="alike from their property 'id' hold 2004") as refused:
            _create(server, max_tokens=8, stream=stream, response_format=answer(249))
        assert refused.value.body["param"] == "response_format", refused.value.body


@pytest.mark.parametrize("values", [(1, 1.0), (2**53, 2**53 + 1)], ids=["1-and-1.0", "2**53-and-2**53+1"])
def test_options_whose_consts_llguidance_reads_as_one_number_share_the_row_after_them(
        server: GunicornServer, values: tuple[Any, Any]) -> None:
    """llguidance reads a number as an f64: after `{"k": 1,` it holds both `[required k const 1][n optional]` and
    `[required k const 1.0][n optional]` (2**53 and 2**53 + 1 alike), so their rows after k add up, past 2,000 from 499
    (served to 997 before, the answer failing at its first key): the 400 naming the field, before any event."""
    schema = {"anyOf": [{"type": "object", "properties": {"k": {"const": value}, **{
        f"a{i}": {"type": "integer"} for i in range(499)}}, "required": ["k"]} for value in values]}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="alike from their property 'k'") as refused:
            _create(server, max_tokens=8, stream=stream, response_format={
                "type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
        assert refused.value.body["param"] == "response_format", refused.value.body


def test_a_lark_grammars_json_schemas_past_the_bounds_are_a_400_naming_the_field(server: GunicornServer) -> None:
    """A Lark grammar's `%json` schemas were bounded by their patterns only (10,000 properties held a compile thread
    41 s, load 10, and were served): their properties in all and each object's patternProperties keys are bounded as
    a request's schemas are, the 400 naming the field."""
    names = [f"p{i}" for i in range(grammar.MAX_PROPERTIES + 1)]
    many = {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names}
    keys = {"type": "object", "patternProperties": {
        f"^k{i}$": {"type": "integer"} for i in range(grammar.MAX_PATTERN_PROPERTIES + 1)}}
    client = server.openai_client(timeout=300)
    for schema, what in ((many, "properties in all"), (keys, "patternProperties")):
        with pytest.raises(openai.BadRequestError, match=what) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                      extra_body={"guided_grammar": f"start: %json {json.dumps(schema)}"})
        assert refused.value.body["param"] == "guided_grammar", refused.value.body


def test_a_ref_reading_a_space_class_in_const_data_is_a_400_naming_the_field(server: GunicornServer) -> None:
    """llguidance reads it as a schema with Rust's `\\s` (it took U+0085, refused U+FEFF), and the const value must
    match as sent: not rewritten, refused."""
    schema = {"$ref": "#/$defs/c/const", "$defs": {"c": {"const": {"type": "string", "pattern": "^a\\s$"}}}}
    with pytest.raises(openai.BadRequestError, match="in const data") as refused:
        _create(server, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert refused.value.body["param"] == "response_format", refused.value.body


# The wire data pydantic 2.13 and older send for a Decimal's string, written out: the server's DECIMAL_PATTERN must
# keep matching it, whatever pydantic this suite runs with.
PYDANTIC_2_13_DECIMAL_PATTERN = r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$"


class Priced(pydantic.BaseModel):
    """A Decimal as pydantic before 2.14 writes its schema: a number, or a string of its lookahead pattern (llguidance
    has no look-around). pydantic 2.14 writes a string without a pattern, which the random model does not end within
    max_tokens (the parse's LengthFinishReasonError)."""

    price: Annotated[Decimal, pydantic.WithJsonSchema(
        {"anyOf": [{"type": "number"}, {"type": "string", "pattern": PYDANTIC_2_13_DECIMAL_PATTERN}]})]
    currency: Literal["EUR", "USD"]


def test_a_pydantic_model_with_a_decimal_field_is_parsed(server: GunicornServer) -> None:
    """`client.chat.completions.parse` of a model with a Decimal field, whose schema pattern is a lookahead, was a 400
    naming response_format: served by the same language without it, each answer (the random model writes the price
    as a string) parses as the model. Another lookahead is still the 400 naming the field, quoting the pattern."""
    assert schema_patterns.DECIMAL_PATTERN == PYDANTIC_2_13_DECIMAL_PATTERN
    client = server.openai_client(timeout=300)
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 80, "temperature": 1.0, "extra_body": NO_THINKING}
    prices = [client.chat.completions.parse(response_format=Priced, seed=seed, **kwargs).choices[0].message.parsed
              for seed in range(3)]
    assert all(isinstance(price, Priced) for price in prices), prices
    schema = {**Priced.model_json_schema(), "additionalProperties": False}
    schema["properties"]["price"]["anyOf"][1]["pattern"] = "^(?!^[-+]*$)[+-]?\\d*$"
    with pytest.raises(openai.BadRequestError, match="look-around") as refused:
        client.chat.completions.create(
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}},
            **kwargs)
    assert refused.value.body["param"] == "response_format", refused.value.body


def test_greedy_json_schema_and_json_object(server: GunicornServer) -> None:
    greedy = _create(server, response_format=PERSON_FORMAT, temperature=0)
    jsonschema.validate(json.loads(greedy.choices[0].message.content), PERSON)
    # any JSON object; biasing `{}` makes the random model close it at once (the grammar then allows only EOS)
    (empty,) = _token_ids(server, "{}")
    answer = _create(server, response_format={"type": "json_object"}, temperature=1.0, seed=1,
                     logit_bias={str(empty): 100})
    assert answer.choices[0].message.content == "{}" and answer.choices[0].finish_reason == "stop"


def test_the_constraint_starts_after_thinking(server: GunicornServer) -> None:
    # Thinking on: the first token may open a thought (<think>, forced here, as </think> after it); the
    # random model thinks freely until </think>, then follows the schema.
    answer = _create(server, response_format=PERSON_FORMAT, temperature=1.0, seed=3,
                     logit_bias={str(THINK_ID): 100, str(END_THINK_ID): 100}, extra_body={"chat_template_kwargs": {}})
    message = answer.choices[0].message
    # <think> at +100 too may come again before </think>
    assert (message.reasoning_content or "").replace("<think>", "").strip() == ""
    jsonschema.validate(json.loads(message.content), PERSON)


YES_NO = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": {"enum": ["yes", "no"]}, "strict": True}}
STOP_TOKEN = 1000  # an ordinary token made a stop token


@pytest.mark.parametrize("constraint", [
    {"tools": TOOLS, "tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    {"response_format": YES_NO},
])
@pytest.mark.parametrize("ender", ["eos", "stop_token_ids"])
def test_a_promised_answer_does_not_end_inside_its_thought(server: GunicornServer, constraint: dict[str, Any],
                                                           ender: str) -> None:
    """A forced call or JSON promised: an end of turn (EOS, or a stop token id) is banned inside the free thought,
    so the thought ends by </think> and the answer keeps the promise. The biases: the first token cannot be the
    answer's (<tool_call>, the JSON's `"`), so it opens a thought; there the end of turn (+100) would win over
    </think> (+50) (it did: the reasoning alone, `finish_reason: "stop"`)."""
    (first,) = _token_ids(server, '"') if "response_format" in constraint else [TOKEN_IDS["<tool_call>"]]
    ends = [IM_END_ID, ENDOFTEXT_ID] if ender == "eos" else [STOP_TOKEN]
    bias = {str(first): -100, str(END_THINK_ID): 50, **{str(t): 100 for t in ends}}
    extra = {"chat_template_kwargs": {}, **({"stop_token_ids": ends} if ender == "stop_token_ids" else {})}
    body = {**constraint, "temperature": 0, "max_tokens": 60, "logit_bias": bias, "extra_body": extra}
    answer = _create(server, **body).choices[0]
    streamed = _streamed(server, **body)[0]
    if "response_format" in constraint:
        assert json.loads(answer.message.content) in ("yes", "no") and answer.finish_reason == "stop"
        assert (streamed["content"], streamed["finish_reason"]) == (answer.message.content, "stop")
    else:
        calls = _calls(answer.message)
        assert len(calls) >= 1 and answer.finish_reason == "tool_calls", answer
        assert list(streamed["tool_calls"].values()) == calls and streamed["finish_reason"] == "tool_calls"


def test_a_promised_thought_keeps_its_end_among_the_stop_ids(server: GunicornServer) -> None:
    """</think> among stop_token_ids is not banned with the other stop ids inside a promised answer's thought (the
    thought had no end but length): sampled, it ends the answer there, as the client asked."""
    (first,) = _token_ids(server, '"')
    extra = {"chat_template_kwargs": {}, "stop_token_ids": [END_THINK_ID]}
    answer = _create(server, response_format=YES_NO, temperature=0, max_tokens=20, extra_body=extra,
                     logit_bias={str(first): -100, str(END_THINK_ID): 100}).choices[0]
    assert (answer.finish_reason, answer.message.content) == ("stop", ""), answer


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_always_call(server: GunicornServer, tool_choice: Any) -> None:
    named = isinstance(tool_choice, dict)
    for seed in range(2):
        body = {"tools": TOOLS, "tool_choice": tool_choice, "n": CHOICES, "seed": seed, "temperature": 1.0,
                "max_tokens": 120}
        answer = _create(server, **body)
        streamed = _streamed(server, **body)
        for choice, stream in zip(answer.choices, streamed, strict=True):
            calls = _calls(choice.message)
            assert choice.finish_reason == "tool_calls" and calls, choice
            assert len(calls) == 1 or not named
            for call in calls:
                assert call["name"] == "get_time" or not named
                jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
            assert list(stream["tool_calls"].values()) == calls and stream["finish_reason"] == "tool_calls"
            assert not choice.message.content and not stream["content"]


def test_one_tool_sent_twice_is_one_tool_two_of_one_name_a_400(server: GunicornServer) -> None:
    """A client merging its tool lists may send one tool twice (LibreChat #13162: two `web_search` tools served by
    OpenAI's models): one tool, a forced call to it served. Two different tools of one name stay a 400 naming tools:
    a call could not say which one it means."""
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        answer = _create(server, tools=[*TOOLS, TOOLS[1]], tool_choice=tool_choice, parallel_tool_calls=False,
                         temperature=0, max_tokens=120)
        (call,) = _calls(answer.choices[0].message)
        assert answer.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    other = {"type": "function", "function": {**TOOLS[1]["function"], "description": "Another"}}
    with pytest.raises(openai.BadRequestError, match="'get_time' names two different functions") as refused:
        _create(server, tools=[*TOOLS, other], tool_choice="required")
    assert refused.value.body["param"] == "tools" and refused.value.body["type"] == "invalid_request_error"


def test_forced_single_call_and_the_round_trip(server: GunicornServer) -> None:
    answer = _create(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.8,
                     seed=5, max_tokens=120)
    message = answer.choices[0].message
    (call,) = message.tool_calls
    history = [*USER, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 °C"}]
    final = _create(server, messages=history, tools=TOOLS, temperature=0, max_tokens=8)
    assert final.choices[0].message.role == "assistant" and final.choices[0].finish_reason in ("stop", "length")
    # the call went back to the template as the model wrote it
    ids = requests.post(f"{server.url}/tokenize", json={"messages": history, "tools": TOOLS, **NO_THINKING},
                        timeout=30).json()["tokens"]
    assert final.usage.prompt_tokens == len(ids)


def _generated(answer: Any) -> list[list[int]]:
    return [t.bytes for t in answer.choices[0].logprobs.content]


def test_logit_bias_bans_and_forces(server: GunicornServer) -> None:
    plain = _generated(_create(server, temperature=0, max_tokens=6, logprobs=True))
    first = _token_ids(server, bytes(plain[0]).decode())
    assert len(first) == 1
    banned = _generated(_create(server, temperature=0, max_tokens=6, logprobs=True, logit_bias={str(first[0]): -100}))
    assert plain[0] not in banned and banned != plain
    forced_bytes = list(requests.post(f"{server.url}/detokenize", json={"tokens": [1234]}, timeout=30).json()[
        "prompt"].encode())
    for temperature in (0, 1.0):
        forced = _create(server, temperature=temperature, seed=0, max_tokens=6, logprobs=True, logit_bias={"1234": 100})
        assert _generated(forced) == [forced_bytes] * 6


def test_constrained_and_free_rows_share_a_batch_without_affecting_each_other(server: GunicornServer) -> None:
    free = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 1.0, "seed": 11, "ignore_eos": True,
            **NO_THINKING}
    constrained = {**free, "seed": 12, "ignore_eos": False, "response_format": PERSON_FORMAT, "n": 2}
    alone = [post_chat(server, body).json() for body in (free, constrained)]
    together: list[Any] = [None, None]

    def send(i: int, body: dict[str, Any]) -> None:
        together[i] = post_chat(server, body).json()

    threads = [threading.Thread(target=send, args=(i, body)) for i, body in enumerate((free, constrained))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(alone, together, strict=True):
        assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    for choice in together[1]["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_invalid_schema_is_a_400_unless_not_strict(server: GunicornServer) -> None:
    schema = {"type": "string", "format": "no-such-format", "maxLength": 3}
    strict = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        _create(server, response_format=strict)
    assert info.value.body["param"] == "response_format" and "no-such-format" in info.value.body["message"]
    lenient = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # strict: OpenAI's default false
    answer = _create(server, response_format=lenient, temperature=1.0, seed=0)
    assert len(json.loads(answer.choices[0].message.content)) <= 3


@pytest.mark.parametrize("endpoint, tool_choice, strict", [
    ("chat", "required", False), ("chat", {"type": "function", "function": {"name": "g"}}, False),
    ("chat", "auto", True), ("responses", "required", False), ("responses", "auto", True)])
def test_an_uncompilable_strict_or_forced_tool_schema_is_a_400_naming_the_keyword(
        server: GunicornServer, endpoint: str, tool_choice: Any, strict: bool) -> None:
    """SGLang's `"type": "int"`: the 400 quoted the calls' Lark grammar (its `%json` lines, the `<[151657]>` tokens,
    llguidance's options) around llguidance's refusal; now it names the refused type and the tool."""
    fine = {"type": "object", "properties": {"x": {"type": "integer"}}}
    bad = {"type": "object", "properties": {"a": {"type": "int"}}}
    client = server.openai_client(timeout=300)
    with pytest.raises(openai.BadRequestError) as refused:
        if endpoint == "chat":
            tools = [{"type": "function", "function": {"name": name, "parameters": schema, "strict": strict}}
                     for name, schema in (("f", fine), ("g", bad))]
            _create(server, tools=tools, tool_choice=tool_choice)
        else:
            tools = [{"type": "function", "name": name, "parameters": schema, "strict": strict}
                     for name, schema in (("f", fine), ("g", bad))]
            client.responses.create(model=MODEL, input="hi", max_output_tokens=16, tools=tools,
                                    tool_choice=tool_choice)
    error = refused.value.body
    assert error["param"] == "tools" and "Invalid type: int" in error["message"], error
    assert "function 'g'" in error["message"], error
    assert "%json" not in error["message"] and "x-guidance" not in error["message"], error


# vLLM's structured outputs: each kind, its check of an answer, and the bodies asking for it (structured_outputs,
# the older guided_* field)
REGEX = r"[a-z]{2,5}( [0-9]{1,3})?"
CHOICES_OF = ["yes", "no", "maybe so", 'a "quote"']
LARK = 'start: greeting " " NAME ("!" | ".")\ngreeting: "hi" | "hello"\nNAME: /[A-Z][a-z]{0,5}/'
GBNF = 'root ::= ("hi" | "hello") " " [A-Z] [a-z]{0,5} ("!" | ".")'
GREETING = r"(hi|hello) [A-Z][a-z]{0,5}[!.]"  # both grammars' language
KINDS: dict[str, tuple[Any, Callable[[str], bool], str]] = {
    "regex": (REGEX, lambda text: re.fullmatch(REGEX, text) is not None, "guided_regex"),
    "choice": (CHOICES_OF, lambda text: text in CHOICES_OF, "guided_choice"),
    "json": (PERSON, lambda text: jsonschema.validate(json.loads(text), PERSON) is None, "guided_json"),
    "grammar": (LARK, lambda text: re.fullmatch(GREETING, text) is not None, "guided_grammar"),
}


def _structured_bodies(kind: str) -> list[dict[str, Any]]:
    value, _, guided = KINDS[kind]
    return [{"structured_outputs": {kind: value}}, {guided: value, "guided_decoding_backend": "guidance"}]


@pytest.mark.parametrize("kind", KINDS)
def test_structured_outputs_answers_follow_the_constraint(server: GunicornServer, kind: str) -> None:
    """Through the openai client's extra_body, streamed and not, temperature 1: every answer follows it."""
    valid = KINDS[kind][1]
    for seed, extra in enumerate(_structured_bodies(kind)):
        answer = _create(server, n=CHOICES, seed=seed, temperature=1.0, extra_body=extra)
        streamed = _streamed(server, n=CHOICES, seed=seed, temperature=1.0, extra_body=extra)
        for choice, stream in zip(answer.choices, streamed, strict=True):
            assert choice.finish_reason == "stop" and valid(choice.message.content), choice
            assert stream["content"] == choice.message.content and stream["finish_reason"] == "stop"


def test_gbnf_grammar_and_json_object(server: GunicornServer) -> None:
    answer = _create(server, n=CHOICES, seed=0, temperature=1.0, extra_body={"guided_grammar": GBNF})
    assert all(re.fullmatch(GREETING, c.message.content) for c in answer.choices), answer
    (empty,) = _token_ids(server, "{}")  # biased: the random model closes the object at once
    answer = _create(server, temperature=1.0, seed=1, logit_bias={str(empty): 100},
                     extra_body={"structured_outputs": {"json_object": True, "disable_any_whitespace": True}})
    assert answer.choices[0].message.content == "{}" and answer.choices[0].finish_reason == "stop"


def test_structured_outputs_start_after_thinking(server: GunicornServer) -> None:
    """The same rule as response_format: a thought opened by the first token is free, the answer after it is not."""
    answer = _create(server, temperature=1.0, seed=3, logit_bias={str(THINK_ID): 100, str(END_THINK_ID): 100},
                     extra_body={"chat_template_kwargs": {}, "structured_outputs": {"regex": REGEX}})
    message = answer.choices[0].message
    assert (message.reasoning_content or "").replace("<think>", "").strip() == ""
    assert re.fullmatch(REGEX, message.content), message


@pytest.mark.parametrize("regex", [r"<tool_call>x[a-z]{0,3}", r"<think>\ny[a-z]{0,3}"])
def test_a_regex_spelling_the_markup_is_followed_past_it(server: GunicornServer, regex: str) -> None:
    """A grammar's `<tool_call>` is text, emitted as ordinary tokens: its special token (the same bytes) was allowed
    where the text was forced, then refused by the matcher, which ended every answer there, short of the regex."""
    answer = server.openai_client(timeout=300).completions.create(
        model=MODEL, prompt="Answer:", max_tokens=20, n=2, seed=0, temperature=1.0,
        extra_body={"structured_outputs": {"regex": regex}, "skip_special_tokens": False})
    assert all(c.finish_reason == "stop" and re.fullmatch(regex, c.text) for c in answer.choices), answer.choices


def test_a_grammar_that_errs_mid_answer_fails_its_request_and_not_the_stream_beside_it(server: GunicornServer) -> None:
    """A matcher that erred mid-answer (here the lexer of `a{100000}`, out of LIMITS' fuel after its first token) ended
    the answer with "stop": a 200 whose text did not follow the grammar. Now its request fails naming the field that
    asked for the grammar: a 400, counted as failed. A stream generating beside them in the batch runs to its end."""
    client = server.openai_client(timeout=300)
    failed = server_stats(server)["requests_failed"]
    beside = iter(client.completions.create(model=MODEL, prompt="Hello", max_tokens=BESIDE_TOKENS, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    finish = [next(beside).choices[0].finish_reason]  # it is generating: the requests below join its batch
    asked = [("completions", {"structured_outputs": {"regex": COSTLY}}, "structured_outputs.regex"),
             ("completions", {"guided_regex": COSTLY}, "guided_regex"),
             ("chat", {"response_format": COSTLY_FORMAT}, "response_format"),
             ("chat", {"tools": [COSTLY_TOOL], "tool_choice": "required"}, "tools"),
             # calls under "auto" that follow no schema of the tools' beside the JSON answer: the format erred
             ("chat", {"tools": TOOLS, "tool_choice": "auto", "response_format": COSTLY_FORMAT,
                       "logit_bias": {str(token): 100 for token in _token_ids(server, "{")}}, "response_format")]
    for endpoint, body, param in asked:
        with pytest.raises(openai.BadRequestError) as info:
            if endpoint == "chat":
                _create(server, n=2, **body)
            else:
                client.completions.create(model=MODEL, prompt="Answer:", max_tokens=20, temperature=0.0,
                                          extra_body=body)
        assert (info.value.body["param"], info.value.body["message"], info.value.body["code"]) == (
            param, GRAMMAR_FAILED, "invalid_prompt"), info.value.body
    chunks = list(beside)
    finish += [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] == "length" and not any(finish[:-1]) and chunks[-1].usage.completion_tokens == BESIDE_TOKENS
    wait_for(lambda: engine_idle(server))
    assert server_stats(server)["requests_failed"] == failed + len(asked)


def test_a_stream_whose_grammar_errs_ends_with_the_error_event_then_done(server: GunicornServer) -> None:
    """The stream's text so far, then the error in the shape of every mid-stream error (the server's an engine error's
    500 would have, here the client's: invalid_request_error naming the field, `invalid_prompt` as a Responses
    failure's), then [DONE]; the openai client raises it. It ended with `finish_reason: "stop"` before."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 20, "stream": True, "response_format": COSTLY_FORMAT,
            **NO_THINKING}
    with post_chat(server, body, stream=True) as response:
        payloads = list(sse_payloads(response))
    assert json.loads(payloads[-2]) == error_body(GRAMMAR_FAILED, param="response_format", code="invalid_prompt")
    assert payloads[-1] == "[DONE]"
    assert all(choice["finish_reason"] is None for chunk in map(json.loads, payloads[:-2]) for choice in
               chunk["choices"])
    with pytest.raises(openai.APIError, match="could not follow the grammar") as info:
        list(_create(server, stream=True, response_format=COSTLY_FORMAT))
    assert info.value.body["param"] == "response_format"


def test_ambiguous_repeats_whose_row_outgrows_the_parser_fail_as_the_fields_error(server: GunicornServer) -> None:
    """`"a"* "a"* ...`: llguidance's row grows with each "a" of the answer (300 of them: past its 2,000 items at the
    first token; 2 of them after ~1,000), so no bound on the text alone tells which answers fail; such a grammar is
    served and its failure is the field's error: a 400 naming it, or streamed the text so far, then the error event
    and [DONE] (the openai client raises it), never a 200 that looks whole."""
    grammar_text = "start: " + " ".join(['"a"*'] * 300) + ' "z"'
    client = server.openai_client(timeout=120)
    for stream in (False, True):
        with pytest.raises(openai.APIError, match="could not follow the grammar.*items") as info:
            answer = client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=0.0, stream=stream,
                                               extra_body={"guided_grammar": grammar_text})
            if stream:
                list(answer)
        assert info.value.body["param"] == "guided_grammar", info.value.body
        assert isinstance(info.value, openai.BadRequestError) != stream


def test_a_grammar_whose_lexer_gave_out_is_compiled_afresh_for_the_next_request(server: GunicornServer) -> None:
    """The copies of a compiled grammar share its lexer, whose fuel error stays: a request steered into the costly
    branch spoils the cached grammar, and the next request with the same text gets a fresh one (before: it too ended
    after its first token)."""
    regex = "b{1,5}|a{100000}"
    (a,), (b,) = (_token_ids(server, letter) for letter in "ab")
    client = server.openai_client(timeout=300)

    def create(token: int) -> Any:
        return client.completions.create(model=MODEL, prompt="Answer:", max_tokens=3, temperature=0.0, extra_body={
            "structured_outputs": {"regex": regex}, "logit_bias": {str(token): 100}}).choices[0]

    with pytest.raises(openai.BadRequestError, match="could not follow the grammar"):
        create(a)  # the costly branch: its lexer gives out
    steered = create(b)
    assert (steered.text, steered.finish_reason) == ("bbb", "length"), steered


def _rule_chain(n: int, after: str = "") -> str:
    """Lark rules each calling the next, `n` deep, then `after`: llguidance recurses once a rule while it compiles, and
    the last link's token puts every link in one parser row."""
    return f"start: r0{after}\n" + "\n".join(f'r{i}: r{i + 1} | "b"' for i in range(n)) + f'\nr{n}: "a"'


def _followed_then_refused(server: GunicornServer, grammar_of: Callable[[int], str], follows: str, within: int,
                           past: int) -> None:
    """Streamed or not, the grammar of `within` pieces is served (its answer matching `follows`), and that of `past`
    the 400 naming the field (before any token: streamed, the client raises at once)."""
    client = server.openai_client(timeout=300)

    def create(n: int, stream: bool) -> str:
        answer = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=0, stream=stream,
                                           extra_body={"structured_outputs": {"grammar": grammar_of(n)}})
        return "".join(chunk.choices[0].text for chunk in answer if chunk.choices) if stream else answer.choices[0].text
    for stream in (False, True):
        assert re.fullmatch(follows, create(within, stream))
        with pytest.raises(openai.BadRequestError, match="parser row of the grammar may hold") as refused:
            create(past, stream)
        assert refused.value.body["param"] == "structured_outputs.grammar", refused.value.body


def test_a_run_of_optional_pieces_past_the_row_is_a_400_and_within_it_is_followed(server: GunicornServer) -> None:
    """The row before n optional pieces in a row holds 2n + 1 items in llguidance: 1,000 compiled, then ended the
    answer at its first token. Now past grammar.MAX_ROW a 400 naming the field, streamed or not; 999 are followed."""
    _followed_then_refused(server, lambda n: "start: " + " ".join(f'"w{i}x"?' for i in range(n)) + ' "z"',
                           r"(w\d+x)*z?", grammar.MAX_ROW - 1, grammar.MAX_ROW)


def test_a_recursive_rules_continuation_past_the_row_is_a_400_before_any_token(server: GunicornServer) -> None:
    """`r: "k" R | r V` (R, V runs of optional pieces): after "k" llguidance's row holds R, V (r ended, then named in
    itself) and "z"; the continuation was left out (601 weighed, 2,403 items), so 1,200 pieces compiled and failed at
    "k": non-streamed a 400 after generation began, streamed a 200 ending in an error event. Now past MAX_ROW it is
    the 400 naming the field before any token, streamed or not; within it the answer follows the grammar."""
    def recursive(n: int) -> str:
        run = " ".join(f'"w{i}x"?' for i in range(n // 2)), " ".join(f'"v{i}x"?' for i in range(n - n // 2))
        return f'start: "q" r "z"\nr: "k" {run[0]} | r {run[1]}'
    _followed_then_refused(server, recursive, r"q(k((w\d+x)*(v\d+x)*z?)?)?", grammar.MAX_ROW - 2, grammar.MAX_ROW)


def test_alternatives_sharing_a_first_token_past_the_row_are_a_400_before_any_token(server: GunicornServer) -> None:
    """`start: a0 | a1 | a2 | a3`, `aj: "b" dj_0`, each dj a chain of its own: after "b" llguidance's row holds the 4
    chains' first rows. 450 links each (3,604 items) weighed 902, the largest alone: served, and the answer failed
    after its first token. Now the rows after a first token add up across the alternatives starting with it: the 400
    naming the field before any token, streamed or not; 4 chains of 120 links (4 x 241 items) are followed."""
    def shared(links: int) -> str:
        return "start: a0 | a1 | a2 | a3\n" + "".join(
            f'a{j}: "b" d{j}_0\n' + "".join(f'd{j}_{i}: d{j}_{i + 1} | "b"\n' for i in range(links)) +
            f'd{j}_{links}: "a"\n' for j in range(4))

    _followed_then_refused(server, shared, r"b[ab]?", 120, 450)


@pytest.mark.parametrize("shape", ALIKE)
def test_options_going_on_alike_past_the_row_are_a_400_before_any_token(server: GunicornServer, shape: str) -> None:
    """An `anyOf` of 5 objects `{"x": chain}` (each chain its own 240 `$ref` links): after `{"x": ` llguidance's row
    holds every option's chain (2,405 items), and the schema, weighed as the longest chain alone (486), was served and
    failed at the answer's first token (so did arrays' first `prefixItems`, objects' `patternProperties` and
    `additionalProperties`, nested anyOfs, and options going on alike a level down, `{"x": {"y": chain}}`, `{"x":
    [chain]}`, `[{"y": chain}]`, `[integer, chain]`: a late 400 "could not follow the grammar", streamed a 200 then an
    error mid-stream). Now the 400 naming the field in OpenAI's error shape before any token, streamed or not; 5
    chains of 80 links are followed."""
    alike = ALIKE[shape]

    def create(links: int, stream: bool) -> str:
        schema = {"name": "x", "schema": alike.schema(5, links), "strict": True}
        answer = _create(server, max_tokens=6, temperature=0, stream=stream,
                         response_format={"type": "json_schema", "json_schema": schema})
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices)
        return answer.choices[0].message.content

    for stream in (False, True):
        assert create(80, stream).startswith(alike.start)
        with pytest.raises(openai.BadRequestError, match="parser row of the grammar may hold") as refused:
            create(240, stream)
        assert refused.value.status_code == 400 and refused.value.body.keys() == {"message", "type", "param", "code"}
        assert (refused.value.body["param"], refused.value.body["type"]) == ("response_format", "invalid_request_error")


def _served_and_valid(server: GunicornServer, schema: dict[str, Any]) -> None:
    answer = _create(server, max_tokens=8, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}).choices[0]
    if answer.finish_reason == "stop":
        jsonschema.validate(json.loads(answer.message.content), schema)
    assert answer.finish_reason in ("stop", "length")


def test_an_object_of_many_patterns_is_served(server: GunicornServer) -> None:
    """64 patterns, each a chain of its own of 12 links: a key matches one, 28 items after it; their sum (1,666) had
    been weighed, a false 400 naming response_format. Served, and its answer validates."""
    _served_and_valid(server, many_patterns())


@pytest.mark.parametrize("shape", ONE_LOOSE_VALUE)
def test_an_options_loose_values_a_level_down_are_served(server: GunicornServer, shape: str) -> None:
    """An object of 4 patterns, each `{"y": chain}` (150 links), or of a property `x` beside additionalProperties
    (chains of 300): after a key llguidance holds one chain, but every loose value had been weighed alike a level down
    (1,210 and 1,206), a 400 naming response_format. Served, and its answer validates."""
    _served_and_valid(server, one_loose_value(shape, ONE_LOOSE_VALUE[shape][0]))


@pytest.mark.parametrize("shape", [shape for shape, (*_, both, _) in NAMED_BESIDE_LOOSE.items() if not both])
def test_a_named_key_beside_loose_values_it_cannot_be_is_served(server: GunicornServer, shape: str) -> None:
    """An object `{"id": chain}` beside one of patterns `^p[0-9]$`, or of additionalProperties beside its own `id`
    (300-link chains; a level down, behind `"x"` and `"y"`): after the named key llguidance holds one chain, but
    every loose value had gone with every named key (1,206), a 400 naming response_format. Served, and its answer
    validates."""
    _served_and_valid(server, named_beside_loose(shape, 300))


# Rust's regex reads `[[a]]` as a class in a class, and in verbose mode `[ ]a]` as `[]a]`; Python's `re` reads a
# class holding `[` (or a space), then a literal `]`
CLASSES_READ_APART = {
    ("response_format", "a class in a class"): {"type": "json_schema", "json_schema": {
        "name": "x", "schema": named_beside_loose("a class in a class", 300), "strict": True}},
    ("response_format", "a verbose class"): {"type": "json_schema", "json_schema": {
        "name": "x", "schema": named_beside_loose("a verbose class", 300), "strict": True}},
    ("guided_grammar", "a class in a class"): "start: " + " ".join(f"/v{i}|[[a]]*/" for i in range(1_200)) + ' "z"',
    ("guided_grammar", "a verbose class"): "start: " + " ".join(f"/(?x)v{i}|[ ][a]]*/" for i in range(1_200)) + ' "z"',
}


@pytest.mark.parametrize(("field", "shape"), CLASSES_READ_APART)
def test_a_class_in_a_class_is_weighed_as_llguidance_reads_it(server: GunicornServer, field: str, shape: str) -> None:
    """A pattern `^[[i]]d$` (or `(?x)^[ ]i]d$`) beside an object naming `id` (300-link chains): after `{"id": `
    llguidance holds both chains (1,202 items, past MAX_ROW), weighed one (604: served); 1,200 `/v{i}|[[a]]*/` (or
    `/(?x)v{i}|[ ][a]]*/`) in a row (each may match nothing to Rust): llguidance's row before them holds 2,401 items,
    weighed 1 and served (the answer failed at its first token). Now each is the 400 naming the field."""
    with pytest.raises(openai.BadRequestError, match="parser row") as refused:
        _create(server, max_tokens=2, extra_body={field: CLASSES_READ_APART[field, shape]})
    assert refused.value.body["param"] == field and refused.value.body["type"] == "invalid_request_error"


def test_a_chain_of_bare_refs_is_served(server: GunicornServer) -> None:
    """500 `$ref`s each naming the next (hops) to an integer: llguidance compiles a hop as its target (a row of 2
    items), but each hop had been weighed 2 items (1,002), a 400 naming response_format. Served, and its answer
    validates."""
    _served_and_valid(server, {"$ref": "#/$defs/h0", "$defs": hop_chain(500)})


def test_a_long_chain_of_bare_refs_is_served(server: GunicornServer) -> None:
    """5,000 hops to a digit: llguidance compiles them as their target, but the objects' merge walked the chain from
    each hop (past ~630 hops object_runs' MAX_WORK: a 400 naming response_format). Served: the answer is a digit."""
    schema = {"$ref": "#/$defs/h0", "$defs": hop_chain(5_000, {"type": "integer", "minimum": 0, "maximum": 9})}
    answer = _create(server, max_tokens=8, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}).choices[0]
    assert answer.finish_reason == "stop" and 0 <= json.loads(answer.message.content) <= 9, answer


def test_a_chain_of_refs_each_beside_its_own_defs_is_served(server: GunicornServer) -> None:
    """100 `$ref`s each naming the next beside `$defs` of its own, to an object: llguidance compiles each as its target
    (a hop: object_runs.is_hop), but the objects' merge took each for a part of its own, 100 past MAX_PARTS (64): a
    400 naming response_format. Served, and its answer validates."""
    defs: dict[str, Any] = {f"h{i}": {"$ref": f"#/$defs/h{i + 1}", "$defs": {}} for i in range(100)}
    defs["h100"] = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"],
                    "additionalProperties": False}
    _served_and_valid(server, {"$ref": "#/$defs/h0", "$defs": defs})


# `$ref`s with nothing beside them (hops) naming each other in a cycle: llguidance compiles each as its target, a rule
# with nothing to match
STEER_INTO_X = {"4913": 100, "87": 100, "788": 100}  # `{"`, `x`, `":` in Qwen3's vocabulary: a key `x` begun
UNMATCHED = {
    "the root": {"$ref": "#"},
    "a to b to a": {"$ref": "#/$defs/a", "$defs": HOP_CYCLE},
    "a required property": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"],
                            "$defs": HOP_CYCLE},
    "an item of minItems": {"type": "object", "properties": {"x": {"type": "array", "items": {"$ref": "#/$defs/a"},
                            "minItems": 1}}, "required": ["x"], "$defs": HOP_CYCLE},
    "every anyOf option": {"anyOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}], "$defs": HOP_CYCLE},
}


@pytest.mark.parametrize("where", ["response_format", "strict tool", "forced tool", "responses"])
@pytest.mark.parametrize("shape", UNMATCHED)
def test_a_cycle_of_bare_refs_where_a_value_must_be_is_a_400_naming_the_field(server: GunicornServer, shape: str,
                                                                              where: str) -> None:
    """llguidance compiled it, and the answer failed at its first token (the root: a 400 that said only
    `NoExtensionBias`) or at the value's (`{"x": `: a 200 whose answer failed). A 400 naming the field and the cycle
    (a tool's root `$ref`, which call_arguments moves beside keys of its own, llguidance's `circular references`)."""
    schema, client = UNMATCHED[shape], server.openai_client(timeout=300)
    with pytest.raises(openai.BadRequestError, match="cycle|circular references") as refused:
        if where == "response_format":
            _create(server, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        elif where == "responses":
            client.responses.create(model=MODEL, input="hi", max_output_tokens=16, text={"format": {
                "type": "json_schema", "name": "x", "schema": schema, "strict": True}})
        else:
            strict = where == "strict tool"
            _create(server, max_tokens=8, tool_choice="auto" if strict else "required", tools=[
                {"type": "function", "function": {"name": "f", "parameters": schema, "strict": strict}}])
    param = {"response_format": "response_format", "responses": "text.format"}.get(where, "tools")
    assert refused.value.body["param"] == param, refused.value.body


def test_a_cycle_of_bare_refs_in_an_optional_place_is_served(server: GunicornServer) -> None:
    """An `anyOf` option beside an integer: llguidance holds the integer alone (its first mask digits), served and
    valid (jsonschema's own validator recurses without end on the cycle)."""
    option = {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer", "minimum": 0, "maximum": 9}], "$defs": HOP_CYCLE}
    answer = _create(server, max_tokens=8, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": option, "strict": True}}).choices[0]
    assert answer.finish_reason == "stop" and 0 <= json.loads(answer.message.content) <= 9, answer


# a hop whose own `$defs` holds the next: cut, the outer one's `false` holds the inner (cutting both was a 500)
NESTED_HOP_CYCLE = {"a": {"$ref": "#/$defs/a/$defs/b", "$defs": {"b": {"$ref": "#/$defs/a"}}}}


@pytest.mark.parametrize("cycle", [HOP_CYCLE, NESTED_HOP_CYCLE], ids=["side by side", "one inside the other"])
def test_a_property_that_is_a_cycle_of_bare_refs_is_never_begun(server: GunicornServer, cycle: dict[str, Any]) -> None:
    """A property not required whose value is a cycle of bare `$ref`s: llguidance still offered its key, and an answer
    steered to it (logit_bias on `{"`, `x`, `":`) met nothing to follow at `{"x": `, a 400 mid-answer ('could not
    follow the grammar'). Now its copy with the cycle `false` is compiled, as response_format and as a forced strict
    tool's parameters: the answer is `{}`."""
    optional = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "additionalProperties": False,
                "$defs": cycle}
    steer = {"logit_bias": STEER_INTO_X}
    answer = _create(server, max_tokens=12, temperature=0, **steer, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": optional, "strict": True}}).choices[0]
    assert answer.finish_reason == "stop" and json.loads(answer.message.content) == {}, answer
    tool = {"type": "function", "function": {"name": "f", "parameters": optional, "strict": True}}
    message = _create(server, max_tokens=40, temperature=0, **steer, tools=[tool], tool_choice="required",
                      parallel_tool_calls=False).choices[0].message
    assert [json.loads(call.function.arguments) for call in message.tool_calls] == [{}], message


def test_a_lark_json_with_a_cycle_of_bare_refs_where_a_value_may_be_absent_is_a_400(server: GunicornServer) -> None:
    """A Lark grammar's `%json` is compiled as sent, so a property whose value is a cycle of bare `$ref`s stays
    offered, and an answer that begins it fails there (as response_format's did before its copy was compiled): a 400
    naming the field, up front, not a dead end mid-answer (nor the weighing's cut escaping as a 500)."""
    optional = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": HOP_CYCLE}
    lark = "start: %json " + json.dumps(optional)
    answer = requests.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "x", "max_tokens": 12, "structured_outputs": {"grammar": lark},
        "logit_bias": STEER_INTO_X})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "structured_outputs.grammar", error
    assert "cycle" in error["message"], error


def test_a_hop_cycle_inside_a_const_is_left_as_its_data(server: GunicornServer) -> None:
    """A `$ref` into a const's data reads it as a schema; a bare `$ref` there naming itself is a hop cycle, and the
    property leading into it is what is cut: the const's data stays as sent (cutting it too made the answer
    `{"c": {"k": false}}`, which the schema as sent does not hold)."""
    data = {"k": {"$ref": "#/properties/c/const/k"}}
    schema = {"type": "object", "properties": {"c": {"const": data}, "x": {"$ref": "#/properties/c/const/k"}},
              "required": ["c"], "additionalProperties": False}
    answer = _create(server, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}).choices[0]
    assert json.loads(answer.message.content) == {"c": data}, answer


def test_a_named_key_matching_its_own_options_pattern_is_weighed_as_llguidance_holds_it(
        server: GunicornServer) -> None:
    """Options whose named key also matches their own pattern hold both in llguidance's row (grammar40fix2): 100
    links of them are served and their answer validates; 300 are a 400 naming response_format, up front."""
    _served_and_valid(server, named_and_own_pattern(100))
    with pytest.raises(openai.BadRequestError) as refused:
        _create(server, response_format={"type": "json_schema", "json_schema": {
            "name": "n", "schema": named_and_own_pattern(300), "strict": True}})
    assert refused.value.body["param"] == "response_format", refused.value.body


def test_loose_values_in_turn_past_their_work_are_served(server: GunicornServer) -> None:
    """64 patterns, each an object of 64 patterns, beside 50 objects of additionalProperties: taking each pattern's
    value in turn, level after level, had been ManyOptions, a 400 naming response_format. Served, and its answer
    validates."""
    _served_and_valid(server, patterns_of_patterns(50))


def test_deep_grammars_generate_to_their_end_or_are_400s_and_the_worker_lives(server: GunicornServer) -> None:
    """A chain of 3,000 rules overflowed the compiling thread's 8 MiB stack (SIGSEGV, the worker lost); one of 1,500
    rules (or 1,200 `$ref`s) compiled, but llguidance's parser refused the row its first token made: the answer ended
    there, a 200 with `"stop"` and half the grammar (so did chains through a rule that may be empty, or of `$ref`s by
    `$anchor`, weighed a few items). Now a chain past MAX_ROW is a 400 naming the field, before llguidance; one within
    it generates to the grammar's end."""
    (worker,) = requests.get(f"{server.url}/stats", timeout=5).json()["workers"]
    post = functools.partial(requests.post, f"{server.url}/v1/completions", timeout=120)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 8, "temperature": 0.0}
    answer = post(json={**body, "structured_outputs": {"grammar": _rule_chain(grammar.MAX_ROW // 2 - 1, ' "xyz"')}})
    assert answer.status_code == 200, answer.text
    assert re.fullmatch("[ab]xyz", answer.json()["choices"][0]["text"]), answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "stop", answer.text
    optional = _rule_chain(1_500, ' "xyz"').replace(": r", ": e r").replace("start: e r0", "start: r0") + '\ne: "q"?'
    anchored = json.loads(json.dumps(ref_chain(1_200, "string")).replace('"#/$defs/d', '"#a'))
    anchored["$defs"] = {name: {**node, "$anchor": f"a{name[1:]}"} for name, node in anchored["$defs"].items()}
    refused = [({"structured_outputs": {"grammar": _rule_chain(1_500, ' "xyz"')}}, "structured_outputs.grammar", "row"),
               ({"guided_json": ref_chain(1_200, "string")}, "guided_json", "parser row"),
               ({"structured_outputs": {"grammar": optional}}, "structured_outputs.grammar", "row"),  # after `e: "q"?`
               ({"guided_json": anchored}, "guided_json", "parser row"),  # `$ref`s by `$anchor`
               ({"guided_grammar": _rule_chain(grammar.MAX_RULES)}, "guided_grammar", "more than 12000 rules")]
    for extra, param, refusal in refused:
        answer = post(json={**body, **extra})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and refusal in error["message"], error
    (after,) = requests.get(f"{server.url}/stats", timeout=5).json()["workers"]
    assert after["pid"] == worker["pid"], (worker, after)


def test_a_const_too_large_to_serve_is_a_400_naming_the_field_and_the_worker_lives(server: GunicornServer) -> None:
    """An object const of 20,000 keys (within the body's bound on values): llguidance panicked compiling it, a 400
    quoting its assertion ("grammar.symbols.len() < u16::MAX"), and at 30,000 keys, on an 8 MB stack, killed the
    process. Now the request's const and enum values are weighed first: the 400 names the field, in each way a
    schema comes (an answer's, a tool's, vLLM's, a Lark grammar's %json), and the worker serves on."""
    (worker,) = requests.get(f"{server.url}/stats", timeout=5).json()["workers"]
    large = {"const": {f"k{i}": i for i in range(20_000)}}
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": large}, "required": ["a"], "additionalProperties": False}}}
    chat = {"model": MODEL, "messages": USER, "max_tokens": 4}
    sent = [("chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
                "name": "o", "schema": large}}}, "response_format"),
            ("chat/completions", {**chat, "tools": [tool], "tool_choice": "required"}, "tools"),
            ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "guided_json": large}, "guided_json"),
            # data a `$ref` reads: llguidance compiles it as a schema, its const too
            ("chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
                "name": "o", "schema": {"$ref": "#/$defs/d/default", "$defs": {"d": {"default": large}}}}}},
             "response_format"),
            ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "structured_outputs": {
                "grammar": f"start: %json {json.dumps(large)}"}}, "structured_outputs.grammar")]
    for path, body, param in sent:
        answer = requests.post(f"{server.url}/v1/{path}", json=body, timeout=120)
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()["error"]
        assert error["param"] == param and "const and enum values are too large to serve" in error["message"], error
    (after,) = requests.get(f"{server.url}/stats", timeout=5).json()["workers"]
    assert after["pid"] == worker["pid"], (worker, after)
    assert _create(server, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_a_grammar_past_the_engines_symbols_is_a_400_in_plain_words(server: GunicornServer) -> None:
    """11,000 Lark rules of three alternatives pass llguidance's u16 symbol ids within MAX_RULES: the 400 named the
    field but quoted a Rust assertion (`grammar.symbols.len() < u16::MAX as usize - 10`). Now it says the limit in
    plain words, streamed or not."""
    text = "start: " + " ".join(f"r{i}" for i in range(11_000)) + "\n" + "\n".join(
        f'r{i}: "a" | "b" "c" | ("d" "e")' for i in range(11_000))
    client = server.openai_client(timeout=120)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=stream,
                                      extra_body={"structured_outputs": {"grammar": text}})
        error = refused.value.body
        assert error["param"] == "structured_outputs.grammar", error
        assert "more symbols than the grammar engine's limit (65,535" in error["message"], error
        assert not re.search("u16|assert|panic", error["message"]), error


def test_a_grammar_of_many_rules_with_narrow_rows_compiles(server: GunicornServer) -> None:
    """6,101 rules (past deep8's bound of 5,000 lines, a 400 before), a tree of 100 x 61: each rule opens few
    alternatives in a row, so it is cheap and answered to its end."""
    groups = [f'g{j}: ' + " | ".join(f'"m{i}" r{j}_{i}' for i in range(60)) for j in range(100)]
    leaves = [f'r{j}_{i}: "e"' for j in range(100) for i in range(60)]
    text = "\n".join(["start: " + " | ".join(f'"k{j}" g{j}' for j in range(100)), *groups, *leaves])
    answer = requests.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "x", "max_tokens": 12, "temperature": 0.0, "structured_outputs": {"grammar": text}})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert re.fullmatch(r"k\d+m\d+e", choice["text"]) and choice["finish_reason"] == "stop", choice


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_on_completions(server: GunicornServer, stream: bool) -> None:
    client = server.openai_client(timeout=300)
    for seed, (kind, extra) in enumerate([("choice", {"structured_outputs": {"choice": CHOICES_OF}}),
                                          ("regex", {"guided_regex": REGEX})]):
        valid = KINDS[kind][1]
        body = {"model": MODEL, "prompt": "Answer:", "max_tokens": 40, "n": CHOICES, "seed": seed,
                "temperature": 1.0, "extra_body": extra}
        texts = [""] * CHOICES
        finish: list[str | None] = [None] * CHOICES
        for part in client.completions.create(**body, stream=True) if stream else [client.completions.create(**body)]:
            for choice in part.choices:
                texts[choice.index] += choice.text
                finish[choice.index] = choice.finish_reason or finish[choice.index]
        assert all(map(valid, texts)) and finish == ["stop"] * CHOICES, (texts, finish)


def test_a_schema_whose_data_holds_what_is_no_uri_is_served(server: GunicornServer) -> None:
    """A `default` holding `{"$ref": "http://[::1"}` is data, and that `$ref` no URI: weighing it raised urljoin's
    ValueError, a 500. The answer follows the schema."""
    schema = {"$id": "http://a.test/s.json", "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8, "default": {"$ref": "http://[::1"}}}, "required": ["name"],
        "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "data", "schema": schema, "strict": True}}
    answer = _create(server, response_format=fmt, temperature=0, max_tokens=40)
    assert set(json.loads(answer.choices[0].message.content)) == {"name"}


# llguidance reads regexes as Rust's: a code point, a POSIX class and a Unicode class Python's `re` cannot read
# (RUST_AS_PYTHON: the same language in its syntax; its `\\d` is Unicode's Nd)
RUST = r"\x{61}{1,3}[[:digit:]]\p{Nd}?"
RUST_AS_PYTHON = r"a{1,3}[0-9]\d?"
# a chain through a rule of the regex (once weighed as one that may match nothing, then a chain: refused)
RUST_CHAIN = "start: r0\n" + "".join(f'r{i}: WORD r{i + 1} | "."\n' for i in range(500)) + f'r500: "."\nWORD: /{RUST}/'


@pytest.mark.parametrize("extra, read, language", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "rust", "strict": True, "schema": {
        "type": "string", "pattern": f"^{RUST}$"}}}}, json.loads, RUST_AS_PYTHON),
    ({"extra_body": {"structured_outputs": {"regex": RUST}}}, str, RUST_AS_PYTHON),
    ({"extra_body": {"structured_outputs": {"grammar": RUST_CHAIN}}}, str, f"(?:{RUST_AS_PYTHON})*\\."),
], ids=["schema pattern", "regex", "grammar"])
def test_a_regex_in_rust_syntax_is_served(server: GunicornServer, extra: dict[str, Any], read: Callable[[str], str],
                                          language: str) -> None:
    """Through the openai client, streamed and not: each answer is in the regex's language."""
    answer = _create(server, n=CHOICES, seed=0, temperature=1.0, max_tokens=200, **extra)
    streamed = _streamed(server, n=CHOICES, seed=0, temperature=1.0, max_tokens=200, **extra)
    for choice, stream in zip(answer.choices, streamed, strict=True):
        assert choice.finish_reason == "stop" and re.fullmatch(language, read(choice.message.content)), choice
        assert stream["content"] == choice.message.content and stream["finish_reason"] == "stop"


def test_a_strict_dynamic_ref_is_a_400_naming_the_field(server: GunicornServer) -> None:
    """llguidance implements no `$dynamicRef`: strict, the 400 naming the field that sent it; lenient, ignored."""
    schema = {"$defs": {"d": {"$dynamicAnchor": "d", "type": "integer", "maximum": 9}}, "$dynamicRef": "#d",
              "type": "integer", "minimum": 0, "maximum": 9}
    with pytest.raises(openai.BadRequestError, match="dynamicRef") as refused:
        _create(server, response_format={"type": "json_schema", "json_schema": {
            "name": "dynamic", "strict": True, "schema": schema}})
    assert refused.value.body["param"] == "response_format", refused.value.body
    answer = _create(server, temperature=1.0, seed=0, max_tokens=8, response_format={
        "type": "json_schema", "json_schema": {"name": "dynamic", "schema": schema}})
    assert 0 <= json.loads(answer.choices[0].message.content) <= 9, answer


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a(("}}, "structured_outputs.regex"),
    ("/v1/chat/completions", {"guided_grammar": "start: ::"}, "guided_grammar"),
    ("/v1/chat/completions", {"guided_json": {"type": "string", "format": "no-such-format"}}, "guided_json"),
    ("/v1/chat/completions", {"guided_json": {"type": "string", "pattern": "a\\b"}}, "guided_json"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= (("}}, "structured_outputs.grammar"),
    ("/v1/completions", {"guided_regex": "[z-a]"}, "guided_regex"),
    ("/v1/chat/completions", {"guided_json": {"$id": "http://x.test/" + "a" * 3_000, "$ref": "#/$defs/d",
                                              "$defs": {"d": {"type": "integer"}}}},
     "guided_json"),  # a $ref resolved against an $id past LONG_URI: not weighed (each cost the $id's length)
])
def test_invalid_structured_outputs_are_400s_naming_the_field(server: GunicornServer, path: str,
                                                              extra: dict[str, Any], param: str) -> None:
    prompt = {"messages": USER} if path == "/v1/chat/completions" else {"prompt": "x"}
    answer = requests.post(f"{server.url}{path}", json={"model": MODEL, "max_tokens": 4, **prompt, **extra},
                           timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_a_long_id_nothing_is_resolved_against_is_served(server: GunicornServer) -> None:
    """An `$id` past LONG_URI that no `$ref` is resolved against costs nothing to weigh: served (it was a 400)."""
    schema = {"$id": "http://x.test/" + "a" * 3_000, "enum": ["yes", "no"]}
    answer = _create(server, temperature=0, max_tokens=8, extra_body={"guided_json": schema})
    assert json.loads(answer.choices[0].message.content) in ("yes", "no"), answer


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllm_fields_at_their_defaults_change_nothing(server: GunicornServer, path: str) -> None:
    chat = path == "/v1/chat/completions"
    base = {"model": MODEL, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            **({"messages": USER, **NO_THINKING} if chat else {"prompt": "Once upon a time"})}
    defaults = VLLM_CHAT_DEFAULTS if chat else VLLM_COMPLETION_DEFAULTS
    plain, with_defaults = (requests.post(f"{server.url}{path}", json=body, timeout=120).json()
                            for body in (base, {**base, **defaults}))
    text = (lambda answer: answer["choices"][0]["message"]["content"]) if chat else \
        (lambda answer: answer["choices"][0]["text"])
    assert text(plain) and text(with_defaults) == text(plain), (plain, with_defaults)


@pytest.mark.parametrize("closed", [False, True])
def test_disable_additional_properties_closes_the_schemas_objects(server: GunicornServer, closed: bool) -> None:
    """vLLM's option: an object schema that does not set additionalProperties takes no other properties. `,` is
    biased, so that an open object goes on past its one property (to max_tokens, or closed with others)."""
    digit = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    (comma,) = _token_ids(server, ",")
    answer = _create(server, n=CHOICES, seed=0, temperature=1.0, max_tokens=24, logit_bias={str(comma): 100},
                     extra_body={"structured_outputs": {"json": digit, "disable_additional_properties": closed}})
    only_a = [c.finish_reason == "stop" and list(json.loads(c.message.content)) == ["a"] for c in answer.choices]
    assert only_a == [closed] * CHOICES, answer.choices


@pytest.mark.parametrize("no_space, answer", [(None, '{"a": 1, "b": [2, 2]}'), (False, '{"a": 1, "b": [2, 2]}'),
                                              (True, '{"a":1,"b":[2,2]}')])
def test_disable_any_whitespace_takes_the_spaces_out(server: GunicornServer, no_space: bool | None,
                                                     answer: str) -> None:
    """Every value is forced, so the answer is the schema's one JSON text with the option's separators (vLLM's
    guidance backend: "," and ":"), each compiled in turn in one server (the grammar cache keys on the option)."""
    fixed = {"type": "object", "properties": {"a": {"const": 1}, "b": {"type": "array", "items": {"const": 2},
             "minItems": 2, "maxItems": 2}}, "required": ["a", "b"], "additionalProperties": False}
    options = {} if no_space is None else {"disable_any_whitespace": no_space}
    extra = {"structured_outputs": {"json": fixed, **options}}
    whole = _create(server, temperature=0, extra_body=extra).choices[0]
    (streamed,) = _streamed(server, temperature=0, extra_body=extra)
    assert (whole.message.content, whole.finish_reason) == (answer, "stop")
    assert (streamed["content"], streamed["finish_reason"]) == (answer, "stop")


@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {"structured_outputs": {"choice": ["a"]}}),
                                         ("/v1/completions", {"guided_regex": "a"})])
def test_allowed_token_ids_with_a_structured_output_is_a_400_that_says_so(server: GunicornServer, path: str,
                                                                          extra: dict[str, Any]) -> None:
    prompt = {"messages": USER} if path == "/v1/chat/completions" else {"prompt": "x"}
    answer = requests.post(f"{server.url}{path}", json={"model": MODEL, "max_tokens": 4, "allowed_token_ids": [64],
                                                        **prompt, **extra}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "allowed_token_ids" and "a structured output" in error["message"], error


@pytest.mark.parametrize("path, prefix", [("/v1/chat/completions", "chatcmpl"), ("/v1/completions", "cmpl")])
def test_request_id_is_the_answers_id(server: GunicornServer, path: str, prefix: str) -> None:
    """vLLM's form: `{prefix}-` then the client's X-Request-Id, else the body's request_id, else a new one; streamed
    in every chunk."""
    prompt = {"messages": USER, **NO_THINKING} if path == "/v1/chat/completions" else {"prompt": "x"}
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "ignore_eos": True, **prompt}

    def ids(extra: dict[str, Any], headers: dict[str, str]) -> set[str]:
        whole = requests.post(f"{server.url}{path}", json={**body, **extra}, headers=headers, timeout=60).json()
        with requests.post(f"{server.url}{path}", json={**body, **extra, "stream": True}, headers=headers,
                           stream=True, timeout=60) as streamed:
            chunks = [json.loads(line.removeprefix(b"data: ")) for line in streamed.iter_lines()
                      if line.startswith(b"data: {")]
        assert len(chunks) >= 3, chunks
        return {whole["id"]} | {chunk["id"] for chunk in chunks}

    assert ids({"request_id": "batch-7/item 3"}, {}) == {f"{prefix}-batch-7/item 3"}
    assert ids({"request_id": "body"}, {"X-Request-Id": "header-1"}) == {f"{prefix}-header-1"}
    generated = ids({}, {})
    assert len(generated) == 2 and all(re.fullmatch(f"{prefix}-[0-9a-f]{{32}}", i) for i in generated), generated


def test_the_grammar_lane_refuses_past_its_limit_and_serves_cached_grammars_meanwhile(tmp_path) -> None:
    """NANOQWEN_GRAMMAR_THREADS=1, NANOQWEN_MAX_PENDING_GRAMMARS=1 through gunicorn and the openai client: six
    distinct costly grammars at once fill the grammar lane (a 503 `queue_full` with Retry-After past its one compile
    in flight), while a grammar compiled before is served from the cache, never queued behind them."""
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="1024", NANOQWEN_GRAMMAR_THREADS="1",
                  NANOQWEN_MAX_PENDING_GRAMMARS="1")
    cached = {"structured_outputs": {"regex": "[ab]{1,3}"}}
    costly = [{"structured_outputs": {"grammar": "start: " + " | ".join(f'"w{i}_{k}" r{i}' for i in range(900))
                                      + "\n" + "\n".join(f'r{i}: "e"' for i in range(900))}} for k in range(6)]
    with GunicornServer(env, tmp_path / "gunicorn.log") as srv:
        client = srv.openai_client(timeout=300)

        def post(extra: dict[str, Any]) -> Any:
            try:
                return client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0.0,
                                                 extra_body=extra)
            except openai.APIStatusError as exc:
                return exc

        assert post(cached).choices[0].text
        with ThreadPoolExecutor(8) as pool:
            flood = [pool.submit(post, grammar) for grammar in costly]
            hits = [pool.submit(post, cached) for _ in range(2)]
            refused = [f.result() for f in flood if isinstance(f.result(), openai.APIStatusError)]
            assert all(not isinstance(f.result(), openai.APIStatusError) for f in hits)
    assert refused and all(e.status_code == 503 and e.body["code"] == "queue_full"
                           and e.response.headers.get("Retry-After", "").isdigit()  # whole seconds, as RFC 9110 says
                           and int(e.response.headers["Retry-After"]) >= 1 for e in refused)
