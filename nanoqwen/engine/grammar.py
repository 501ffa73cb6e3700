"""Constrained decoding with llguidance: grammars compiled (and cached) off the engine thread, one
matcher per constrained choice advanced by the engine thread, and each step's allowed tokens as a
bitmask row the sampler applies to the logits.

llguidance, not xgrammar: it has no dependencies (xgrammar requires torch, transformers, triton and
apache-tvm-ffi, which would make the CPU install pull triton), and both cost well under a
millisecond per constrained row per step against a decode step of ~100 ms (profiles/RESULTS.md).

JSON is generated compactly with json.dumps' separators (", " and ": "), Qwen3's own tool-call
layout: flexible whitespace would let a model pad forever without ever finishing the object.
vLLM's `disable_any_whitespace` asks for "," and ":" (what its guidance backend then generates).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch
from llguidance import LLMatcher

from nanoqwen.engine.alike_chains import ManyOptions
from nanoqwen.engine.call_arguments import call_arguments
from nanoqwen.engine.gbnf import grammar_from_text, is_gbnf
from nanoqwen.engine.grammar_cache import GrammarCache, charged, heap_used
from nanoqwen.engine.grammar_rows import (
    DeepNesting,
    LongReference,
    regex_chars,
    row_weight,
    schema_links,
    schema_weight,
)
from nanoqwen.engine.hop_cycles import HopCycle, cut_hops
from nanoqwen.engine.object_runs import (
    MAX_PARTS,
    MAX_WORK,
    Merged,
    Merges,
    Rows,
    SchemaObjects,
    TooLarge,
    TooManyParts,
    run_row,
)
from nanoqwen.engine.schema_keywords import own_patterns, schema_objects
from nanoqwen.engine.schema_values import KEY_WEIGHT, MAX_VALUES, values_weight
from nanoqwen.engine.threads import native_lock
from nanoqwen.engine.validation import InvalidRequest
from nanoqwen.sampler import token_bitmask
from nanoqwen.settings import GRAMMAR_CACHE_BYTES
from nanoqwen.text import TokenBytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_SPACE_JSON_OPTIONS = {**JSON_OPTIONS, "item_separator": ",", "key_separator": ":"}
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
GrammarKey = str | tuple[str, str]  # the cache's: a grammar's text, or what a request sent for it (kind, text)
# For a grammar we generated: what the client sent that a line of it (from 1) came from, and the index of its schema
# among the grammar's (tool_calls': each tool's, then the answer's; None: our own rules)
Origin = Callable[[int], tuple[str, int | None]]
# Compiled grammars kept (keyed by their text, or by what a request sent for them); their bytes bounded apart
# (EngineConfig.grammar_cache_memory, settings.GRAMMAR_CACHE_BYTES)
CACHE_SIZE = 128
# What llguidance appends to an error's message: a Rust panic's backtrace (past its grammar symbol count), and in place
# of the parser's state (LIMITS' verbose_errors=False) a marker.
APPENDED = re.compile(r"\n<(?:backtrace|non-verbose/)>")
# llguidance's panic past its grammar's u16 symbol ids (11,000 Lark rules of three alternatives: profiles/RESULTS.md,
# hunt33), said in plain words
SYMBOLS = re.compile(r"panic: assertion failed: grammar\.symbols\.len\(\) < u16::MAX\b.*", re.DOTALL)
TOO_MANY_SYMBOLS = ("the grammar compiles to more symbols than the grammar engine's limit (65,535: each rule, "
                    "alternative, group and piece, and each key and value of its JSON Schemas, takes some); send a "
                    "smaller one")
# Where llguidance's error says it was in a Lark grammar's text: `at LINE(COLUMN): reason` (a regex's on more lines),
# then an excerpt of the text, each line numbered (`  12 | ...`)
LOCATED = re.compile(r"at (\d+)\(\d+\): (.*?)\n*(?:\n *\d+ \| |\Z)", re.DOTALL)
ERROR_CHARS = 500  # the most of a matcher's error that its request's failure and the log quote
# llguidance's work per grammar, bounded so that no request's grammar stalls the other streams (profiles/RESULTS.md,
# fuel8): the lexer it builds for the first mask (initial_lexer_fuel; ~1,570 forced tools fit, `a{100000}` does not,
# which at the default 1M cost 50-150 ms every step) and each later mask (step_lexer_fuel).
LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=300_000, step_lexer_fuel=50_000, verbose_errors=False)
log = logging.getLogger("nanoqwen")
# What a cached grammar's lexer may grow after its compile, charged as its requests' copies consume tokens (its wear;
# no heap delta is its alone then): llguidance builds lexer states as masks walk the vocabulary, measured at most
# 14.2 KB a token over 500 tokens drawn uniformly from the mask (`[ab]*a[ab]{20}`; other shapes 0.5-10 KB), and
# 480-550 B a state up to max_lexer_states, where the lexer errs (profiles/lexer_wear.py; RESULTS.md, lane lexer44);
# the worst shape's rate charged to every grammar, so the cache counts it up to a share of its budget (WORN_SHARE)
WEAR_BYTES = 16 << 10
LEXER_BYTES = LIMITS.max_lexer_states * 600
# A parser row holds an item for each alternative still open (row_weight counts them from the text, erring high): a
# chain of rules (`r0: r1 | "b"`, `r1: r2 | "b"`, ...; GBNF's too) or of JSON Schema `$ref`s one a link, alternatives
# sharing a first token one each. Past 2,000 (LIMITS' max_items_in_row) llguidance ended the answer after a token; short
# of it each mask costs in proportion: ~0.4 ms a step at a 500-link chain, ~2 ms at 1,000 (profiles/RESULTS.md, chain9).
# llguidance also recurses once per link while it compiles, 3-5 kB of stack a rule and up to ~13 kB a `$ref`: past its
# thread's stack the process dies (SIGSEGV; 3,000 rules or 2,000 `$ref`s in 8 MiB). The compile threads have
# COMPILE_STACK_BYTES; MAX_RULES (rules_bound: every line that may begin a rule, and each `$ref` twice) bounds a chain
# row_weight does not weigh (sequences, `r{i}: "x" r{i+1}`) within it: 12,000 rules or 6,000 `$ref`s (deep8: 64 MiB
# held 12,000 rules and 5,000 `$ref`s).
MAX_ROW = 1_000
MAX_RULES = 12_000
# The characters of a grammar's regexes in all (a schema's patterns, a vLLM regex, a Lark grammar's: regex_chars):
# llguidance parses them before its fuel bounds the lexer, at up to ~35 s a megabyte (`(?i)\p{L}`), on a compile
# thread that other requests' new grammars wait for; at the bound ~2-3 s (profiles/RESULTS.md, edges27 and edges28).
MAX_PATTERN_CHARS = 1 << 16
# A request's schemas' `properties` in all, OpenAI's limit for structured outputs: llguidance compiles one object's in
# time quadratic in their number, on a compile thread other requests' grammars wait for (5,000: 2 s; 10,000, a 200 KB
# body: 16 s; profiles/RESULTS.md, lane grammar29)
MAX_PROPERTIES = 5_000
# One schema object's patternProperties keys: llguidance checks each pair for overlap in time worse than quadratic in
# their number (100 / 200 / 300 keys: 0.06 / 0.8-1.0 / 6.8 s; 400, a 12 KB body: 20 s), object by object; at 64 keys of
# up to 940 characters <= 0.06 s (profiles/RESULTS.md, lane grammar29's mends). Across objects the cost adds up,
# bounded by MAX_PATTERN_CHARS only: 140 objects of 64 keys (283 KB) 2.4-3.1 s, as that bound's own worst case
MAX_PATTERN_PROPERTIES = 64
# A GBNF grammar's characters: converted to Lark in Python (engine/gbnf), holding the GIL, ~1.6 s a megabyte and
# superlinear in its comment lines (1 MB of `#x` lines: 8.9 s). At the bound, converted and compiled, 0.1-0.45 s of CPU:
# 240 groups deep 0.13-0.43 s, `#x` lines 0.10-0.20 s (profiles/RESULTS.md, grammar29 and its mends).
MAX_GBNF_CHARS = 1 << 16
# A Lark grammar's characters: weighed in Python before llguidance sees it (check_bounds, row_weight: ~3-6 us a
# character, on the compile thread, which holds the GIL between switches), a multi-megabyte one up to ~25 s. It lies
# past MAX_RULES rules of 40 characters and past 4 x MAX_PATTERN_CHARS of literals; at it, the worst shape found weighs
# ~2.3 s (profiles/RESULTS.md, lane grammar39)
MAX_LARK_CHARS = 1 << 19
# An object's optional properties in a row (in `properties` order, between its required ones): llguidance's parser row
# where the run may begin holds items in proportion; past LIMITS' max_items_in_row (2,000) the answer failed there,
# after the compile (streamed: a 200, then the error). Measured per position (object_runs; profiles/RESULTS.md, lanes
# grammar30's mends, grammar31 and grammar31fix); an `anyOf`'s or `oneOf`'s objects' first runs share one row.
ROW_ITEMS = LIMITS.max_items_in_row
# "$ref" as JSON may spell it: any of its letters a \u escape
REF = re.compile(r"(?:\$|\\u0024)(?:r|\\u0072)(?:e|\\u0065)(?:f|\\u0066)", re.IGNORECASE)
COMPILE_STACK_BYTES = 128 << 20


@dataclass
class SchemaBudget:
    """What one request's schemas hold in all (its tools' and its answer's): their patterns' characters
    (MAX_PATTERN_CHARS), their `properties` (MAX_PROPERTIES) and their const and enum values (MAX_VALUES), the costs
    llguidance's compile adds up across schemas; bounded per schema, N tools cost N times the bound (4 forced tools of
    ~64,000 characters of `(?i)\\p{L}` patterns held a compile thread 14 s; profiles/RESULTS.md, lane grammar30). Kept
    as each field's part (chars, properties, values), so that a refusal names the largest contributor."""

    shares: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def chars(self) -> int:
        return sum(share[0] for share in self.shares.values())

    @property
    def properties(self) -> int:
        return sum(share[1] for share in self.shares.values())

    @property
    def values(self) -> int:
        return sum(share[2] for share in self.shares.values())

    def counted(self, param: str, chars: int, properties: int, note: str = "", values: int = 0) -> None:
        """InvalidRequest where one schema's `chars`, `properties` and const and enum `values` (schema_values' weight)
        so far (sent by `param`), with those charged before, pass a bound: naming the field whose part of it is the
        largest."""
        if self.chars + chars > MAX_PATTERN_CHARS:
            raise self._refused(0, param, chars, f"the request's schemas' patterns are longer than {MAX_PATTERN_CHARS} "
                                f"characters in all{note}")
        if self.properties + properties > MAX_PROPERTIES:
            raise self._refused(1, param, properties,
                                f"the request's schemas have more than {MAX_PROPERTIES} properties in all")
        if self.values + values > MAX_VALUES:
            raise self._refused(2, param, values, "the request's schemas' const and enum values are too large to "
                                f"serve: more than {MAX_VALUES} items in all (each value counts 1, each object key "
                                f"{KEY_WEIGHT} more)")

    def left(self, values: int) -> int:
        """What MAX_VALUES leaves to a schema that holds `values` so far."""
        return MAX_VALUES - self.values - values

    def charge(self, param: str, chars: int, properties: int, values: int = 0) -> None:
        """One schema's, counted whole, added to the request's."""
        before = self.shares.get(param, (0, 0, 0))
        self.shares[param] = (before[0] + chars, before[1] + properties, before[2] + values)

    def copy(self) -> SchemaBudget:
        return SchemaBudget(dict(self.shares))

    def refund(self, before: SchemaBudget) -> None:
        """Back to `before` (a copy taken earlier): what a schema charged since, that no grammar compiles, dropped."""
        self.shares = before.shares

    def _refused(self, index: int, param: str, own: int, what: str) -> OverBudget:
        parts = {name: share[index] for name, share in self.shares.items()}
        parts[param] = parts.get(param, 0) + own
        largest = max(parts, key=parts.__getitem__)
        return OverBudget(f"invalid {largest}: {what}", param=largest)


