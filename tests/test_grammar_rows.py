"""Grammars on the tiny tokenizer: where one choice's constraint starts when its first token may open a thought
(RowGrammar), and what a request sent again is looked up as (the cache, before any conversion)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import llguidance
import pydantic
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from checkpoints import END_THINK_ID, EOS_IDS, THINK_ID, TOKEN_IDS, VOCAB_SIZE
from engine_util import fill_row, shared_tokenizer
from nanoqwen.api import structured
from nanoqwen.api.schema_patterns import ecma_patterns
from nanoqwen.engine import grammar as grammar_module
from nanoqwen.engine import grammar_rows, hop_cycles
from nanoqwen.engine.grammar import Grammar, Grammars, RowGrammar, ToolSpec
from nanoqwen.engine.validation import InvalidRequest
from nanoqwen.sampler import token_bitmask
from nanoqwen.text import TokenBytes
from schema_shapes import (
    ALIKE,
    HOP_CYCLE,
    NAMED_BESIDE_LOOSE,
    ONE_LOOSE_VALUE,
    chain_defs,
    closed_object,
    hop_chain,
    many_patterns,
    named_and_own_pattern,
    named_beside_loose,
    one_loose_value,
    options_with_chains,
    patterns_of_patterns,
    ref_chain,
)
from server_process import REPO_ROOT

PROMPT = [9707, 1879]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> PreTrainedTokenizerFast:
    return shared_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def grammars(tokenizer: PreTrainedTokenizerFast) -> Grammars:
    """Shared by the module's tests (~0.7 s to build); a test that counts its cache builds its own."""
    return Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)


@pytest.fixture(scope="module")
def grammar(grammars: Grammars) -> Grammar:
    return grammars.json_schema({"type": "object"}, strict=False, param="response_format")


@pytest.fixture(scope="module")
def brace(tokenizer: PreTrainedTokenizerFast) -> int:
    (token,) = tokenizer.encode("{")
    return token


def _recorded(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any], modules: tuple[Any, ...],
              name: str) -> list[Any]:
    """The first argument of each call of `fn`, under `name` in each of `modules`, recorded from now on."""
    seen: list[Any] = []

    def wrapper(argument: Any, *rest: Any) -> Any:
        seen.append(argument)
        return fn(argument, *rest)

    for module in modules:
        monkeypatch.setattr(module, name, wrapper)
    return seen