class SchemaRefused(InvalidRequest):
    """llguidance's refusal of a grammar we generated, at the line of `schema` (Origin's index; None: not located in
    one), so that a caller may let that schema give way."""

    def __init__(self, message: str, param: str, schema: int | None) -> None:
        super().__init__(message, param=param)
        self.schema = schema


class OverBudget(InvalidRequest):
    """A SchemaBudget's refusal: the request's schemas in all, naming the field with the largest part, not the schema
    whose walk crossed the bound."""


def object_properties(node: dict[str, Any], param: str, objects: SchemaObjects | None = None) -> int:
    """A schema object's own `properties`; InvalidRequest naming `param` where its patternProperties keys pass
    MAX_PATTERN_PROPERTIES, or a run of its optional properties (merged as llguidance merges it, a local `$ref` into
    its schema followed: `objects`' root, object_runs) or the first runs of its `anyOf` or `oneOf` objects together hold
    a parser row past ROW_ITEMS (not where it is an allOf subschema, merged_only: the object merged from it is
    checked), or where it merges more than MAX_PARTS parts."""
    objects = SchemaObjects() if objects is None else objects
    if isinstance(keys := node.get("patternProperties"), dict) and len(keys) > MAX_PATTERN_PROPERTIES:
        raise InvalidRequest(f"invalid {param}: a schema object has more than {MAX_PATTERN_PROPERTIES} "
                             "patternProperties", param=param)
    own = len(properties) if isinstance(properties := node.get("properties"), dict) else 0
    try:
        found = objects.parts(node)
        shape = objects.merged(found)
        # options reached through `allOf` or a `$ref` share the row too
        alternated = any(isinstance(part, list) for part in found)
        rows = objects.rows(found, ROW_ITEMS) if alternated else Rows()
    except TooManyParts:
        raise InvalidRequest(f"invalid {param}: a schema object merges more than {MAX_PARTS} schemas (itself, its "
                             "`$ref`s' targets and `allOf` subschemas, each with its own, and an `anyOf` or `oneOf` "
                             "option's), past those its runs of optional properties are checked over (merge some of "
                             "them)", param=param) from None
    except TooLarge:
        raise InvalidRequest(f"invalid {param}: the schema's objects, merged through their `$ref`s, `allOf`s and "
                             f"`anyOf`/`oneOf` options, are too many to check for runs of optional properties (past "
                             f"{MAX_WORK} parts and names): share or merge some",
                             param=param) from None
    if (refusal := _row_refusal(shape, rows, objects)) is not None and not objects.merged_only(node):
        raise InvalidRequest(f"invalid {param}: {refusal}", param=param)
    return own


def _row_refusal(shape: Merged, rows: Rows, objects: SchemaObjects) -> str | None:
    """Why an object merged as `shape`, whose alternatives share `rows` (`objects`'), passes llguidance's parser row
    (object_properties'); None where it does not."""
    runs = shape.runs() if shape.is_object else []  # a part typed otherwise: llguidance intersects, no object
    for i, run in enumerate(runs):
        per, more = run_row(i, i == len(runs) - 1, shape.closed, runs[0])
        if run and per * run + more > ROW_ITEMS:
            where = "" if len(runs) == 1 else " before its first required property" if i == 0 else \
                " after its last required property" if i == len(runs) - 1 else " between two required properties"
            return (f"a schema object has {run} optional properties in a row{where}, past {(ROW_ITEMS - more) // per} "
                    "there (make one of them required, or split the object)")
    if rows.first > ROW_ITEMS:
        return (f"a schema's anyOf or oneOf objects begin with optional properties that hold {rows.first} items in "
                f"one parser row, past {ROW_ITEMS} (each object's optional properties before its first required one "
                "count: make some required, or use fewer alternatives)")
    if (items := (shared := objects.shared(rows))[0]) > ROW_ITEMS:
        return (f"a schema's anyOf or oneOf objects that an answer may go on alike from their property "
                f"{shared[1]!r} hold {items} items in one parser row after it, past {ROW_ITEMS} (their optional "
                "properties after it count: tell the objects apart by a `const` value of a required property first, "
                "or use fewer alternatives)")
    return None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any] | None  # the tool's JSON schema (None: no arguments)
    strict: bool = False
    weight: int | None = None  # its parameters' schema_weight where weighed already (held_json_schema's)