def _mask(row: RowGrammar) -> torch.Tensor:
    bitmask = torch.zeros(1, -(-VOCAB_SIZE // 32), dtype=torch.int32)  # [1, ceil(V/32)]
    fill_row(row, bitmask)
    return bitmask[0]


def _allows(mask: torch.Tensor, token: int) -> bool:
    return bool((mask[token // 32] >> (token % 32)) & 1)


def _plain_mask(grammar: Grammar, tokens: list[int]) -> torch.Tensor:
    """The grammar's own mask after `tokens`: a row constrained from its first token."""
    row = RowGrammar(grammar.matcher(), None, EOS_IDS)
    row.sync(PROMPT + tokens, len(PROMPT))
    return _mask(row)


@pytest.mark.parametrize("opener", [0, THINK_ID, 151679])  # bits 0, 19 and 31 (the int32 word's sign) of a word
def test_the_opener_adds_its_one_bit_to_the_grammars_mask(grammar: Grammar, opener: int) -> None:
    row = RowGrammar(grammar.matcher(), END_THINK_ID, EOS_IDS, may_open=opener)
    plain = _plain_mask(grammar, [])
    assert not _allows(plain, opener)  # else fill setting the opener's bit would change nothing
    assert torch.equal(_mask(row), plain | token_bitmask([opener], VOCAB_SIZE))


def test_a_first_think_frees_the_thought_until_end_think(grammar: Grammar, brace: int) -> None:
    row = RowGrammar(grammar.matcher(), END_THINK_ID, EOS_IDS, may_open=THINK_ID)
    start = _plain_mask(grammar, [])
    assert row.active and not _allows(start, THINK_ID) and _allows(start, brace)
    assert torch.equal(_mask(row), start | token_bitmask([THINK_ID], VOCAB_SIZE))  # the grammar's, and <think>

    row.sync(PROMPT + [THINK_ID], len(PROMPT))
    assert not row.active
    row.sync(PROMPT + [THINK_ID, 9707, THINK_ID, brace], len(PROMPT))  # the thought is free text
    assert not row.active
    row.sync(PROMPT + [THINK_ID, 9707, THINK_ID, brace, END_THINK_ID], len(PROMPT))
    assert row.active and not row.matcher.is_error()
    after = _mask(row)
    assert torch.equal(after, start) and not _allows(after, THINK_ID)  # the grammar's start, <think> no more


def test_a_first_token_other_than_think_is_constrained_at_once(grammar: Grammar, brace: int) -> None:
    row = RowGrammar(grammar.matcher(), END_THINK_ID, EOS_IDS, may_open=THINK_ID)
    row.sync(PROMPT + [brace], len(PROMPT))
    assert row.active and not row.matcher.is_error()
    after = _mask(row)
    assert torch.equal(after, _plain_mask(grammar, [brace]))
    assert not torch.equal(after, _plain_mask(grammar, []))  # the brace was consumed: past the grammar's start


TOOL = ToolSpec("flag", {"type": "object", "properties": {"ok": {"type": "boolean"}}}, strict=True)


@pytest.mark.parametrize("kind,promises", [("json", True), ("required", True), ("auto", False), ("auto_json", True),
                                           ("empty_choice", False)])
def test_only_a_promised_answers_thought_bans_its_stops(grammars: Grammars, kind: str, promises: bool) -> None:
    """A grammar that refuses the empty answer promised something: its thought (after <think>, before </think>)
    may not end the choice. A strict tool under auto promises nothing (no call is an answer): its thought may."""
    grammar = {"json": lambda: grammars.json_schema({"type": "object"}, strict=False, param="p"),
               "required": lambda: grammars.tool_calls([TOOL], True, "p"),
               "auto": lambda: grammars.tool_calls([TOOL], True, "p", free_text=True),
               "auto_json": lambda: grammars.tool_calls([TOOL], True, "p", answer={"type": "object"}),
               "empty_choice": lambda: grammars.from_text("choice", '["", "no"]', "p")}[kind]()
    assert grammar.promises is promises
    row = RowGrammar(grammar.matcher(), END_THINK_ID, EOS_IDS, may_open=THINK_ID, promises=grammar.promises)
    assert not row.bans_stops  # the first token: the grammar's mask decides
    row.sync(PROMPT + [THINK_ID, 9707], len(PROMPT))
    assert row.bans_stops is promises
    row.sync(PROMPT + [THINK_ID, 9707, END_THINK_ID], len(PROMPT))
    assert not row.bans_stops  # the answer: the grammar's mask decides


GBNF = 'root ::= "yes" | "no"'


def test_a_grammar_sent_again_is_not_converted_again(tokenizer: PreTrainedTokenizerFast,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """GBNF -> Lark runs in Python (milliseconds): a cache hit must not pay it, for any kind. A miss looks its key up
    once (twice before: compile looked it up again)."""
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)  # its own cache
    looked_up = _recorded(monkeypatch, grammars.cached, (grammars,), "cached")
    converted: list[tuple[str, str]] = []
    convert, convert_grammar = llguidance.grammar_from, grammar_module.grammar_from_text

    def grammar_from(kind: str, text: str) -> Any:
        converted.append((kind, text))
        return convert(kind, text)

    def grammar_from_text(text: str) -> str:  # the "grammar" kind's (engine/gbnf)
        converted.append(("grammar", text))
        return convert_grammar(text)

    monkeypatch.setattr(grammar_module.llguidance, "grammar_from", grammar_from)
    monkeypatch.setattr(grammar_module, "grammar_from_text", grammar_from_text)
    sent = [("grammar", GBNF), ("regex", "(yes|no)"), ("choice", '["yes", "no"]')]
    first = [grammars.from_text(kind, text, "p") for kind, text in sent]
    again = [grammars.from_text(kind, text, "p") for kind, text in sent]
    assert converted == sent and looked_up == sent * 2
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert grammars.from_text("grammar", GBNF + " ", "p") is not first[0] and len(converted) == 4


FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


@pytest.mark.parametrize("parallel", [False, True])
def test_free_text_calls_are_constrained_once_opened(tokenizer: PreTrainedTokenizerFast, grammars: Grammars,
                                                     parallel: bool) -> None:
    """tool_choice auto with a strict tool: text is free (ordinary tokens; `<tool_call>` opens a call; no other added
    token), EOS where the text may end; an opened call follows the tool's grammar; after it, text again, and another
    call only with `parallel`."""
    grammar = grammars.tool_calls([ToolSpec("f", FLAG, strict=True)], parallel, "tools", free_text=True)
    open_id, close_id = TOKEN_IDS["<tool_call>"], TOKEN_IDS["</tool_call>"]
    text = tokenizer.encode("Hello there")
    for mask in (_plain_mask(grammar, []), _plain_mask(grammar, text)):
        assert all(_allows(mask, token) for token in [*text, open_id, *EOS_IDS]) and not _allows(mask, THINK_ID)
    opened = _plain_mask(grammar, [*text, open_id])
    assert int(sum(bin(word & 0xFFFFFFFF).count("1") for word in opened.tolist())) == 1  # the newline alone
    call = [open_id, *tokenizer.encode('\n{"name": "f", "arguments": {"ok": true}}\n'), close_id]
    after = _plain_mask(grammar, [*text, *call])
    assert _allows(after, open_id) == parallel and all(_allows(after, token) for token in [*text, *EOS_IDS])


def test_free_text_cannot_spell_the_call_tag(grammars: Grammars) -> None:
    """`<tool_call>` spelled with ordinary tokens in a strict tool's free text: the grammar stayed in its free text
    while the parser took the block for a call, its arguments unconstrained (a client's `.parse()` could fail). The
    tag's last piece is refused; its start is text like any other, and the token still opens a call after it."""
    grammar = grammars.tool_calls([ToolSpec("f", FLAG, strict=True)], True, "tools", free_text=True)
    spelled = grammars._tokenizer.tokenize_str("Hi <tool_call>")
    assert TOKEN_IDS["<tool_call>"] not in spelled and len(spelled) > 2
    matcher = grammar.matcher()
    assert all(matcher.consume_token(token) for token in spelled[:-1]) and not matcher.is_error()
    assert not _allows(_plain_mask(grammar, spelled[:-1]), spelled[-1])
    assert matcher.consume_token(TOKEN_IDS["<tool_call>"]) and not matcher.is_error()


def test_calls_or_a_json_format_take_one_cache_slot_and_a_hit_rewrites_nothing(
        tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON response_format beside tools: its own 400 names its field (as the client's request names it: a
    Responses request's text.format) without a grammar compiled for it (each new schema took two cache slots), and a
    request sent again finds its grammar before its schemas' patterns are rewritten (or its Lark converted)."""
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)  # its own cache
    rewritten: list[Any] = []
    monkeypatch.setattr(structured, "ecma_patterns",
                        lambda schema, *args: rewritten.append(schema) or ecma_patterns(schema, *args))
    tools = [ToolSpec("f", FLAG, strict=True)]
    answer = structured.JsonAnswer({"type": "object", "properties": {"a": {"type": "integer"}}}, False, "text.format")
    key = structured._tool_calls_key(tools, False, answer, True)
    first = structured._tool_calls(grammars, tools, False, answer, True, key)
    assert grammars.cache_stats()[0] == 1 and len(rewritten) == 2
    assert structured._looked_up(grammars, structured._tool_calls_key, tools, False, answer, True) == (key, first)
    assert len(rewritten) == 2
    gone = structured.JsonAnswer({"$ref": "#/$defs/gone"}, False, "text.format")
    with pytest.raises(InvalidRequest) as info:
        structured._tool_calls(grammars, tools, False, gone, True, structured._tool_calls_key(tools, False, gone, True))
    assert info.value.param == "text.format" and grammars.cache_stats()[0] == 1


def test_a_request_queued_behind_one_that_sent_the_same_finds_its_grammar_before_rewriting(
        grammars: Grammars, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both missed where they were looked up, in the tokenising pool: in the grammars' pool the second finds the first's
    grammar (it rewrote the schema's patterns and converted it again before the compile looked it up)."""
    args = (FLAG, True, "response_format", False)
    key = structured._json_key(*args)
    first = structured._made(grammars, key, structured._json_key, structured._json_schema, *args)
    rewritten: list[Any] = []
    monkeypatch.setattr(structured, "ecma_patterns",
                        lambda schema, *args: rewritten.append(schema) or ecma_patterns(schema, *args))
    assert structured._made(grammars, key, structured._json_key, structured._json_schema, *args) is first
    assert not rewritten


def test_a_miss_weighs_each_schema_once_on_the_object_sent(tokenizer: PreTrainedTokenizerFast,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A lenient tool under auto and a JSON answer were weighed when checked alone and again inside the calls' grammar,
    parsed back from its text (and a JSON format parsed back from llguidance's): each is weighed once, as sent."""
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)  # its own cache
    weighed = _recorded(monkeypatch, grammar_rows.schema_weight, (grammar_rows, grammar_module), "schema_weight")
    sent = {"type": "object", "properties": {"n": {"type": "integer"}}}
    grammars.json_schema(sent, strict=False, param="response_format")
    assert len(weighed) == 1 and weighed[0] is sent
    weighed.clear()
    tools, answer = [ToolSpec("f", FLAG)], structured.JsonAnswer(sent, False, "response_format")
    structured._tool_calls(grammars, tools, False, answer, True, structured._tool_calls_key(tools, False, answer, True))
    as_sent = [{k: v for k, v in schema.items() if k != "x-guidance"} for schema in weighed if schema]
    assert sorted(as_sent, key=len) == [sent, FLAG]  # each once (an empty `{}`: a rule's place, weighed apart)


def test_a_json_schema_miss_counts_its_rules_once(tokenizer: PreTrainedTokenizerFast,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON Schema's rules (rules_bound, a pass over a grammar text that may be megabytes) were counted before its
    walk and again with its weighing (check_bounds), compiled as checked: once, on the text sent, before the walk."""
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)  # its own cache
    counted = _recorded(monkeypatch, grammar_module.rules_bound, (grammar_module,), "rules_bound")
    sent = {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "$defs": {"n": {"type": "integer"}}}
    grammars.json_schema(sent, strict=False, param="response_format")
    assert counted == [grammar_module._json_grammar(sent, False, "p")]
    counted.clear()
    grammar_module.held_json_schema(sent, True, "response_format")
    assert counted == [grammar_module._json_grammar(sent, True, "p")]
    counted.clear()  # a schema cut (a cycle of bare `$ref`s where a value may be absent): its cut copy not counted
    cut = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": HOP_CYCLE}
    grammar_module.held_json_schema(cut, True, "response_format")
    assert counted == [grammar_module._json_grammar(cut, True, "p")]


def test_a_hop_cycle_is_cut_before_the_weighing_on_a_copy_sharing_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A property not required whose value is a cycle of bare `$ref`s: the schema is cut (cut_hops) before it is
    weighed, and only the copy with the cycle `false` is weighed, once; the copy shares every subschema off the way to
    the cycle with the schema sent (a whole copy, a second parse of its JSON, was made and weighed) and leaves that
    unchanged. llguidance checks it twice, as before: the cut's check of the copy, held_json_schema's own."""
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(50)}}
    sent = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}, "y": {"$ref": "#/$defs/big"}},
            "$defs": {**HOP_CYCLE, "big": big}}
    as_sent = json.loads(json.dumps(sent))
    weighed = _recorded(monkeypatch, grammar_rows.schema_weight, (grammar_rows, grammar_module), "schema_weight")
    checks: list[str] = []

    def validate(text: str) -> str:
        checks.append(text)
        return llguidance.LLMatcher.validate_grammar(text)

    for module in (grammar_module, hop_cycles):
        monkeypatch.setattr(module, "LLMatcher", type("Matcher", (), {
            "grammar_from_json_schema": staticmethod(llguidance.LLMatcher.grammar_from_json_schema),
            "validate_grammar": staticmethod(validate)}))
    held, weight = grammar_module.held_json_schema(sent, True, "response_format")
    assert weighed == [held] and weighed[0] is held and weight == 2  # y's `$ref`, REF_LINK
    assert held["properties"]["x"] is False and held["$defs"]["a"] is False and held["$defs"]["b"] is False
    assert held["$defs"]["big"] is big and held["properties"]["y"] is sent["properties"]["y"]
    assert sent == as_sent and len(checks) == 2


@pytest.mark.parametrize("opener", [None, THINK_ID])
def test_a_rows_first_mask_is_the_compiled_one_then_its_matchers(grammar: Grammar, brace: int,
                                                                 opener: int | None) -> None:
    """The first mask is computed once, at compile (where building the lexer may take 0.25 s), not on the engine
    thread for each choice; from the first token the row's matcher computes its own."""
    assert torch.equal(torch.from_numpy(grammar.first_mask.copy()), _plain_mask(grammar, []))
    marked = token_bitmask([brace], VOCAB_SIZE)  # not the grammar's first mask: shows which one the row used
    row = RowGrammar(grammar.matcher(), END_THINK_ID if opener else None, EOS_IDS, may_open=opener,
                     first_mask=marked.numpy())
    assert torch.equal(_mask(row), marked | token_bitmask([opener] if opener else [], VOCAB_SIZE))
    row.sync(PROMPT + [brace], len(PROMPT))
    assert row.first_mask is None and torch.equal(_mask(row), _plain_mask(grammar, [brace]))


def test_a_row_starts_from_its_grammars_compiled_first_mask(grammar: Grammar) -> None:
    """RowGrammar.of, the engine's one way to make a choice's matcher, takes the mask computed at compile (read-only:
    every choice shares it), so the engine thread never builds the lexer."""
    row = RowGrammar.of(grammar, None, EOS_IDS)
    assert row.first_mask is grammar.first_mask and not grammar.first_mask.flags.writeable
    assert row.promises == grammar.promises and row.source is grammar


def test_a_matcher_that_spends_its_fuel_spoils_its_grammar_for_later_requests(
        tokenizer: PreTrainedTokenizerFast) -> None:
    """The copies of a compiled grammar share its lexer, whose fuel error stays: once a choice's matcher errs (its
    request fails; its row allows EOS only, the token dropped), the cache compiles the text afresh, so later requests
    with it do not fail too."""
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)
    (a,), (b,) = tokenizer.encode("a"), tokenizer.encode("b")
    grammar = grammars.from_text("regex", "b{1,5}|a{100000}", "structured_outputs.regex")
    row, tokens = RowGrammar.of(grammar, None, EOS_IDS), [a]
    row.sync(PROMPT + tokens, len(PROMPT))
    for _ in range(3):  # past its fuel (the lexer of a{100000} is not built) the matcher errs within a token or two
        mask = _mask(row)
        if row.matcher.is_error():
            break
        word = int(torch.nonzero(mask)[0])  # the first token allowed
        tokens.append(word * 32 + (int(mask[word]) & 0xFFFFFFFF).bit_length() - 1)
        row.sync(PROMPT + tokens, len(PROMPT))
    assert row.error == "lexer error: too many expressions constructed"  # llguidance's, its appended marker cut
    assert torch.equal(mask, token_bitmask(EOS_IDS, mask.numel() * 32))
    assert grammar.spoiled and grammars.cached(("regex", "b{1,5}|a{100000}")) is None
    fresh = grammars.from_text("regex", "b{1,5}|a{100000}", "structured_outputs.regex")
    assert fresh is not grammar and not fresh.spoiled
    later = RowGrammar.of(fresh, None, EOS_IDS)
    later.sync(PROMPT + [b], len(PROMPT))
    assert _allows(_mask(later), b) and not later.matcher.is_error()


def test_what_llguidance_appends_to_an_error_is_cut() -> None:
    """A panic's backtrace (kB of the server's build paths) and the non-verbose marker stay out of the 400."""
    for appended in ("\n<backtrace>\n  0: llguidance::x at /home/build/src/lib.rs:1\n</backtrace>", "\n<non-verbose/>"):
        error = grammar_module._invalid("response_format", f"panic: too many symbols{appended}")
        assert str(error) == "invalid response_format: panic: too many symbols"


def test_a_grammar_past_max_rules_is_refused_before_llguidance_sees_it(grammars: Grammars) -> None:
    """rules_bound counts what may begin a rule (not a rule's `|` lines, blanks or comments) and each `$ref` twice,
    also as JSON spells it inside a Lark `%json` (`\\u0024ref`): a chain of either that long overflowed the compile's
    stack."""
    assert grammar_module.rules_bound('start: a\n  | "b"\n\n// note\na: "x"\n%json {"$ref": "#", "\\u0024ref": 1}') == 7
    assert grammar_module.rules_bound('%json {"$r\\u0065f": "#", "\\u0024\\u0072ef": "#"}') == 5  # any letter escaped
    lines = grammar_module.MAX_RULES // 3 + 1
    unchained = "start: r0\n" + "".join(f'r{i}: %json {{"\\u0024ref": "#/x"}}\n' for i in range(lines))
    with pytest.raises(InvalidRequest, match="more than 12000 rules") as refused:
        grammars.compile(unchained, "guided_grammar")
    assert refused.value.param == "guided_grammar"


def _links(n: int, link: str = "r{i}: r{j} | \"b\"") -> str:
    return "start: r0\n" + "".join(link.format(i=i, j=i + 1) + "\n" for i in range(n)) + f'r{n}: "a"\n'


def test_row_weight_counts_at_least_the_items_of_one_parser_row() -> None:
    """llguidance's row holds an item a link of a chain when its last token is scanned (3,001 for 3,000 rules each
    naming the next; 2,201 for 1,100 `anyOf [$ref, type]`s), and one an alternative open after a shared first token
    (6,001 for 6,000): row_weight counts each alternative and each named rule's weight (a chain: two a link), a `$ref`
    two; recursion, strings, regexes, special tokens and comments nothing; a `%json` inside a rule its `$ref` chain."""
    weight = grammar_rows.row_weight
    assert weight(_links(10)) == 22
    assert weight(llguidance.grammar_from("grammar", 'root ::= r0\n' + "".join(
        f'r{i} ::= r{i + 1} | "b"\n' for i in range(10)) + 'r10 ::= "a"')) == 1  # GBNF's: terminals, the lexer's
    assert weight(grammar_module._json_grammar(ref_chain(10, "boolean"), True, "p")) == 2 + 22  # and the root's $ref
    assert weight(grammar_module._json_grammar({"anyOf": [{"type": "object"}] * 1_001}, True, "p")) == 1_001
    assert weight('start: "r1: r2" r1 <[5]> // r2\nr1: /r2: x/ "b" | r1 r1 | start\nr2: r1') == 5
    assert weight("start: " + " | ".join(f"r{i}" for i in range(9)) + "\n" + "".join(
        f'r{i}: "w"\n' for i in range(9))) == 18
    assert weight('start: "a"\n' + "".join(f'  | "w{i}"\n' for i in range(9))) == 10
    assert weight('start: T | "b" T\nT: "a"\n' + "".join(f'  | "w{i}"\n' for i in range(9))) == 2  # the lexer's
    assert weight("start: a b | c? d\n" + "".join(f'{r}: "{r}" | "_"\n' for r in "abcd")) == 2 + 2 + 2 + 2  # not b
    assert weight(f'start: r0\nr0: r1 | "b"\nr1: %json {json.dumps(ref_chain(10, "boolean"))}') == 1 + 2 + 25


NULLABLE_LINKS = {  # a chain's link whose next link follows something that may match nothing, and what it names
    "optional": ('r{i}: q? r{j} | "b"', 'q: "q"'), "bracketed": ('r{i}: [q] r{j} | "b"', 'q: "q"'),
    "starred": ('r{i}: q* r{j} | "b"', 'q: "q"'), "empty alternative": ('r{i}: e r{j} | "b"', 'e: "q" |'),
    "optional rule": ('r{i}: e r{j} | "b"', 'e: f\nf: "q"?'), "empty string": ('r{i}: "" r{j} | "b"', ""),
    "empty regex": ('r{i}: /q*/ r{j} | "b"', ""), "empty terminal": ('r{i}: E r{j} | "b"', "E: /q*/"),
    "optional group": ('r{i}: (q | "") r{j} | "b"', 'q: "q"'), "range": ('r{i}: q~0..2 r{j} | "b"', 'q: "q"'),
    "braces": ('r{i}: q{{0,2}} r{j} | "b"', 'q: "q"'), "two empty": ('r{i}: e e r{j} | "b"', 'e: "q"?'),
}


@pytest.mark.parametrize("shape", NULLABLE_LINKS)
def test_a_chain_through_what_may_match_nothing_weighs_its_links(grammars: Grammars, shape: str) -> None:
    """Each of these, 2,100 links long, ended the answer after its first token in llguidance (4,200 items in the row:
    two a link); the next link after a rule that may be empty (`e: "q" |`), `""` or an empty regex weighed nothing
    (3 for the chain): now at least two a link, and a chain past MAX_ROW is refused naming the field."""
    link, extra = NULLABLE_LINKS[shape]
    links = grammar_module.MAX_ROW // 2 + 10
    assert grammar_rows.row_weight(_links(links, link) + extra) >= 2 * links
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammars.compile(_links(links, link) + extra, "guided_grammar")
    assert refused.value.param == "guided_grammar"


def test_what_follows_a_terminal_starts_no_row() -> None:
    """`"x" e r`: r follows the terminal (each link its own token: llguidance generated 2,100 of them), not a chain:
    the row after "x" holds e's first row and r's (1 + 2), with the rule's 2 alternatives, at every link."""
    assert grammar_rows.row_weight(_links(2_100, 'r{i}: "x" e r{j} | "b"') + 'e: "q"?') == 2 + 3
    rules = "".join(f'{r}: "{r}" | "_"\n' for r in "abcdefg")
    assert grammar_rows.row_weight('start: "x" a? b | (c | "") d? e [f] g\n' + rules) == 3 + 3 * 2  # c, d, e


def _optional_run(n: int, head: str = "") -> str:
    """`head`, then `n` distinct optional literals in a row, then one that must come."""
    return "start: " + head + " ".join(f'"w{i}x"?' for i in range(n)) + ' "z"'


def _follows(grammars: Grammars, tokenizer: PreTrainedTokenizerFast, text: str, answer: str | None = None) -> bool:
    """Whether llguidance follows `text` through `answer` (by default "qw0xw5xz", "w0xw5xz" where it has no "q") to
    its end."""
    matcher = llguidance.LLMatcher(grammars._tokenizer, text, log_level=0, limits=grammar_module.LIMITS)
    for token in tokenizer.encode(answer or ("qw0xw5xz" if '"q"' in text else "w0xw5xz")):
        matcher.compute_bitmask()
        if matcher.is_error() or not matcher.consume_token(token):
            return False
    return not matcher.is_error()


def test_a_run_of_pieces_that_may_be_empty_weighs_an_item_each(grammars: Grammars,
                                                               tokenizer: PreTrainedTokenizerFast) -> None:
    """The row before a run of n optional pieces holds 2n + 1 items in llguidance, at an alternative's start or after a
    token: 999 are followed to the end, 1,000 end the answer at that token (a 200 that failed: they weighed 1). Now a
    rule weighs its longest run of pieces that each follow one that may be empty (a rule named there weighs its link
    alone), and past MAX_ROW it is the 400 naming the field; 32,000 `"a"*` had held a compile thread 17-35 s before
    llguidance's own 400."""
    bound = grammar_module.MAX_ROW - 1
    assert grammar_rows.row_weight(_optional_run(bound)) == grammar_module.MAX_ROW
    assert grammar_rows.row_weight(_optional_run(bound, '"q" ')) == grammar_module.MAX_ROW
    assert grammar_rows.row_weight('start: ' + '"a"? "b" ' * 3_000) == 2  # runs apart: each its own row
    # 2 alternatives (its `|`), then "b"*, the group (one that may not be empty made optional: no item more; 499 of
    # `("wix" | "vix")?` are followed, 500 not) and "e" (all before each may be empty); "f"? follows "e"
    assert grammar_rows.row_weight('start: "a"* "b"* ("c" | "d")? "e" "f"?') == 2 + 3
    assert grammar_rows.row_weight('start: r r r\nr: "x"?') == 1 + 3  # the links' only
    for head in ("", '"q" '):
        assert _follows(grammars, tokenizer, _optional_run(bound, head))
        assert not _follows(grammars, tokenizer, _optional_run(bound + 1, head))
        grammars.from_text("grammar", _optional_run(bound, head), "guided_grammar")
    for text in (_optional_run(bound + 1), _optional_run(bound + 1, '"q" '),
                 "start: " + " ".join(['"a"*'] * 32_000) + ' "z"'):
        with pytest.raises(InvalidRequest, match="parser row") as refused:
            grammars.from_text("grammar", text, "guided_grammar")
        assert refused.value.param == "guided_grammar"


def _run(n: int, letter: str = "w") -> str:
    """`n` distinct optional literals in a row."""
    return " ".join(f'"{letter}{i}x"?' for i in range(n))


# n optional pieces in a row, through groups and rules named (each holding "w0x" and "w5x")
RUN_SHAPES: dict[str, Callable[[int], str]] = {
    "in a group": lambda n: f'start: "q" ({_run(n)}) "z"',
    "in a rule named": lambda n: f'start: "q" r "z"\nr: {_run(n)}',
    "in groups nested": lambda n: f'start: "q" ({_run(n // 2)} ({_run(n - n // 2, "v")})) "z"',
    "in two rules named": lambda n: f'start: "q" r s "z"\nr: {_run(n // 2)}\ns: {_run(n - n // 2, "v")}',
    "out of a group": lambda n: f'start: ("q" {_run(n // 2)}) {_run(n - n // 2, "v")} "z"',
    "out of a rule": lambda n: f'start: r {_run(n - n // 2, "v")} "z"\nr: "q" {_run(n // 2)}',
    "in a group's alternatives": lambda n: f'start: "q" ({_run(n // 2)} | {_run(n - n // 2, "v")}) "z"',
    "in a group's alternative after one": lambda n: f'start: "q" ({_run(n)} | "k" {_run(n, "v")}) "z"',
    "in a rule's alternatives": lambda n: f'start: "q" r "z"\nr: {_run(n // 2)} | {_run(n - n // 2, "v")}',
    "in a group made optional": lambda n: f'start: "q" [{_run(n)}] "z"',
    "in a group repeated": lambda n: f'start: "q" ({_run(n)})* "z"',
    "in regexes after a token": lambda n: 'start: "q" ' + " ".join(f"/(w{i}x)?/" for i in range(n)) + ' "z"',
    "after a %regex": lambda n: f'start: "q" %regex {{"substring_words": "a b"}} {_run(n)} "z"',
    "in optional rules named, chained": lambda n: "start: r0\n" + "".join(f'r{i}: "w{i}x"? r{i + 1}?\n'
                                                                          for i in range(n)) + f'r{n}: "z"',
    # the run after "k" goes on, by the loop, into the group again
    "in a group repeated, back": lambda n: f'start: "q" ({_run(n // 2, "a")} "k" {_run(n - n // 2, "b")})* "z"',
    "in a group repeated once or more, back": lambda n: (f'start: "q" ({_run(n // 2, "a")} "k" '
                                                         f'{_run(n - n // 2, "b")})+ "z"'),
    # the run after "k" goes on, by the loops, into the groups again though they may be empty
    "in groups repeated, nested, back": lambda n: (f'start: "q" (({_run(n // 3, "a")} "k" {_run(n // 3, "b")})* '
                                                   f'{_run(n - 2 * (n // 3), "c")})* "z"'),
    "in a group repeated once or more, back over an optional token": lambda n: (
        f'start: "q" ({_run(n // 2, "a")} "k"? {_run(n - n // 2, "b")})+ "z"'),
    "in a group repeated once or more, back over a token made optional": lambda n: (
        f'start: "q" ({_run(n // 2, "a")} ["k"] {_run(n - n // 2, "b")})+ "z"'),
    # the run after "k" goes on after the rule named in itself
    "out of a rule recursive on the left": lambda n: (f'start: "q" r "z"\nr: "k" {_run(n // 2)} | r '
                                                      f'{_run(n - n // 2, "v")}'),
    "out of a rule recursive on the left in several alternatives": lambda n: (
        f'start: "q" r "z"\nr: "k" {_run(n // 3)} | r {_run(n // 3, "v")} | r {_run(n - 2 * (n // 3), "u")}'),
    "out of a rule recursive on the left through rules": lambda n: (
        f'start: "q" a "z"\na: "k" {_run(n // 3)} | b {_run(n // 3, "v")} | c {_run(n - 2 * (n // 3), "u")}\n'
        'b: a\nc: a'),
    "out of a rule recursive on the right": lambda n: (f'start: "q" r "z"\nr: "k" {_run(n // 2)} | "m" r '
                                                       f'{_run(n - n // 2, "v")}'),
    "out of rules recursive in each other": lambda n: (f'start: "q" b "z"\nb: "k" {_run(n // 2)} | a "m"\n'
                                                       f'a: b {_run(n - n // 2, "v")}'),
    "out of rules recursive in each other, defined the other way": lambda n: (
        f'start: "q" b "z"\na: b {_run(n - n // 2, "v")}\nb: "k" {_run(n // 2)} | a "m"'),
}
# what llguidance follows in a shape (_follows): "qw0xw5xz" but where a shape has its own
ANSWERS = {"in optional rules named, chained": "w0xw1xz", "in a group repeated, back": "qkz",
           "in a group repeated once or more, back": "qkz", "in groups repeated, nested, back": "qkz",
           "in a group repeated once or more, back over an optional token": "qa0xkz",
           "in a group repeated once or more, back over a token made optional": "qa0xkz",
           "out of a rule recursive on the left": "qkz",
           "out of a rule recursive on the left in several alternatives": "qkz",
           "out of a rule recursive on the left through rules": "qkz",
           "out of a rule recursive on the right": "qmkz", "out of rules recursive in each other": "qkz",
           "out of rules recursive in each other, defined the other way": "qkz"}


@pytest.mark.parametrize("shape", RUN_SHAPES)
def test_a_run_goes_on_through_groups_and_rules_named(grammars: Grammars, tokenizer: PreTrainedTokenizerFast,
                                                     shape: str) -> None:
    """A run inside a group was weighed apart from the run around it, and one in a rule named after a token not at
    all: `"q" (1,000 optional pieces) "z"` weighed 1,000 (served) while llguidance's row after "q" held 2,001 items, a
    200 that failed at its first token. Now a run goes on into and out of groups and rules named, a group's
    alternatives' runs add up, and the most pieces row_weight serves is, in each shape, the most llguidance follows."""
    make = RUN_SHAPES[shape]
    low, high = 1, 2_100  # the most pieces within MAX_ROW: between them
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if grammar_rows.row_weight(make(middle)) <= grammar_module.MAX_ROW else (low,
                                                                                                         middle - 1)
    assert 400 < low < 2_100
    answer = ANSWERS.get(shape)  # served: the most llguidance follows, or one less (a loop back's items are near)
    assert _follows(grammars, tokenizer, make(low), answer) and not _follows(grammars, tokenizer, make(low + 2), answer)


def _linked(n: int, node: Any, ref: Any, root: dict[str, Any] | None = None) -> dict[str, Any]:
    """ref_chain's chain with node(i) in each link and ref(i) naming it."""
    defs = {f"d{i}": {**node(i), "anyOf": [{"$ref": ref(i + 1)}, {"type": "integer"}]} for i in range(n)}
    return {**(root or {}), "$ref": ref(0), "$defs": {**defs, f"d{n}": {**node(n), "type": "boolean"}}}


@pytest.mark.parametrize("shape", ["anchor", "urn", "url", "relative", "url pointer"])
def test_a_chain_of_refs_by_anchor_or_id_weighs_its_links(shape: str) -> None:
    """A `$ref` by `$anchor` or by a subschema's `$id` chains as `#/$defs/...` does: 1,100 links of each ended the
    answer after a digit in llguidance (2,201 items in the row), and weighed 2 or 4 (unresolved): refused now."""
    root = {"$id": "http://x.test/root.json"}
    schema = {"anchor": lambda: _linked(1_100, lambda i: {"$anchor": f"a{i}"}, lambda i: f"#a{i}"),
              "urn": lambda: _linked(1_100, lambda i: {"$id": f"urn:x:d{i}"}, lambda i: f"urn:x:d{i}"),
              "url": lambda: _linked(1_100, lambda i: {"$id": f"http://x.test/d{i}"}, lambda i: f"http://x.test/d{i}"),
              "relative": lambda: _linked(1_100, lambda i: {"$id": f"d{i}.json"}, lambda i: f"d{i}.json", root),
              "url pointer": lambda: _linked(1_100, lambda i: {}, lambda i: f"root.json#/%24defs/d{i}", root)}[shape]()
    assert grammar_rows.row_weight(grammar_module._json_grammar(schema, True, "p")) == 2 * 1_100 + 4
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(schema, True, "response_format")
    assert refused.value.param == "response_format"


def test_a_chain_of_bare_refs_adds_no_items(grammars: Grammars, tokenizer: PreTrainedTokenizerFast) -> None:
    """500 `$ref`s each naming the next (hops) to an integer: llguidance compiles a hop as its target, its row 2
    items, and the hops had weighed 2 items each (1,002: a 400 for a schema llguidance follows). Now a hop to a hop
    adds none; hops that lead to a chain of `anyOf` links still weigh its links (300 hops to 450 links, 901 items in
    llguidance's row), and options that go on alike into such hops add their chains up (a 400)."""
    hops = {"$ref": "#/$defs/h0", "$defs": hop_chain(500)}
    assert grammar_module.check_json_schema(hops, True, "p") == 2
    assert _follows_schema(grammars, tokenizer, hops, "5")
    into_chain = {"$ref": "#/$defs/h0", "$defs": hop_chain(300, {"$ref": "#/$defs/d0"}) | chain_defs("d", 450)}
    assert grammar_module.check_json_schema(into_chain, True, "p") >= 2 * 450 + 1
    alike = options_with_chains(5, 240, lambda j, chain: closed_object({"x": {"$ref": f"#/$defs/h{j}_0"}}))
    for j in range(5):
        alike["$defs"] |= hop_chain(200, {"$ref": f"#/$defs/c{j}_0"}, f"h{j}_")
    assert grammar_rows.schema_weight(alike) >= 5 * (2 * 240 + 1)


def test_a_long_chain_of_bare_refs_is_merged_in_linear_work() -> None:
    """5,000 hops: the objects' merge walked the chain from each hop to its end (work quadratic in its length: past
    ~630 hops MAX_WORK, a 400 for a schema llguidance compiles as its target). Each hop's end is found once: the
    pattern rewrite's checks pass, and the chain weighs 2."""
    schema = {"$ref": "#/$defs/h0", "$defs": hop_chain(5_000)}
    assert grammar_rows.schema_weight(ecma_patterns(schema, "response_format")) == 2


def test_a_dynamic_ref_is_refused_or_ignored() -> None:
    """llguidance implements no `$dynamicRef`: strict, the 400 naming the field; lenient, ignored (no chain)."""
    schema = _linked(1_100, lambda i: {"$anchor": f"a{i}"}, lambda i: f"#a{i}")
    dynamic = json.loads(json.dumps(schema).replace('"$ref"', '"$dynamicRef"'))
    with pytest.raises(InvalidRequest, match="dynamicRef") as refused:
        grammar_module.check_json_schema(dynamic, True, "response_format")
    assert refused.value.param == "response_format"
    assert grammar_rows.row_weight(grammar_module._json_grammar(dynamic, False, "p")) == 2  # the anyOf alone


def test_a_grammar_past_max_row_is_refused_before_llguidance(grammars: Grammars,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain, or a long alternation, llguidance would compile and then end after its first token: refused naming
    the param, in compile as in check_json_schema, before llguidance sees the grammar."""
    half = grammar_module.MAX_ROW // 2
    for text in [_links(half), 'start: "a"\n' + "".join(f'  | "w{i}"\n' for i in range(grammar_module.MAX_ROW))]:
        with pytest.raises(InvalidRequest, match=f"may hold 10\\d\\d items, past {grammar_module.MAX_ROW}") as refused:
            grammars.compile(text, "guided_grammar")
        assert refused.value.param == "guided_grammar"

    def compiled(*_: Any) -> str:
        raise AssertionError("llguidance saw the grammar")

    monkeypatch.setattr(grammar_module, "LLMatcher", type("Matcher", (), {
        "grammar_from_json_schema": staticmethod(llguidance.LLMatcher.grammar_from_json_schema),
        "validate_grammar": staticmethod(compiled)}))
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(ref_chain(half), True, "response_format")
    assert refused.value.param == "response_format"


def test_the_deepest_chain_accepted_generates_to_its_end(grammars: Grammars,
                                                         tokenizer: PreTrainedTokenizerFast) -> None:
    """The longest chain within MAX_ROW: its last token fills a row with every link, within llguidance's limit; the
    answer goes on after it (1,500 rules erred there) and ends where the grammar does."""
    chain = _links(grammar_module.MAX_ROW // 2 - 1).replace("start: r0", 'start: r0 "xyz"')
    assert grammar_rows.row_weight(chain) == grammar_module.MAX_ROW
    grammar = grammars.compile(chain, "p")
    matcher = grammar.matcher()
    for token in tokenizer.encode("bxyz"):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting() and not matcher.is_error()


def _shared_first(alternatives: int, links: int, first: Callable[[int], str] = lambda j: "b",
                  inline: bool = False) -> str:
    """`alternatives` alternatives each starting with the literal first(j), then a chain of its own of `links` links
    (`dj_i: dj_{i+1} | "b"`, `dj_links: "a"`): named (`aj: "b" dj_0`), or `inline` in start's own alternatives."""
    heads = [f'"{first(j)}" d{j}_0' for j in range(alternatives)]
    text = "start: " + " | ".join(heads if inline else [f"a{j}" for j in range(alternatives)]) + "\n"
    text += "" if inline else "".join(f"a{j}: {head}\n" for j, head in enumerate(heads))
    return text + _chains(alternatives, links)


def _chains(alternatives: int, links: int) -> str:
    """`alternatives` chains of `links` links each (`dj_i: dj_{i+1} | "b"`, `dj_links: "a"`): 2 items a link in the row
    after the token before `dj_0`."""
    return "".join(f'd{j}_{i}: d{j}_{i + 1} | "b"\n' for j in range(alternatives) for i in range(links)) + \
        "".join(f'd{j}_{links}: "a"\n' for j in range(alternatives))


@pytest.mark.parametrize("inline", [False, True])
def test_alternatives_sharing_a_first_lexeme_add_up_their_rows_after_it(grammars: Grammars,
                                                                        tokenizer: PreTrainedTokenizerFast,
                                                                        inline: bool) -> None:
    """After a first "b" llguidance's row holds each alternative starting with it, its chain's first row (2 items a
    link): 4 chains of 450 links, 3,604 items, past its 2,000, ended the answer there, and weighed 902 (the largest
    chain's window alone: served). Now the rows after a first lexeme add up across the alternatives that may start
    with it, named or inline, and such a grammar is the 400 naming the field; alternatives starting with distinct
    literals (a tool's call each) still weigh their largest, and llguidance follows them."""
    shared, apart = _shared_first(4, 450, inline=inline), _shared_first(4, 450, lambda j: f"b{j}", inline)
    assert not _follows(grammars, tokenizer, shared, "bb")
    assert grammar_rows.row_weight(shared) >= 4 * (2 * 450 + 1)
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammars.compile(shared, "guided_grammar")
    assert refused.value.param == "guided_grammar"
    assert _follows(grammars, tokenizer, apart, "b3b") and grammar_rows.row_weight(apart) <= grammar_module.MAX_ROW
    grammars.compile(apart, "guided_grammar")
    within = _shared_first(4, 120, inline=inline)  # 4 x 241 items: served, and followed
    assert grammar_rows.row_weight(within) <= grammar_module.MAX_ROW and _follows(grammars, tokenizer, within, "bb")


def _group_after(before: str, first: Callable[[int], str], links: int = 450) -> str:
    """`start: <before> ("<first(0)>" d0_0 | ... | "<first(3)>" d3_0)`: a group of 4 alternatives after a token or a
    rule named (`x: "q"`), each then a chain of its own."""
    heads = " | ".join(f'"{first(j)}" d{j}_0' for j in range(4))
    return f"start: {before} ({heads})\n" + ('x: "q"\n' if before == "x" else "") + _chains(4, links)


def _refused_as_a_wide_row(grammars: Grammars, text: str) -> None:
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammars.compile(text, "guided_grammar")
    assert refused.value.param == "guided_grammar"


@pytest.mark.parametrize("before", ['"q"', "x"])
def test_a_group_after_a_piece_adds_up_the_rows_after_its_shared_first_lexeme(grammars: Grammars,
                                                                              tokenizer: PreTrainedTokenizerFast,
                                                                              before: str) -> None:
    """A group's alternatives sharing a first "b" after a token or a rule named: llguidance's row after "qb" holds
    each one's chain (3,604 items) and failed there; the group's rows after its first lexemes were counted only at a
    rule's start (weighed 905, served). Now wherever the group is; distinct first literals still weigh their largest."""
    shared, apart = _group_after(before, lambda j: "b"), _group_after(before, lambda j: f"b{j}")
    assert not _follows(grammars, tokenizer, shared, "qbb")
    _refused_as_a_wide_row(grammars, shared)
    assert _follows(grammars, tokenizer, apart, "qb3b") and grammar_rows.row_weight(apart) <= grammar_module.MAX_ROW
    within = _group_after(before, lambda j: "b", 120)
    assert grammar_rows.row_weight(within) <= grammar_module.MAX_ROW and _follows(grammars, tokenizer, within, "qbb")


def test_case_insensitive_strings_start_alike_with_any_lexeme(grammars: Grammars,
                                                              tokenizer: PreTrainedTokenizerFast) -> None:
    """`"b"i` (also "B"): its flag was read as a rule named after the string, which ended the window after "b" there
    (4 alternatives `"b"i dj_0`: 905, served; llguidance failed after "bb"). Now it is a lexeme that may match
    another's text (ANY), and the row after it adds up every alternative's chain."""
    heads = " | ".join(f'"b"i d{j}_0' for j in range(4))
    shared, within = f"start: {heads}\n" + _chains(4, 450), f"start: {heads}\n" + _chains(4, 120)
    assert not _follows(grammars, tokenizer, shared, "bb")
    _refused_as_a_wide_row(grammars, shared)
    assert grammar_rows.row_weight(within) <= grammar_module.MAX_ROW and _follows(grammars, tokenizer, within, "Bb")


def _optional_firsts(elements: int) -> str:
    """`start: a? a? ... "x"` (`elements` of them), `a` a rule of 1,024 optional distinct strings (its Firsts full)."""
    return "a: " + " ".join(f'"s{i}"?' for i in range(1_024)) + "\nstart: " + "a? " * elements + '"x"\n'


def test_the_firsts_work_grows_a_few_entries_a_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `a?` at start's start carried a's 1,024 Firsts into the alternative's, and shifted them all by its weight:
    30,000 of them (98 KB) held a compile thread 18 s (0.10 s before Firsts). Now a grammar's Firsts entries touched
    are bounded (FIRSTS_WORK), past it each Firsts is one ANY: counted, not timed, a few entries a piece past the
    budget (3,072 on main), and still refused (the fold errs high)."""
    touched = [0]
    add = grammar_rows._add_firsts

    def counting(into: dict[int, int], more: dict[int, int], *rest: Any) -> None:
        touched[0] += len(more)
        add(into, more, *rest)

    monkeypatch.setattr(grammar_rows, "_add_firsts", counting)
    counts = []
    for elements in (5_000, 20_000):
        text, touched[0] = _optional_firsts(elements), 0
        assert grammar_rows.row_weight(text) > grammar_module.MAX_ROW
        counts.append((touched[0], len(text)))
    (small, small_chars), (large, large_chars) = counts
    assert large - small <= 2 * (large_chars - small_chars), counts
    assert large <= grammar_rows.FIRSTS_WORK + 4 * large_chars, counts


FOLDED_CASES: dict[str, Callable[[], str]] = {
    "named, shared": lambda: _shared_first(4, 450), "inline, shared": lambda: _shared_first(4, 450, inline=True),
    "named, apart": lambda: _shared_first(4, 450, lambda j: f"b{j}"),
    "a group after a token": lambda: _group_after('"q"', lambda j: "b"),
    "a group after a rule, apart": lambda: _group_after("x", lambda j: f"b{j}"),
    "optional firsts": lambda: _optional_firsts(3),
}


@pytest.mark.parametrize("case", FOLDED_CASES)
def test_a_spent_firsts_budget_weighs_these_shapes_no_less(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Past FIRSTS_WORK every Firsts is folded into one ANY as it is next touched: these shapes weigh no less than with
    their lexemes told apart. (Not every grammar: told apart, a shift shared by ANY and a literal is counted in both,
    and llguidance predicts it once, so a fold may weigh less than that figure, never less than llguidance's row.)"""
    text = FOLDED_CASES[case]()
    told_apart = grammar_rows.row_weight(text)
    budget = grammar_rows._Budget
    monkeypatch.setattr(grammar_rows, "_Budget", lambda: budget(0))
    assert grammar_rows.row_weight(text) >= told_apart

def _cpu_seconds(call: Callable[[], Any]) -> float:
    """The best of 3 of this thread's CPU time for call() (the other helpers' load left out)."""
    spent = []
    for _ in range(3):
        started = time.thread_time()
        call()
        spent.append(time.thread_time() - started)
    return min(spent)


def _long_id_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest, match="URI longer than 2048 characters"):
        grammar_module.check_json_schema(schema, False, "response_format")


LINEAR_CASES: dict[str, tuple[Callable[[int], Any], Callable[[Any], Any], int]] = {  # (make(n), weigh it, n)
    "%jsons on one line": (lambda n: "start: " + " | ".join(['"s" %json{}'] * n), grammar_rows.row_weight, 4_000),
    "definitions each with a %json": (lambda n: "\n".join(f'r{i}: "x" %json{{}}' for i in range(n)),
                                      grammar_rows.row_weight, 2_000),
    "a long JSON pointer": (lambda n: json.dumps({"grammars": [{"json_schema": {
        "$ref": "#/" + "/".join(["a"] * n), "a": {}}}]}), grammar_rows.row_weight, 5_000),
    # each `$ref` was resolved against the whole `$id` (200 KB, 40,000 refs: 6 s): refused now, at once
    "a long $id with many $refs": (lambda n: {"$id": "http://x.test/" + "a" * (50 * n) + "/s.json", "properties": {
        f"p{i}": {"$ref": f"s.json#/$defs/d{i % 7}"} for i in range(n)}}, _long_id_refused, 1_000),
    # `re` compiled each (9,500 distinct 1,000-character ones: 47 s)
    "many distinct regexes": (lambda n: "start: " + " | ".join(f"/{'x' * 500}{i:06d}/" for i in range(n)),
                              grammar_rows.row_weight, 500),
    # an unclosed string or regex was searched again from each escaped quote or slash in it (40 KB: 11 s)
    "an unclosed string of escaped quotes": (lambda n: 'start: "' + '\\"' * n, grammar_rows.row_weight, 5_000),
    "an unclosed regex of escaped slashes": (lambda n: "start: /" + "\\/" * n,
                                             lambda text: grammar_rows.regex_chars(text, 4 << 20), 5_000),
    # each block that is not JSON raised a JSONDecodeError, which counts the text's lines up to it (800 KB: 12 s)
    "unclosed %jsons, weighed": (lambda n: "start: " + "%json [1,\n" * n, grammar_rows.row_weight, 5_000),
    "unclosed %jsons, counted": (lambda n: "start: " + "%json [1,\n" * n,
                                 lambda text: grammar_rows.regex_chars(text, 4 << 20), 5_000),
    "unclosed %regexes, counted": (lambda n: "x: %regex {\n" * n,
                                   lambda text: grammar_rows.regex_chars(text, 4 << 20), 5_000),
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_row_weight_is_linear_in_the_text(case: str) -> None:
    """Weighed on a compile thread holding the GIL against the event loop: at 4n no more than 8 times n's CPU time
    (linear: about 4; quadratic, as a running offset over 20,000 `%json`s, a prefix sliced for every depth of a
    JSON pointer, or a base URI joined for every `$ref`, was: about 16)."""
    make, weigh, n = LINEAR_CASES[case]
    small, large = make(n), make(4 * n)
    at_n, at_4n = _cpu_seconds(lambda: weigh(small)), _cpu_seconds(lambda: weigh(large))
    assert at_4n < 8 * at_n + 0.05, (at_n, at_4n)


def test_regexes_are_counted_as_llguidance_lexes_them() -> None:
    """A regex may span lines (`(?x)`'s, or any holding a line break: 990 KB after one compiled for 38 s); a `#` or
    `//` comment runs to its line's end, a `/` in it no regex's; a string is double-quoted; past the bound the count
    stops (8 MiB of `/a/` took 2.9 s to count to its end)."""
    assert grammar_rows.regex_chars("start: /a\n(?i)\\p{L}/ | /(?x) b\n  c/", 1_000) == 25
    assert grammar_rows.regex_chars('start: /a/ # or /b/ or\n | "c" // or /d/ or\n | /e/', 1_000) == 6
    assert grammar_rows.regex_chars("# isn't it /x\nstart: /" + "a" * 90 + "/", 1_000) == 92
    assert grammar_rows.regex_chars("start: \"'\" /b/ \"'\"", 1_000) == 3
    assert 10 < grammar_rows.regex_chars("start: " + " | ".join(["/a/"] * 100_000), 10) <= 13


RUST_REGEXES = {"\\p{L}+": "é", "a\\P{L}": "a1", "\\pL+": "é", "[\\p{L}\\d]+": "1", "\\x{e9}+": "é",
             "[[:alpha:]]+": "a", "a\\z": "a", "(?<x>a)": "a", "[\\x{4e00}-\\x{9fff}]+": "中文", "\\u{4e2d}+": "中"}


@pytest.mark.parametrize("pattern", RUST_REGEXES)
def test_a_regex_in_rust_syntax_python_cannot_read_is_weighed(grammars: Grammars, pattern: str,
                                                              tokenizer: PreTrainedTokenizerFast) -> None:
    """`\\p{L}` and the like are errors to Python's `re`: `WORD: /\\p{L}+/` weighed as may-be-empty, and a 500-link
    chain through it (each link a row of its own in llguidance) refused. Read as Rust's now: accepted, and served."""
    chain = _links(500, 'r{i}: WORD r{j} | "."') + f"WORD: /{pattern}/"
    assert grammar_rows.row_weight(chain) == 2 + 2  # after WORD: the next link's first row, at every link
    matcher = grammars.compile(chain, "guided_grammar").matcher()
    for token in tokenizer.encode(RUST_REGEXES[pattern] + "."):
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting() and not matcher.is_error()
    optional = chain.replace(f"/{pattern}/", f"/(?:{pattern})?/")
    assert grammar_rows.row_weight(optional) >= 1_000  # one that may be empty: a chain


def test_a_regex_nesting_a_class_may_match_nothing(grammars: Grammars, tokenizer: PreTrainedTokenizerFast) -> None:
    """Rust's regex reads `[[a]]*` as a class in a class, repeated (it may match nothing); Python's `re` as a class of
    `[` and `a`, then `]*` (a character at least): 1,200 `/v{i}|[[a]]*/` in a row weighed 1 and were served, where
    llguidance's row before them holds 2,401 items and the answer failed at its first token. Now a regex nesting a
    class, or one in verbose mode, may match nothing (errs high): the 400 naming the field. An escaped `[` nests
    nothing."""
    for flags, nesting in (("", "[[a]]*"), ("(?x)", "[ ][a]]*")):  # verbose: Rust skips the space, `]` the first
        run = "start: " + " ".join(f"/{flags}v{i}|{nesting}/" for i in range(1_200)) + ' "z"'
        assert not _follows(grammars, tokenizer, run, "v0v5z")
        with pytest.raises(InvalidRequest, match="parser row") as refused:
            grammars.from_text("grammar", run, "guided_grammar")
        assert refused.value.param == "guided_grammar"
    assert grammar_rows.row_weight(run.replace("(?x)", "").replace("[ ][a]]", "[\\[a]]")) == 1


def test_regexes_are_tested_once_and_within_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's `re` parses a regex holding the GIL (compiled, 9,500 distinct 1,000-character ones took 47 s): one
    seen before is not tested again, and past TESTED_CHARS in all one may match nothing. One after a token is tested
    too: a run goes on through it (1,000 `/(wix)?/` after "q" weighed 1, a row of 2,001 items in llguidance)."""
    tested = _recorded(monkeypatch, grammar_rows._least_width, (grammar_rows,), "_least_width")
    # /a*/ may be empty: the row after "x" holds r's first row through it; a regex may match what "x" does, so the
    # row after either holds each alternative's window (3 + 1 + 1 + 1)
    assert grammar_rows.row_weight('start: "x" /a*/ r | /b/ r | /b/ r\nr: "y"') == 3 + 3 and tested == ["a*", "b"]
    tested.clear()
    many = [f"/{'x' * 990}{i:04d}/" for i in range(9_500)]
    assert grammar_rows.row_weight("start: " + " | ".join(many)) == 9_500
    assert sum(map(len, tested)) <= grammar_rows.TESTED_CHARS
    chain = _links(500, 'r{i}: /{i}' + 'x' * 990 + '/ r{j} | "."')  # past the budget the links may be empty
    assert grammar_rows.row_weight(chain) > 2 * (500 - grammar_rows.TESTED_CHARS // 990)


def test_a_long_id_or_ref_is_a_400_naming_the_field(grammars: Grammars) -> None:
    """A `$ref` whose URI (resolved, no fragment) passes LONG_URI, or one resolved against a base URI (an `$id`) that
    passes it, or an `$id` resolved against such a base, is not weighed (each resolved against a long base cost its
    length): the 400 naming the field, in compile as in check_json_schema; at LONG_URI it weighs, and a long fragment
    is no URI."""
    at = "http://x.test/" + "a" * (grammar_rows.LONG_URI - 19) + ".json"
    assert len(at) == grammar_rows.LONG_URI
    assert grammar_rows.schema_weight({"$id": at, "$ref": at + "#/$defs/d", "$defs": {"d": {}}}) == 2
    for schema in [{"$ref": at + "x"}, {"$id": at + "x", "$ref": "#/$defs/d", "$defs": {"d": {}}},
                   {"$id": "http://x.test/", "items": {"$id": at[14:] + "x", "properties": {"p": {"$ref": "s.json"}}}},
                   {"$id": at + "x", "items": {"$id": "s.json"}}]:
        with pytest.raises(InvalidRequest, match="URI longer than 2048") as refused:
            grammar_module.check_json_schema(schema, False, "response_format")
        assert refused.value.param == "response_format"
        with pytest.raises(InvalidRequest, match="URI longer than 2048") as refused:
            grammars.json_schema(schema, False, "guided_json")
        assert refused.value.param == "guided_json"
    assert grammar_rows.schema_weight({"$id": "urn:x", "$ref": "urn:x#/" + "a" * 10_000, "a" * 10_000: {}}) == 2


def test_a_long_id_nothing_is_resolved_against_is_weighed() -> None:
    """A 3,000-character `$id` that no `$ref` nor `$id` is resolved against costs nothing to weigh: it weighs as the
    same schema without it (it was a 400 for a schema llguidance takes), at the root or in a subschema beside a
    `$ref` resolved against the root's base."""
    long_id = "http://x.test/" + "a" * 3_000 + ".json"
    assert grammar_module.check_json_schema({"$id": long_id, "type": "integer"}, True, "response_format") == 0
    beside = {"properties": {"p": {"$id": long_id, "type": "string"}, "q": {"$ref": "#/$defs/d"}},
              "$defs": {"d": {"type": "integer"}}}
    assert grammar_module.check_json_schema(beside, True, "response_format") == 2


def test_data_and_what_is_no_uri_are_no_links() -> None:
    """A `$ref` that is no URI (`http://[::1`: urljoin's ValueError, a 500) is no link, and `default`, `examples`,
    `const` and `enum` hold data, not subschemas (a 3,000-character `$id` in `examples` was a 400), unless a property
    is named so."""
    defs = {"$defs": {"a": {"type": "string"}}}
    for data in ({"default": {"$ref": "http://[::1"}}, {"examples": [{"$id": "http://x.test/" + "a" * 3_000}]},
                 {"const": {"$ref": "#/$defs/a"}}, {"enum": [{"$ref": "#/$defs/a"}]}):
        assert grammar_rows.schema_weight({"$id": "http://a.test/s.json", "properties": {"x": data}, **defs}) == 0
        grammar_module.check_json_schema({"properties": {"x": data}, **defs}, False, "response_format")
    assert grammar_rows.schema_weight({"$ref": "http://[::1"}) == 0
    assert grammar_rows.schema_weight({"properties": {"default": {"$ref": "#/$defs/a"}}, **defs}) == 2


def test_the_old_drafts_dependencies_hold_subschemas_named_by_property() -> None:
    """`dependencies` (drafts 4 to 7) maps property names to subschemas, as `dependentSchemas` does: a chain of 1,100
    `$ref`s in the one of a property named `default` (data, were it a keyword) is a chain, which llguidance, lenient,
    follows (its 2,201-item row ends the answer; it weighed 2, and the check crashed the main thread's stack), and its
    `\\s` is ECMA's. A property named `properties` holds a subschema, whose `default` is data (it weighed 2)."""
    linked = _linked(1_100, lambda i: {}, lambda i: f"#/dependencies/default/$defs/d{i}")
    schema = {"$ref": linked["$ref"], "dependencies": {"default": {"$defs": linked["$defs"], "pattern": r"\s"}}}
    assert grammar_rows.schema_weight(schema) == 2 * 1_100 + 4
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(schema, False, "response_format")
    assert refused.value.param == "response_format"
    assert ecma_patterns(schema, "response_format")["dependencies"]["default"]["pattern"] != r"\s"
    data = {"properties": {"properties": {"default": {"$ref": "#/$defs/a"}}}, "$defs": {"a": {"type": "string"}}}
    assert grammar_rows.schema_weight(data) == 0


@pytest.mark.parametrize("pointer", ["#/default/", "#/examples/0/"])
def test_a_ref_into_data_reads_its_target_as_a_schema(pointer: str) -> None:
    """llguidance resolves a JSON pointer anywhere and reads its target as a schema: a chain of 1,100 `$ref`s through
    data (`default`, an `examples` item) reached from the schema's `$ref` weighed 2, passed the check and ended the
    answer after "12" (a 2,201-item row). Data no `$ref` reaches stays data."""
    linked = _linked(1_100, lambda i: {}, lambda i: f"{pointer}d{i}")
    defs = linked["$defs"] if pointer == "#/default/" else [linked["$defs"]]
    schema = {"$ref": linked["$ref"], pointer.split("/")[1]: defs}
    assert grammar_rows.schema_weight(schema) == 2 * 1_100 + 4
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(schema, False, "response_format")
    assert refused.value.param == "response_format"
    assert grammar_rows.schema_weight({**schema, "$ref": f"{pointer}d1100"}) == 2


def test_a_schema_past_max_rules_is_refused_before_it_is_weighed(grammars: Grammars,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """rules_bound is cheap; weighing a schema of 20,000 `$ref`s took 13.7 s before it refused them."""
    def weighed(*_: Any) -> int:
        raise AssertionError("weighed before the rules were counted")

    monkeypatch.setattr(grammar_module, "schema_weight", weighed)
    schema = {"properties": {f"p{i}": {"$ref": "#/$defs/d"} for i in range(grammar_module.MAX_RULES // 2 + 1)},
              "$defs": {"d": {"type": "integer"}}}
    for refuse in [lambda: grammar_module.check_json_schema(schema, False, "response_format"),
                   lambda: grammars.json_schema(schema, False, "response_format"),
                   lambda: grammars.tool_calls([ToolSpec("f", schema)], False, "tools")]:
        with pytest.raises(InvalidRequest, match="more than 12000 rules"):
            refuse()


def test_a_grammar_nested_past_the_recursion_limit_is_a_400(grammars: Grammars) -> None:
    """A `%json` 5,000 `[` deep (RecursionError in row_weight, once a 500): the 400 naming the field."""
    with pytest.raises(InvalidRequest, match="nested too deeply") as refused:
        grammars.from_text("grammar", "start: a\na: %json " + "[" * 5_000 + "]" * 5_000, "structured_outputs.grammar")
    assert refused.value.param == "structured_outputs.grammar"


def test_nested_any_ofs_weigh_flattened() -> None:
    """4 `anyOf`s of 600 objects inside one: llguidance flattens them, 2,400 in the row after `{` (weighed 600, the
    widest alone, and accepted): refused naming the field."""
    options = [{"anyOf": [{"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"}},
                           "required": [f"k{i}_{j}"]} for j in range(600)]} for i in range(4)]
    assert grammar_rows.row_weight(grammar_module._json_grammar({"anyOf": options}, True, "p")) == 2_400
    with pytest.raises(InvalidRequest, match="may hold 2400 items") as refused:
        grammar_module.check_json_schema({"anyOf": options}, True, "response_format")
    assert refused.value.param == "response_format"


def _follows_schema(grammars: Grammars, tokenizer: PreTrainedTokenizerFast, schema: dict[str, Any],
                    answer: str) -> bool:
    return _follows(grammars, tokenizer, grammar_module._json_grammar(schema, True, "p"), answer)


# options that do not: their chains begin after distinct keys, or after a first required property's distinct consts
APART = {
    "distinct keys": (lambda j, chain: closed_object({f"x{j}": chain}), '{"x3": 5}'),
    "a const first": (lambda j, chain: closed_object({"k": {"const": f"v{j}"}, "x": chain}), '{"k": "v3", "x": 5}'),
}


@pytest.mark.parametrize("shape", ALIKE)
def test_options_that_go_on_alike_add_up_their_chains(grammars: Grammars, tokenizer: PreTrainedTokenizerFast,
                                                      shape: str) -> None:
    """5 options each holding a chain of its own of 240 `$ref` links: where the options go on alike (after `{"x": `,
    after `[`, where the value begins) llguidance's row holds every option's chain, ~2,405 items, and the answer
    failed at its first token; schema_weight had added the widest anyOf to the longest chain (486: served; 4 of 400
    links, 3,204 items, 806). Now the left corners of options that go on alike add up, and the schema is the 400
    naming the field before llguidance sees it; 5 of 80 links are served and followed. An array's first
    `prefixItems`, an object's `patternProperties` and `additionalProperties` values (after any key) and nested
    anyOfs' options (one row in llguidance) had been left out (weighed 487-969, served, failed), and so had options
    that go on alike a level down, into a value's values or items, or to a second `prefixItems` (487)."""
    alike = ALIKE[shape]
    past, within = (alike.schema(5, links) for links in (240, 80))
    assert not _follows_schema(grammars, tokenizer, past, alike.answer)
    assert grammar_rows.schema_weight(past) >= 5 * (2 * 240 + 1)
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(past, True, "response_format")
    assert refused.value.param == "response_format"
    assert grammar_module.check_json_schema(within, True, "p") <= grammar_module.MAX_ROW
    assert _follows_schema(grammars, tokenizer, within, alike.answer)


@pytest.mark.parametrize("shape", APART)
def test_options_told_apart_before_their_chains_weigh_the_longest(grammars: Grammars,
                                                                  tokenizer: PreTrainedTokenizerFast,
                                                                  shape: str) -> None:
    """Options whose chains begin after distinct keys, or after a first required property's distinct `const`s, hold
    one chain in a row: weighed as the longest (806), served, and followed by llguidance."""
    option, answer = APART[shape]
    schema = options_with_chains(4, 400, option)
    assert grammar_module.check_json_schema(schema, True, "p") == 4 + 2 * 401
    assert _follows_schema(grammars, tokenizer, schema, answer)


def test_objects_sharing_a_property_of_nested_models_are_served(grammars: Grammars,
                                                                tokenizer: PreTrainedTokenizerFast) -> None:
    """Where options go on alike after a key, their values' left corners add up, not their models' nesting: 40
    objects whose `owner` is a `$ref` to a model nested 40 deep (each its own) weigh 2 items an option there."""
    models = {f"m{j}_{i}": closed_object({"next": {"$ref": f"#/$defs/m{j}_{i + 1}"}}) for j in range(40)
              for i in range(40)} | {f"m{j}_40": {"type": "integer"} for j in range(40)}
    schema = {"anyOf": [closed_object({"owner": {"$ref": f"#/$defs/m{j}_0"}}) for j in range(40)], "$defs": models}
    assert grammar_module.check_json_schema(schema, True, "p") <= 40 + 2 * 41
    assert _follows_schema(grammars, tokenizer, schema, '{"owner": {"next": {"next": {')


def test_an_objects_patterns_weigh_their_heaviest_value(grammars: Grammars, tokenizer: PreTrainedTokenizerFast) -> None:
    """After a key llguidance predicts only the value of the pattern its key matched: an object of 64 patterns, each
    a chain of its own of 12 links, beside a string, weighs 28 (every pattern's value had been summed, 1,666: a 400
    for a schema llguidance follows)."""
    schema = many_patterns()
    assert grammar_module.check_json_schema(schema, True, "p") == 28
    assert _follows_schema(grammars, tokenizer, schema, '{"a5": 3, "a7": 4}')


@pytest.mark.parametrize("shape", ONE_LOOSE_VALUE)
def test_an_options_loose_values_go_on_alike_a_level_down_one_at_a_time(grammars: Grammars,
                                                                        tokenizer: PreTrainedTokenizerFast,
                                                                        shape: str) -> None:
    """After a key llguidance holds the one value the key matched: of an option's 4 patterns, each `{"y": chain}`
    (150 links), or of its property `x` and its additionalProperties (300 links). Every loose value had gone on alike a
    level down, with each other and with the option's own `x` (1,210 and 1,206: a 400 for schemas llguidance follows);
    now one chain's weight, served and followed."""
    links, answer = ONE_LOOSE_VALUE[shape]
    schema = one_loose_value(shape, links)
    assert grammar_module.check_json_schema(schema, True, "p") == 4 + 2 * links
    assert _follows_schema(grammars, tokenizer, schema, answer)


def test_a_named_key_keeps_its_options_own_patterns_values_a_level_down(grammars: Grammars,
                                                                         tokenizer: PreTrainedTokenizerFast) -> None:
    """An option names `pa` (any object) and has patterns `^p` (`{"y": chain}`) and `^q`; another names `pa` as
    `{"y": chain}`: after `{"pa": {"y": ` llguidance holds both chains (`pa` matches `^p` too). The first option's loose
    values had all been dropped for its own key: 300 links weighed 604 and served (llguidance's row ~1,202). Now its
    `^p` value goes on alike there and `^q`'s does not: 100 links weigh 406 and are followed, 300 are the 400."""
    schema = named_and_own_pattern(100)
    assert grammar_module.check_json_schema(schema, True, "p") == 6 + 4 * 100
    assert _follows_schema(grammars, tokenizer, schema, '{"pa": {"y": 5}}')
    with pytest.raises(InvalidRequest, match="may hold 1206 items") as refused:
        grammar_module.check_json_schema(named_and_own_pattern(300), True, "response_format")
    assert refused.value.param == "response_format"


@pytest.mark.parametrize("shape", NAMED_BESIDE_LOOSE)
def test_a_named_key_holds_the_loose_values_it_may_be(grammars: Grammars, tokenizer: PreTrainedTokenizerFast,
                                                       shape: str) -> None:
    """After a key one option names, another option's loose value goes on alike only where the key may be it: a
    pattern the key matches, additionalProperties where that option does not name the key. Every option's heaviest
    loose value had gone with every named key (and a level down, every pattern's where the option does not name it):
    an object `{"id": chain}` beside one of patterns `^p[0-9]$` (300-link chains; fuzz seed 17 shrunk), or beside one
    of additionalProperties naming `id` itself, weighed 1,206, a 400, where llguidance holds one chain (601). Where
    the key may be the loose value, llguidance holds both (1,202): still the 400."""
    _, _, both, answer = NAMED_BESIDE_LOOSE[shape]
    schema = named_beside_loose(shape, 300)
    if both:
        with pytest.raises(InvalidRequest, match="may hold 1206 items") as refused:
            grammar_module.check_json_schema(schema, True, "response_format")
        assert refused.value.param == "response_format"
    else:
        assert grammar_module.check_json_schema(schema, True, "p") == 4 + 2 * 300
    assert _follows_schema(grammars, tokenizer, schema, answer)


def test_many_loose_values_in_turn_level_after_level_are_taken_at_once() -> None:
    """64 patterns, each an object of 64 patterns, beside 50 objects of additionalProperties: each pattern's value in
    turn made 64 lists of 51 at two levels, 4,096 lists a level further down, ManyOptions (a 400 llguidance would have
    followed). Past TURNS_WORK they go on alike all at once: weighed 53, as before the in-turn choice."""
    assert grammar_module.check_json_schema(patterns_of_patterns(50), True, "p") == 53


def _a_ref_bare_and_with_properties(first: str) -> dict[str, Any]:
    """Root properties p1 `anyOf [$ref aj] x5` and p2 `anyOf [$ref aj with properties {"x": chain j}] x5` (240 links
    each), `first` first; aj an object `{"z": $ref t}`."""
    schema = options_with_chains(5, 240)
    defs = schema["$defs"] | {f"a{j}": {"type": "object", "properties": {"z": {"$ref": "#/$defs/t"}}} for j in range(5)}
    lists = {"p1": {"anyOf": [{"$ref": f"#/$defs/a{j}"} for j in range(5)]},
             "p2": {"anyOf": [{"$ref": f"#/$defs/a{j}", "properties": {"x": {"$ref": f"#/$defs/c{j}_0"}},
                               "required": ["x"]} for j in range(5)]}}
    properties = dict(sorted(lists.items(), key=lambda item: item[0] != first))
    return {"type": "object", "properties": properties, "required": list(properties),
            "$defs": defs | {"t": {"type": "integer"}}}


@pytest.mark.parametrize("first", ["p1", "p2"])
def test_a_ref_with_keywords_beside_it_is_weighed_as_its_own_option(grammars: Grammars,
                                                                    tokenizer: PreTrainedTokenizerFast,
                                                                    first: str) -> None:
    """A `$ref` with `properties` beside it was weighed as its target alone: after a list of bare `$ref`s to the same
    targets (weighed 6), p2's options `{"x": chain j}` (2,405 items after `{"x": `, llguidance fails) reused its
    weight: 487, served. Now each option is weighed by what it is merged from: the 400, whichever list comes first."""
    schema = _a_ref_bare_and_with_properties(first)
    assert grammar_rows.schema_weight(schema) >= 5 * (2 * 240 + 1)
    with pytest.raises(InvalidRequest, match="parser row") as refused:
        grammar_module.check_json_schema(schema, True, "response_format")
    assert refused.value.param == "response_format"
    if first == "p2":
        assert not _follows_schema(grammars, tokenizer, schema, '{"p2": {"x": 5')


def _lists_naming_one_object(lists: int, properties: int, distinct: bool = False) -> dict[str, Any]:
    """An object of `lists` properties, each `anyOf [$ref big, null]` (pydantic's Optional[Big]), with an object of
    its own (`{"z": $ref t}`) where `distinct`; big an object of `properties` required `$ref`d ones."""
    big = {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/t"} for i in range(properties)},
           "required": [f"p{i}" for i in range(properties)]}
    own = {"type": "object", "properties": {"z": {"$ref": "#/$defs/t"}}}
    return {"type": "object", "properties": {f"q{j}": {"anyOf": [{"$ref": "#/$defs/big"}, *[dict(own)] * distinct,
                                                                 {"type": "null"}]} for j in range(lists)},
            "$defs": {"big": big, "t": {"type": "integer"}}}


@pytest.mark.parametrize("lists, properties", [(300, 1_000), (140, 2_000)])
def test_lists_of_the_same_options_are_weighed_once(grammars: Grammars, tokenizer: PreTrainedTokenizerFast,
                                                    lists: int, properties: int) -> None:
    """pydantic's Optional[Big] used 300 times (big of 1,000 required `$ref`d properties, 58 KB): each list's options
    added up big's values again, and past OPTIONS_WORK it was a 400 (weight 6 and followed before). Now lists of the
    same options (by their rules) are weighed once: 6, and llguidance follows."""
    schema = _lists_naming_one_object(lists, properties)
    assert grammar_module.check_json_schema(schema, True, "p") == 6
    assert _follows_schema(grammars, tokenizer, schema, '{"q0": null, "q1": {"p0": 1')


def test_the_options_values_added_up_are_bounded() -> None:
    """Distinct lists add up their options' values each: 600 lists naming an object of 2,000 `$ref`d properties, each
    beside an object of its own, are 1.2 M values, several seconds to weigh; past OPTIONS_WORK they are the 400 naming
    the field (~0.7 s); 100 such lists are served."""
    with pytest.raises(InvalidRequest, match="anyOf/oneOf options hold more than") as refused:
        grammar_module.check_json_schema(_lists_naming_one_object(600, 2_000, True), True, "response_format")
    assert refused.value.param == "response_format"
    assert grammar_rows.schema_weight(_lists_naming_one_object(100, 2_000, True)) == 7  # 3 options, a link


def test_the_values_weighed_a_level_down_are_bounded() -> None:
    """Options that go on alike into `x` are weighed again a level down, `x`'s values as one more list: 600 lists of
    `{"x": big}` (2,000 `$ref`d properties) beside `{"x": an object of its own}` are 1.2 M values (2.1 s uncapped),
    served unweighed before; past OPTIONS_WORK the 400 naming the field, as at the first level; 100 such lists are
    served."""
    big = {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/t"} for i in range(2_000)}}

    def lists(count: int) -> dict[str, Any]:
        own = {"type": "object", "properties": {"z": {"$ref": "#/$defs/t"}}}
        return {"type": "object", "properties": {f"q{j}": {"anyOf": [
            closed_object({"x": {"$ref": "#/$defs/big"}}), closed_object({"x": dict(own)})]} for j in range(count)},
            "$defs": {"big": big, "t": {"type": "integer"}}}

    with pytest.raises(InvalidRequest, match="anyOf/oneOf options hold more than") as refused:
        grammar_module.check_json_schema(lists(600), True, "response_format")
    assert refused.value.param == "response_format"
    assert grammar_rows.schema_weight(lists(100)) == 6


class _Branch(pydantic.BaseModel):
    name: str
    children: list[_Branch | _Twig] = []


class _Twig(pydantic.BaseModel):
    name: str
    children: list[_Branch | _Twig] = []
    size: int | None = None


class _Tree(pydantic.BaseModel):
    root: _Branch | _Twig


def test_recursive_options_going_on_alike_a_level_down_end_and_are_served(grammars: Grammars,
                                                                         tokenizer: PreTrainedTokenizerFast) -> None:
    """Two models that go on alike into their `children`, lists of both: each level down meets the same options
    again, weighed once (the walk ends), a few items (6 before the level-down walk); llguidance follows three levels
    down."""
    schema = _Tree.model_json_schema()
    assert grammar_module.check_json_schema(schema, True, "p") <= 12
    assert _follows_schema(grammars, tokenizer, schema, '{"root": {"name": "a", "children": [{"name": "b", "children": '
                                                        '[{"name": "c", "children": [{"name": "d"')


class _Address(pydantic.BaseModel):
    street: str
    city: str | None = None


class _Person(pydantic.BaseModel):
    name: str
    home: _Address | None = None
    friends: list[_Person] = []


class _Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    owner: _Person | None
    vet: _Address


class _Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    owner: _Person
    walker: _Person | _Address | None = None


class _Pets(pydantic.BaseModel):
    pets: list[_Cat | _Dog]
    best: Annotated[_Cat | _Dog, pydantic.Field(discriminator="kind")]
    keeper: _Person | _Address | None = None


def test_pydantics_unions_and_optional_models_weigh_as_before() -> None:
    """pydantic's `anyOf [$ref, null]`, its unions of models, with and without a discriminator, recursion: each
    option's chains add up only where options share a property, a few links; served."""
    weights = [grammar_module.check_json_schema(model.model_json_schema(), False, "p")
               for model in (_Person, _Cat, _Dog, _Pets)]
    assert weights == [6, 6, 7, 9], weights  # as on 782ff7b


def test_a_lark_body_nested_past_its_bound_is_refused_without_walking_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups nested past MAX_NESTING are refused as the walk reaches the bound, not held to the body's end: 4 M of
    them held a compile thread 29 s and the GIL up to 2.7 s at a time (llguidance itself refuses a 29th level); at the
    bound the grammar is weighed as before."""
    opened: list[object] = []

    class Counted(grammar_rows._Group):
        def __post_init__(self) -> None:
            opened.append(self)
            super().__post_init__()

    monkeypatch.setattr(grammar_rows, "_Group", Counted)
    bound = grammar_rows.MAX_NESTING
    assert grammar_rows.row_weight(f'start: {"(" * bound}"a"{")" * bound} | "b"') == 2
    opened.clear()
    deep = 100_000
    with pytest.raises(grammar_rows.DeepNesting, match=f"nested more than {bound} deep"):
        grammar_rows.row_weight(f'start: "x" {"[" * deep}"a"{"]" * deep}')
    assert len(opened) <= bound + 1, len(opened)
    with pytest.raises(InvalidRequest, match=f"nested more than {bound} deep") as refused:
        grammar_module.check_bounds(f'start: {"(" * (bound + 1)}"a"{")" * (bound + 1)}', "guided_grammar")
    assert refused.value.param == "guided_grammar"


# A 300-rule Lark grammar of named rules, groups and quantifiers, and schemas of 10-300 $defs linked by $refs: the
# weights row_weight and schema_weight give them.
SEEDED_WEIGHTS = textwrap.dedent("""
    import random
    import sys
    import types
    from pathlib import Path

    import nanoqwen

    # the weighing's modules without the package's __init__ (the engine, torch: ~5 s of each interpreter's start)
    engine = types.ModuleType("nanoqwen.engine")
    engine.__path__ = [str(Path(nanoqwen.__file__).parent / "engine")]
    sys.modules["nanoqwen.engine"] = engine
    from nanoqwen.engine.grammar_rows import row_weight, schema_weight
    assert "torch" not in sys.modules

    rng = random.Random(1)
    rules = []
    for i in range(300):
        alternatives = [" ".join(rng.choice([f"r{rng.randrange(300)}", '"a"', "/b+/", f'(r{rng.randrange(300)} | "c")'])
                                 + rng.choice(["", "?", "*", "+"]) for _ in range(4)) for _ in range(3)]
        rules.append(f"r{i}: " + " | ".join(alternatives))
    rng = random.Random(3)
    schemas = []
    for n in (10, 60, 300):
        defs = {}
        for i in range(n):
            properties = {}
            for j in range(rng.randint(1, 5)):
                k = rng.random()
                properties[f"p{j}"] = {"$ref": f"#/$defs/d{rng.randrange(n)}"} if k < 0.5 else {"type": "string"} \\
                    if k < 0.7 else {"anyOf": [{"$ref": f"#/$defs/d{rng.randrange(n)}"}, {"type": "integer"}]}
            defs[f"d{i}"] = {"type": "object", "properties": properties,
                             "required": list(properties)[:rng.randint(0, len(properties))]}
        schemas.append(schema_weight({"$defs": defs, "$ref": "#/$defs/d0"}))
    print(row_weight("start: r0\\n" + "\\n".join(rules)), schemas)
""")


def test_weights_do_not_depend_on_the_hash_seed():
    """The rules a rule names, and a schema's $ref targets, were sets: the walk's order, and so the weights of the same
    grammar, followed the strings' hashes (PYTHONHASHSEED 1/2/3 weighed one grammar 8.9, 4.5 and 86 million rows): a
    grammar near MAX_ROW was taken after one start and refused after the next."""
    weights = {subprocess.run([sys.executable, "-c", SEEDED_WEIGHTS], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "3", "4")}
    assert len(weights) == 1, weights