@dataclass
class Grammar:
    """A compiled grammar: a matcher in its start state, copied for each choice."""

    text: str
    template: LLMatcher
    first_mask: np.ndarray  # int32 [ceil(V/32)]: the tokens allowed first (Grammars._first_mask)
    promises: bool  # the answer must hold something (a call, JSON): the grammar does not accept an empty one
    # A choice's matcher erred (its fuel spent): the copies share the template's lexer, whose error stays, so the
    # cache compiles the text afresh for the next request (Grammars.cached)
    spoiled: bool = False
    compiled: int = 0  # the bytes its compile and first mask took, as the cache charges them (grammar_cache.charged)
    wear: int = 0  # the tokens its copies consumed (RowGrammar.sync: one job at a time, the step's masks')

    @property
    def size(self) -> int:
        """The bytes the cache charges it: its compile's, and what its lexer may have grown since (WEAR_BYTES)."""
        return self.compiled + min(self.wear * WEAR_BYTES, LEXER_BYTES)

    def matcher(self) -> LLMatcher:
        return self.template.deep_copy()


def _schema_with_options(schema: dict[str, Any], strict: bool, no_space: bool = False) -> dict[str, Any]:
    """The schema with llguidance's compile options; not strict: keywords it cannot enforce are ignored."""
    return {**schema, "x-guidance": {**(NO_SPACE_JSON_OPTIONS if no_space else JSON_OPTIONS), "lenient": not strict}}


def _json_grammar(schema: dict[str, Any], strict: bool, param: str, no_space: bool = False) -> str:
    """The grammar of one JSON value matching `schema`; InvalidRequest naming `param` where it cannot be converted."""
    try:
        return LLMatcher.grammar_from_json_schema(_schema_with_options(schema, strict, no_space))
    except ValueError as exc:
        raise _invalid(param, str(exc)) from None


def check_json_schema(schema: dict[str, Any], strict: bool, param: str, validate: bool = True,
                      merges: Merges | None = None) -> int:
    """held_json_schema's weight (for the tests and profiles/fuzz_schemas.py: the server takes its copy too)."""
    return held_json_schema(schema, strict, param, validate, merges)[1]


def held_json_schema(schema: dict[str, Any], strict: bool, param: str, validate: bool = True,
                     merges: Merges | None = None) -> tuple[dict[str, Any], int]:
    """InvalidRequest naming `param` where `schema` makes no grammar, found without a compile (no matcher, no cache
    slot): the combined grammar it is part of would be refused naming another field. The schema that grammar is to
    hold (_cut_json_schema's) and its schema_weight (with what ecma_patterns' checks of it merged, `merges`), for that
    grammar's bound. Without `validate`, llguidance's own check is left to that grammar's compile (it costs as much:
    64 K of `(?i)\\p{L}` patterns 2.2 s each), whose 400 names the schema (tool_calls' origin)."""
    schema, text, bounded = _cut_json_schema(schema, strict, param, merges=merges)
    weight = bounded()
    if validate and (error := LLMatcher.validate_grammar(text)):
        raise _invalid(param, error)
    return schema, weight


def _cut_json_schema(schema: dict[str, Any], strict: bool, param: str, no_space: bool = False,
                     merges: Merges | None = None) -> tuple[dict[str, Any], str, Callable[[], int]]:
    """The schema a JSON Schema's own grammar holds (cut_hops': `schema`, or its copy with a cycle of bare `$ref`s
    `false` where a value may be absent), that grammar's text (_json_grammar's) and the last of its bounds' checks
    (check_row of its schema_weight, on the schema's walk, schema_links', done here once; `merges`: what ecma_patterns'
    checks of it merged); InvalidRequest naming `param` past MAX_RULES (counted first, once, on the text sent: the walk
    costs, and the cut's text has no more), for a `$ref` too long to resolve or a cycle where a value must be."""
    text = _json_grammar(schema, strict, param, no_space)
    check_rules(text, param)
    with _refusals(param):
        links = schema_links(schema)
        cut = cut_hops(schema, links)
        if cut is not schema:
            text, links = _json_grammar(cut, strict, param, no_space), schema_links(cut)
    return cut, text, partial(check_row, param, partial(schema_weight, cut, merges, links))


def _call_rule(i: int, tool: ToolSpec) -> str:
    """The Lark rule of one tool's call, `{"name": ..., "arguments": ...}` in Qwen3's layout: the arguments
    (`arguments_{i}`) a schema of their own (call_arguments), so that its references (`#/$defs/...`, as pydantic
    writes nested models; `#`) resolve in it."""
    item, key = JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"]
    head = json.dumps(f'{{"name"{key}{json.dumps(tool.name)}{item}"arguments"{key}')
    return f'call_{i}: {head} arguments_{i} "}}"'


class _Vocabulary:
    """The tokenizer as llguidance.TokenizerWrapper reads it: each id's bytes and the special ids, as
    LLTokenizer(tokenizer.json) derives them (every added token is special: a grammar emits it only by id,
    `<[id]>`; so is each id the tokenizer lacks, named `<[id]>`), and text -> ids by our own Rust tokenizer.
    LLTokenizer(tokenizer.json) would hold a second one: ~70 MB resident for Qwen3's 151k tokens."""

    bos_token_id = None

    def __init__(self, tokenizer: PreTrainedTokenizerFast, token_bytes: TokenBytes, vocab_size: int,
                 eos_ids: list[int]) -> None:
        self._backend = tokenizer.backend_tokenizer
        added = tokenizer.added_tokens_decoder
        known = [bool(token_bytes.bytes(i)) for i in range(vocab_size)]  # empty exactly where the tokenizer has no id
        self.tokens = [token_bytes.bytes(i) if known[i] else f"<[{i}]>".encode() for i in range(vocab_size)]
        self.special_token_ids = [i for i in range(vocab_size) if i in added or not known[i]]
        self.eos_token_id = eos_ids[0]

    def __call__(self, text: str) -> list[int]:
        """The text's bytes as ordinary tokens (what llguidance allows when a grammar forces the text): the
        pre-tokenizer and BPE alone, without the added-token match (`<tool_call>` as text is not the special token,
        which consume_token then refuses: the choice ended there) or the normaliser (which may change the bytes)."""
        pieces = self._backend.pre_tokenizer.pre_tokenize_str(text)
        return [token.id for piece, _ in pieces for token in self._backend.model.tokenize(piece)]


class Grammars:
    """Compiles grammars for one tokenizer; thread-safe (called from the API's worker threads)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, token_bytes: TokenBytes, vocab_size: int,
                 eos_ids: list[int], cache_bytes: int = GRAMMAR_CACHE_BYTES) -> None:
        """`cache_bytes`: the most the cached grammars may hold (EngineConfig.grammar_cache_memory)."""
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        # Built here, with the model: LLTokenizer holds the GIL throughout, which on first use would freeze the
        # server's event loop. Built whole it held it ~0.48 s of CPU for Qwen3's vocabulary; in two calls, the token
        # trie's (~0.26 s) and the mask slices' (~0.32 s), the loop answers /health between them (profiles/RESULTS.md,
        # load29). The same tokenizer: with_slices keeps the trie and builds what a default slices argument would.
        vocabulary = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, token_bytes, vocab_size, self.eos_ids))
        trie = llguidance.LLTokenizer(vocabulary, n_vocab=vocab_size, eos_token=self.eos_ids, slices=[])
        self._tokenizer = trie.with_slices(llguidance.LLTokenizer.general_slices())
        self._lock = native_lock()
        self._cache: GrammarCache[GrammarKey, Grammar] = GrammarCache(CACHE_SIZE, cache_bytes)

    def json_schema(self, schema: dict[str, Any], strict: bool, param: str, no_space: bool = False,
                    key: GrammarKey | None = None, merges: Merges | None = None) -> Grammar:
        """Output that is one JSON value matching `schema` (`no_space`: its separators "," and ":"); InvalidRequest
        naming `param` if it is not one. The cache's key: `key` (a miss: Grammars.compile), else the grammar's text,
        which holds the options. `merges`: what ecma_patterns' checks of `schema` merged, for its weighing. What is
        compiled is _cut_json_schema's schema."""
        _, text, bounded = _cut_json_schema(schema, strict, param, no_space, merges)
        return self.compile(text, param, key, bounded)

    def tool_calls(self, tools: list[ToolSpec], parallel: bool, param: str, free_text: bool = False,
                   answer: dict[str, Any] | None = None, answer_strict: bool = False,
                   key: GrammarKey | None = None, answer_weight: int | None = None,
                   answer_param: str = "response_format") -> Grammar:
        """Output that is Hermes tool calls (`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`)
        of the given tools: one, or with `parallel` one or more separated by newlines. tool_choice "auto": with
        `free_text` (a constrained tool under auto) any text of ordinary tokens but `<tool_call>` spelled with them (the
        parser would take it for a call the grammar never saw), where the model may open a call with the
        `<tool_call>` token, which then follows the grammar (at most one without `parallel`); with `answer` (a JSON
        response_format's schema, and its strictness) either the calls or that JSON. `key`: the cache's (a miss:
        Grammars.compile). `answer_weight`, each ToolSpec's `weight`: their schema_weight where weighed already.
        llguidance's 400 names the tool (or `answer_param`) whose schema it was compiling, not our grammar's line."""
        ids = [self._hf.convert_tokens_to_ids(tag) for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)]
        if any(i is None or i == self._hf.unk_token_id for i in ids):
            raise InvalidRequest("this model has no <tool_call> tokens", param=param)
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        more = ' ("\\n" call)*' if parallel else ""
        if free_text:  # text of ordinary tokens that never spells the tag: only the `<tool_call>` token opens a call
            rules = [f"start: free (call free){'*' if parallel else '?'}", "free: TEXT?",
                     f"TEXT: /(?s:.+)/ & ~/(?s:.*{TOOL_CALL_OPEN}.*)/"]
        else:
            rules = [f"start: call{more}" if answer is None else f"start: call{more} | answer"]
        rules.append(f'call: <[{ids[0]}]> "\\n" ({calls}) "\\n" <[{ids[1]}]>')
        rules += [_call_rule(i, tool) for i, tool in enumerate(tools)]
        schemas = {f"arguments_{i}": (call_arguments(tool.parameters), tool.strict, tool.weight)
                   for i, tool in enumerate(tools)}
        if answer is not None:
            schemas["answer"] = (answer, answer_strict, answer_weight)
        text = "\n".join([*rules, *(f"{name}: %json {json.dumps(_schema_with_options(schema, strict))}"
                                    for name, (schema, strict, _) in schemas.items())])
        origins = [*(f"the parameters of function {tool.name!r}" for tool in tools), f"the schema of {answer_param}"]
        def origin(line: int) -> tuple[str, int | None]:  # the text's line (from 1): the rules', then each schema's
            index = line - len(rules) - 1
            return (origins[index], index) if index >= 0 else ("the tool calls' own layout", None)
        lark, weigh = LLMatcher.grammar_from_lark(text), partial(_weigh_tool_calls, rules, schemas)
        return self.compile(lark, param, key, partial(check_bounds, lark, param, weigh), origin)

    def from_text(self, kind: str, text: str, param: str) -> Grammar:
        """Output that matches `text` of llguidance.grammar_from's `kind`: "regex", "choice" (a JSON list of the
        strings) or "grammar" (Lark, or llama.cpp's GBNF); InvalidRequest naming `param` if it is not one.
        Cached by (kind, text): converting GBNF to Lark, in Python, takes milliseconds (profiles/RESULTS.md), and
        converting and compiling up to 0.1-0.45 s at MAX_GBNF_CHARS, checked before (engine/gbnf: in linear time), as
        is a Lark grammar's MAX_LARK_CHARS."""
        key = text_key(kind, text)
        grammar = self.cached(key)
        if grammar is not None:
            return grammar
        if kind == "regex":
            check_pattern_chars(len(text), param, "the regex is")
        if kind == "grammar" and len(text) > MAX_GBNF_CHARS and is_gbnf(text):
            raise InvalidRequest(f"invalid {param}: a GBNF grammar longer than {MAX_GBNF_CHARS} characters (give "
                                 "it as Lark, which takes more)", param=param)
        if kind == "grammar" and len(text) > MAX_LARK_CHARS:
            raise InvalidRequest(f"invalid {param}: a Lark grammar longer than {MAX_LARK_CHARS} characters",
                                 param=param)
        try:
            converted = grammar_from_text(text) if kind == "grammar" else llguidance.grammar_from(kind, text)
        except ValueError as exc:
            raise _invalid(param, str(exc)) from None
        if kind == "grammar":  # a choice's strings are literals: cheap (8 MB in 0.7 s)
            schemas: list[Any] = []
            chars = regex_chars(converted, MAX_PATTERN_CHARS, schemas)
            read = _read_data(schemas) if chars <= MAX_PATTERN_CHARS and rules_bound(converted) <= MAX_RULES else []
            chars += sum(len(pattern) for _, node in read for pattern in own_patterns(node))
            check_pattern_chars(chars, param, "the grammar's regexes (its /.../ terminals, GBNF's classes, %regex "
                                "substrings and %json patterns, with those of data a $ref reads) are")
            # the %json schemas' properties and const and enum values: a request's schemas' bounds
            properties, values, budget = 0, 0, SchemaBudget()
            objects = {id(schema): SchemaObjects(schema) for schema in schemas}
            for root, node in itertools.chain(((schema, node) for schema in schemas for node in schema_objects(schema)),
                                              read):
                properties += object_properties(node, param, objects[id(root)])
                values += values_weight(node, budget.left(values))
                budget.counted(param, 0, properties, values=values)
        return self._compiled(converted, param, key)

    def cached(self, key: GrammarKey) -> Grammar | None:
        """The cached grammar, now the most recently used; None on a miss or a spoiled one. The cache weighed anew
        (its grammars' wear), what it drops let go of after the lock."""
        with self._lock:
            grammar = self._cache.get(key)
            gone = self._cache.reweigh()
            if grammar is not None and grammar.spoiled:
                self._cache.pop(key)  # let go of after the lock, as `grammar`
                return None
        del gone
        return grammar

    def cache_stats(self) -> tuple[int, int]:
        """(the grammars cached, the bytes they hold): the event loop must not wait for the lock, so they are weighed
        anew (without dropping any) only where it is free, else as last weighed (two ints read under the GIL)."""
        if self._lock.acquire(blocking=False):
            try:
                self._cache.reweigh(drop=False)
            finally:
                self._lock.release()
        return self._cache.grammars, self._cache.bytes

    def compile(self, text: str, param: str, key: GrammarKey | None = None,
                bounded: Callable[[], int] | None = None, origin: Origin | None = None) -> Grammar:
        """The grammar of `text`, cached under `key` where given (the caller's, who looked it up and missed: compiled
        here), else under the text, looked up first. `bounded`: its bounds checked before llguidance sees it, where
        they are checked apart (a JSON Schema's: _cut_json_schema; else check_bounds of the text). `origin`: for a
        grammar we generated, what the client sent that a line of it (from 1) came from (_invalid)."""
        if key is None:
            key = text
            if (grammar := self.cached(key)) is not None:
                return grammar
        return self._compiled(text, param, key, bounded, origin)

    def _compiled(self, text: str, param: str, key: GrammarKey, bounded: Callable[[], int] | None = None,
                  origin: Origin | None = None) -> Grammar:
        """compile() on a miss of `key`: the grammar compiled, its first mask computed, and cached."""
        (bounded or partial(check_bounds, text, param))()
        before, released = heap_used(), self._cache.released
        try:
            template = LLMatcher(self._tokenizer, text, log_level=0, limits=LIMITS)  # drops the GIL while it compiles
        except (ValueError, RuntimeError) as exc:
            raise _invalid(param, str(exc), origin) from None
        first_mask = None if template.is_error() else self._first_mask(template)
        if first_mask is None or template.is_error():
            raise _invalid(param, template.get_error(), origin)
        after = heap_used()  # before the cache's count of what it let go of, read after it
        size = charged(before, after, text, self._cache.released - released)
        grammar = Grammar(text, template, first_mask, promises=not template.is_accepting(), compiled=size)
        return self.keep(key, grammar)

    def keep(self, key: GrammarKey, grammar: Grammar) -> Grammar:
        """`grammar` cached under `key` (one grammar may be under several: what different requests sent for it)."""
        with self._lock:
            gone = self._cache.put(key, grammar)
        del gone  # the grammars dropped freed here, not in the lock the other compiling thread waits for
        return grammar

    def _first_mask(self, template: LLMatcher) -> np.ndarray:
        """The template's first mask, int32 [ceil(V/32)]: computing it builds the lexer (up to LIMITS' initial fuel:
        0.25 s for a regex that exhausts it), here in the API's thread (llguidance drops the GIL), not on the engine
        thread, where each choice's copy would compute it again (~0.1 s for such a regex)."""
        words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        template.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        words.flags.writeable = False  # shared by every choice of the grammar
        return words


def check_bounds(text: str, param: str, weigh: Callable[[], int] | None = None) -> int:
    """InvalidRequest naming `param` for a grammar llguidance would fail or choke on (MAX_RULES, then MAX_ROW), before
    it sees it; else its row weight. `weigh`: how to weigh it apart (on the objects it was made of), else
    row_weight(text); called after the cheap MAX_RULES check (check_rules)."""
    check_rules(text, param)
    return check_row(param, partial(row_weight, text) if weigh is None else weigh)


def check_row(param: str, weigh: Callable[[], int]) -> int:
    """InvalidRequest naming `param` where weigh(), a grammar's row weight, passes MAX_ROW or its walk refuses it
    (_refusals); else that weight. Its rules are counted before (check_rules: the weighing costs)."""
    with _refusals(param):
        weight = weigh()
    if weight > MAX_ROW:
        raise InvalidRequest(f"invalid {param}: one parser row of the grammar may hold {weight} items, past "
                             f"{MAX_ROW} (a rule's alternatives each count, and each rule it names its own: a long "
                             "chain of rules or JSON Schema $refs each naming the next, or too many alternatives)",
                             param=param)
    return weight


def check_rules(text: str, param: str) -> None:
    """InvalidRequest naming `param` where the grammar's text has more than MAX_RULES rules (rules_bound's): cheap, so
    counted before a schema's walk and weighing (a 1.6 MB schema of 20,000 `$ref`s took 13.7 s to weigh)."""
    if rules_bound(text) > MAX_RULES:
        raise InvalidRequest(f"invalid {param}: the grammar has more than {MAX_RULES} rules (a JSON Schema $ref "
                             "counts twice)", param=param)


@contextlib.contextmanager
def _refusals(param: str) -> Iterator[None]:
    """What a grammar's walk and weighing refuse, as the 400 naming `param`."""
    try:
        yield
    except RecursionError:  # a `%json` nested past Python's recursion limit (thousands of `[`)
        raise InvalidRequest(f"invalid {param}: the grammar's JSON is nested too deeply", param=param) from None
    except (LongReference, DeepNesting, ManyOptions, HopCycle) as exc:
        raise InvalidRequest(f"invalid {param}: {exc}", param=param) from None


def check_pattern_chars(chars: int, param: str, what: str, note: str = "") -> int:
    """`chars`, the characters of `what` (the regexes a grammar has so far); InvalidRequest naming `param` past
    MAX_PATTERN_CHARS."""
    if chars > MAX_PATTERN_CHARS:
        raise InvalidRequest(f"invalid {param}: {what} longer than {MAX_PATTERN_CHARS} characters in all{note}",
                             param=param)
    return chars


def _weigh_tool_calls(rules: list[str], schemas: dict[str, tuple[dict[str, Any], bool, int | None]]) -> int:
    """The row weight of tool_calls' grammar: its `rules` and each schema's as `%json {}`, with the schemas weighed as
    sent (or as held_json_schema weighed them, their int), not parsed back from the text."""
    weighed = {name: schema_weight(schema) if weight is None else weight
               for name, (schema, _, weight) in schemas.items()}
    return row_weight("\n".join([*rules, *(f"{name}: %json {{}}" for name in schemas)]), weighed)


def _read_data(schemas: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """The objects of the schemas' data (const, enum, default, examples) that a `$ref` reads, which llguidance compiles
    as schemas (schema_links' in_data), each with its schema; none of a schema whose `$ref` is too long to resolve
    (check_bounds' 400)."""
    read: list[tuple[Any, dict[str, Any]]] = []
    for schema in schemas:
        with contextlib.suppress(LongReference):
            read += [(schema, node) for node, _ in schema_links(schema).in_data]
    return read


def text_key(kind: str, text: str) -> tuple[str, str]:
    """The cache's key of a grammar given as text of llguidance.grammar_from's `kind` (Grammars.from_text)."""
    return kind, text


def rules_bound(text: str) -> int:
    """At least the rules and `$ref`s of a grammar's text: each line that may begin a rule (all but blank ones, a
    rule's `|` alternatives and comments) and each `$ref` however spelled (REF) twice."""
    lines = sum(1 for line in map(str.lstrip, text.splitlines()) if line and not line.startswith(("|", "//")))
    return lines + 2 * len(REF.findall(text))


def _invalid(param: str, error: str, origin: Origin | None = None) -> InvalidRequest:
    """The 400 for a grammar llguidance refused. `origin` (Grammars.compile's): the grammar is ours, so llguidance's
    excerpt of it (`  12 | arguments_1: %json {...`) is dropped and the line it points at named by what it came from
    (SchemaRefused, with that schema's index)."""
    error = SYMBOLS.sub(TOO_MANY_SYMBOLS, _cut(error))
    if origin is None:
        return InvalidRequest(f"invalid {param}: {error}", param=param)
    located = LOCATED.match(error)
    reason = located.group(2) if located else error.split("\n", 1)[0]
    where, schema = origin(int(located.group(1))) if located else ("", None)
    error = reason.removeprefix("failed to compile JSON schema: ") + (
        f" (at {where}: the request's schemas compile as one grammar)" if located else "")
    return SchemaRefused(f"invalid {param}: {error}", param, schema)


def _cut(error: str) -> str:
    """llguidance's error without what it appends: a panic's backtrace (kB of the server's build paths)."""
    return APPENDED.split(error, 1)[0]



@dataclass
class RowGrammar:
    """One choice's matcher. It follows the output tokens from `start_after` (the `</think>` token
    while the model may still be thinking) or from the first token when that is None.
    `may_open`: the first token may also be this one (`<think>`, when thinking is on and the prompt did
    not open it). If it is, the thought is free and the constraint starts after `start_after`.
    Otherwise the constraint starts at the first token."""

    matcher: LLMatcher
    start_after: int | None
    eos_ids: list[int]
    may_open: int | None = None
    promises: bool = False  # Grammar.promises: an end inside the thought would break the promise
    first_mask: np.ndarray | None = None  # Grammar.first_mask, used until the matcher takes a token
    source: Grammar | None = None  # spoiled when this matcher errs
    _seen: int = field(default=0)  # output tokens looked at

    @classmethod
    def of(cls, grammar: Grammar, start_after: int | None, eos_ids: list[int],
           may_open: int | None = None) -> RowGrammar:
        """A choice's matcher of `grammar`, starting from its compiled first mask."""
        return cls(grammar.matcher(), start_after, eos_ids, may_open, grammar.promises, grammar.first_mask, grammar)

    @property
    def active(self) -> bool:
        return self.start_after is None or self.may_open is not None

    @property
    def bans_stops(self) -> bool:
        """Inside a free thought of a choice that promised a call or JSON: its stop ids are banned (as min_tokens
        bans them), so that the thought ends by `start_after` or by length, never by an end of turn."""
        return self.promises and self.start_after is not None and self.may_open is None

    def sync(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """Feeds the output tokens (token_ids past the prompt) not seen yet: those sampled since the last step."""
        for token in token_ids[num_prompt_tokens + self._seen:]:
            if self.may_open is not None:
                opened, self.may_open = token == self.may_open, None
                if opened:
                    continue
                self.start_after = None
            if self.start_after is not None:
                if token == self.start_after:
                    self.start_after = None
            else:
                self.matcher.consume_token(token)  # a refused token leaves the matcher in its error state
                self.first_mask = None
                if self.source is not None:
                    self.source.wear += 1
        self._seen = len(token_ids) - num_prompt_tokens

    def fill_start(self, bitmask: torch.Tensor, row: int) -> bool:
        """The tokens allowed next into row `row` of bitmask (int32 [B, ceil(V/32)] on the host), in two parts around
        the matcher's mask, so that a step's matchers compute theirs together (LogitAdjuster): the compiled first mask,
        else whether the matcher's mask is still to compute into it (compute_mask); fill_end after."""
        if self.first_mask is not None:
            bitmask[row].numpy()[:] = self.first_mask
            return False
        return not self.matcher.is_error()

    def fill_end(self, bitmask: torch.Tensor, row: int) -> bool:
        """-> whether the matcher erred (before this mask, or in computing it): the answer can no longer follow the
        grammar, and its request fails (StepOutput.grammar_failed; vLLM's guidance backend ends the choice with "stop",
        a truncated answer labelled as a normal end). Its row allows only EOS, a token the step samples and the engine
        drops. A lexer's error (its fuel spent: LIMITS) is the shared lexer's: logged once, and the grammar spoiled;
        another (a parser row past llguidance's items, a long chain of rules) is this matcher's alone."""
        if self.matcher.is_error():
            if self.source is not None and not self.source.spoiled \
                    and self.matcher.get_error().startswith("lexer error"):
                self.source.spoiled = True
                log.warning("a grammar's matcher erred, its request failed: %s", self.error)
            bitmask[row] = token_bitmask(self.eos_ids, bitmask.shape[1] * 32)
            return True
        if self.may_open is not None:  # its one bit set in place, not a vocabulary-sized mask built per call
            word, bit = divmod(self.may_open, 32)
            bitmask[row].numpy().view(np.uint32)[word] |= np.uint32(1 << bit)
        return False

    @property
    def error(self) -> str | None:
        """Why the matcher erred, llguidance's reason (_cut, at most ERROR_CHARS), None while it has not."""
        return _cut(self.matcher.get_error())[:ERROR_CHARS] if self.matcher.is_error() else None
