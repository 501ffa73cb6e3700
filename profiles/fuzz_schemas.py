"""Structured outputs fuzzed through a real `gunicorn -k gevent server:app` (tiny checkpoint, CPU, fp32, sampled so
that answers wander): seeded random JSON Schemas within what README says the engine enforces (`strict: true`), each
answer that ended (`finish_reason: "stop"`) validated by the `jsonschema` package; a keyword the engine cannot enforce
put somewhere in one, a 400 naming it; random vLLM regexes (`structured_outputs.regex`), each ended answer matched by
Python's `re` (README: Unicode classes, as `re`); grammars past the bounds (MAX_ROW, MAX_PATTERN_CHARS, MAX_GBNF_CHARS,
a regex past the lexer's fuel) a 400 naming the field, and near them served. /health polled every 10 ms throughout
(chat_http.health_polled): the longest hold less the load printed, and a failure past `--held-ms`. Exit 1 on any
failure.

`--weigh N` instead (no server): N seeded schemas of the row weighing's domain (Weighed: anyOf/oneOf options that go on
alike, a level down and further, `$ref` chains, recursion, pydantic-like Optional/Union/List of models), each weighed
(grammar.check_json_schema, its CPU time) against llguidance itself (grammar.LIMITS, the tiny checkpoint's tokenizer)
following random instances of it token by token (Witnesses) and `--walks` walks of its mask steered to its heaviest
rows (Steered): UNDER (served, llguidance's row past its limit at some token of either), OVER (refused for its parser
row, every instance followed, llguidance's largest row found by bisecting max_items_in_row, and every walk's, within
MAX_ROW; a walk past it is the instances' miss, printed), SLOW (weighed in more than --slow-s of CPU; `--write-slow
DIR` writes each). `--shrink-s S`: each UNDER or OVER cut down (smaller: chains halved, options, properties and loose
values dropped) while it stays one, for S seconds. Exit 1 on any. With `--weights`, each schema's weight or refusal
printed instead, nothing followed (seconds, not hours): two trees' outputs on one seed diff to their weighing's changes.

python profiles/fuzz_schemas.py [--schemas 60] [--regexes 30] [--seed 0] [--held-ms 50] [--weigh 0] [--slow-s 0.5]
    [--walks 4] [--shrink-s 0] [--write-slow DIR] [--weights]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from chat_http import MODEL, cpu_env, health_polled, most_held  # noqa: E402
from checkpoints import ENDOFTEXT_ID, EOS_IDS, VOCAB_SIZE, make_checkpoint  # noqa: E402
from checks import Checks  # noqa: E402
from nanoqwen.engine import grammar, grammar_rows  # noqa: E402
from nanoqwen.engine.hop_cycles import HopCycle  # noqa: E402
from nanoqwen.engine.schema_keywords import schema_objects  # noqa: E402
from nanoqwen.engine.validation import InvalidRequest  # noqa: E402
from nanoqwen.loader import load_tokenizer  # noqa: E402
from nanoqwen.text import TokenBytes  # noqa: E402
from schema_shapes import ALIKE, chain_defs, hop_chain  # noqa: E402
from server_process import GunicornServer  # noqa: E402

MAX_TOKENS = 120
FAILED_MID_ANSWER = "the output could not follow the grammar"
OPTIONAL_COUNTED = 'min/maxProperties only supported when all keys listed in "properties" are required'
# keywords llguidance cannot enforce, each with a value it would have to: strict, a 400 naming the keyword
UNENFORCED: dict[str, Any] = {
    "not": {"type": "null"}, "if": {"type": "string"}, "uniqueItems": True, "contains": {"type": "integer"},
    "maxContains": 2, "dependentRequired": {"a": ["b"]}, "dependentSchemas": {"a": {}},
    "propertyNames": {"pattern": "^a"}, "unevaluatedProperties": False,
}
FORMATS = ("date", "time", "date-time", "email", "uuid", "ipv4")
PATTERNS = (r"^[a-c]{1,3}$", r"^\d{2}-\d{2}$", r"^(yes|no)$", r"^x+y?$", r"^[A-Z][a-z]*$")
REGEX_PIECES = (r"[a-z]", r"\d", r"(ab|cd)", r"[0-9a-f]{2}", r"x?", r"[A-Z]+", r"\.", r"(foo|bar|baz)", r" ", r"-",
                r"\w", r"[^\n\"]{0,3}", r"(\d{1,2}:)?")


def schema_of(rng: random.Random, depth: int) -> dict[str, Any]:
    """A random schema of the keywords the engine enforces (README, Structured outputs)."""
    kind = rng.choice(["object", "array", "string", "integer", "number", "boolean", "null", "enum", "anyOf"]
                      if depth < 3 else ["string", "integer", "number", "boolean", "enum"])
    if kind == "object":
        names = rng.sample(["a", "b", "c", "name", "id", "x_y", "Ω", "k 1"], rng.randrange(0, 5))
        props = {n: schema_of(rng, depth + 1) for n in names}
        node: dict[str, Any] = {"type": "object", "properties": props, "required": rng.sample(names, rng.randrange(
            0, len(names) + 1)), "additionalProperties": False}
        if rng.random() < 0.2 and names:
            node["minProperties"] = rng.randrange(1, len(names) + 1)
        return node
    if kind == "array":
        node = {"type": "array", "items": schema_of(rng, depth + 1)}
        if rng.random() < 0.5:
            node["minItems"] = lo = rng.randrange(0, 3)
            node["maxItems"] = lo + rng.randrange(0, 3)
        return node
    if kind == "string":
        node = {"type": "string"}
        pick = rng.random()
        if pick < 0.3:
            node["pattern"] = rng.choice(PATTERNS)
        elif pick < 0.5:
            node["format"] = rng.choice(FORMATS)
        elif pick < 0.8:
            node["minLength"] = lo = rng.randrange(0, 4)
            node["maxLength"] = lo + rng.randrange(0, 6)
        return node
    if kind in ("integer", "number"):
        node = {"type": kind}
        if rng.random() < 0.6:
            lo = rng.randrange(-50, 50)
            node["minimum" if rng.random() < 0.5 else "exclusiveMinimum"] = lo
            node["maximum" if rng.random() < 0.5 else "exclusiveMaximum"] = lo + rng.randrange(2, 100)
        if kind == "integer" and rng.random() < 0.2:
            node["multipleOf"] = rng.choice([2, 3, 5])
        return node
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 3, None, True, "é ü", [1, 2]], rng.randrange(1, 4))}
    if kind == "anyOf":
        return {"anyOf": [schema_of(rng, depth + 1) for _ in range(rng.randrange(1, 4))]}
    return {"type": kind}


def with_unenforced(rng: random.Random, schema: dict[str, Any], keyword: str) -> dict[str, Any]:
    """`schema` with `keyword` put in a random one of its schema objects (copied)."""
    schema = json.loads(json.dumps(schema))
    rng.choice(fuzzed_objects(schema))[keyword] = UNENFORCED[keyword]
    return schema


def fuzzed_objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """`schema` and each schema object in it (schema_of's keywords)."""
    nodes, stack = [], [schema]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack += list(node.get("properties", {}).values()) + node.get("anyOf", []) + (
            [node["items"]] if isinstance(node.get("items"), dict) else [])
    return nodes


def counts_optional_properties(schema: dict[str, Any]) -> bool:
    """Whether an object in `schema` bounds its count of properties where some are optional: llguidance refuses
    some such (an invalid schema to it, a 400 naming min/maxProperties), enforcing the rest."""
    return any("minProperties" in node and set(node["properties"]) - set(node["required"])
               for node in fuzzed_objects(schema))


def regex_of(rng: random.Random) -> str:
    return "".join(rng.choice(REGEX_PIECES) for _ in range(rng.randrange(1, 6)))


class Fuzz(Checks):
    def __init__(self, srv: GunicornServer, rng: random.Random) -> None:
        self.srv, self.rng = srv, rng
        self.passed, self.cut, self.failures, self.mid_answer = 0, 0, [], []
        self.optional_counted = 0  # schemas refused for minProperties beside optional properties

    def chat(self, extra: dict[str, Any], n: int = 2) -> requests.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "answer"}], "max_tokens": MAX_TOKENS,
                "temperature": 1.0, "seed": self.rng.randrange(1 << 30), "n": n,
                "chat_template_kwargs": {"enable_thinking": False}, **extra}
        return requests.post(self.srv.url + "/v1/chat/completions", json=body, timeout=600)

    def answers(self, r: requests.Response, what: str) -> list[str]:
        """The ended answers' contents (a 200 expected); those cut by max_tokens counted apart, and a grammar that
        failed mid-answer (llguidance's lexer past its fuel: README's documented 400) listed apart."""
        if r.status_code == 400 and r.json()["error"]["message"].startswith(FAILED_MID_ANSWER):
            self.mid_answer.append(f"{what}: {r.json()['error']['message']}")
            print("MID-ANSWER", self.mid_answer[-1], flush=True)
            return []
        if r.status_code != 200:
            self.check(False, f"{what}: {r.status_code} {r.text[:300]}")
            return []
        ended = [c["message"]["content"] for c in r.json()["choices"] if c["finish_reason"] == "stop"]
        self.cut += len(r.json()["choices"]) - len(ended)
        return ended

    @staticmethod
    def error_of(r: requests.Response) -> dict[str, Any]:
        """The answer's OpenAI error object; {} where it has none (a 200, a body not JSON)."""
        return r.json().get("error") or {} if r.headers.get("content-type", "").startswith("application/json") else {}

    def refused(self, extra: dict[str, Any], param: str, words: tuple[str, ...], what: str) -> None:
        r = self.chat(extra, n=1)
        error = self.error_of(r)
        self.check(r.status_code == 400 and error.get("param") == param and all(w in error.get("message", "")
                                                                                  for w in words),
                   f"{what}: {r.status_code} {r.text[:300]}")

    def schemas(self, count: int) -> None:
        for _ in range(count):
            self.schema(schema_of(self.rng, 0))

    def schema(self, schema: dict[str, Any]) -> None:
        """Its ended answers valid, or (minProperties beside optional properties) a 400 naming the keyword; with an
        unenforced keyword put in it, a 400 naming that."""
        rf = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema, "strict": True}}
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        r = self.chat({"response_format": rf})
        error = self.error_of(r) if r.status_code == 400 else {}
        if OPTIONAL_COUNTED in error.get("message", ""):
            self.check(error.get("param") == "response_format" and counts_optional_properties(schema),
                       f"schema {json.dumps(schema)}: {r.text[:300]}")
            self.optional_counted += 1
        else:
            for content in self.answers(r, f"schema {json.dumps(schema)}"):
                try:
                    errors = [e.message for e in validator.iter_errors(json.loads(content))]
                except ValueError as exc:
                    errors = [f"not JSON: {exc}"]
                self.check(not errors, f"schema {json.dumps(schema)}: {content!r}: {errors[:2]}")
        keyword = self.rng.choice(list(UNENFORCED))
        bad = with_unenforced(self.rng, schema, keyword)
        self.refused({"response_format": {**rf, "json_schema": {"name": "f", "schema": bad, "strict": True}}},
                     "response_format", (keyword,), f"unenforced {keyword} in {json.dumps(bad)}")

    def regexes(self, count: int) -> None:
        for _ in range(count):
            regex = regex_of(self.rng)
            for content in self.answers(self.chat({"structured_outputs": {"regex": regex}}), f"regex {regex!r}"):
                matched = re.fullmatch(regex, content) is not None
                if not matched and any(unicodedata.category(ch) == "Cn" for ch in content):
                    print("NEWER UNICODE", regex, repr(content), flush=True)  # a class llguidance's Unicode widened
                    continue
                self.check(matched, f"regex {regex!r}: {content!r}")

    def bounds(self) -> None:
        """Past each bound a 400 naming the field; just within it, served."""
        chain = "".join(f'r{i}: r{i + 1} | "b"\n' for i in range(grammar.MAX_ROW // 2 + 5))
        self.refused({"structured_outputs": {"grammar": "start: r0\n" + chain + f"r{grammar.MAX_ROW // 2 + 5}: "
                                                                                  '"a"'}},
                     "structured_outputs.grammar", ("parser row",), "chain past MAX_ROW")
        pattern = r"(?i)\p{L}"
        many = pattern * (grammar.MAX_PATTERN_CHARS // len(pattern) + 1)
        self.refused({"structured_outputs": {"regex": many}}, "structured_outputs.regex", (), "regex past its bound")
        self.refused({"structured_outputs": {"regex": "a{100000}"}}, "structured_outputs.regex", (),
                     "a regex past the lexer's fuel")
        gbnf = "root ::= " + " | ".join(f'"w{i}"' for i in range(grammar.MAX_GBNF_CHARS // 6))
        self.refused({"structured_outputs": {"grammar": gbnf}}, "structured_outputs.grammar", (), "GBNF past its bound")
        near = "(" + "|".join(f"w{i:04d}" for i in range(grammar.MAX_PATTERN_CHARS // 7)) + ")"
        for content in self.answers(self.chat({"structured_outputs": {"regex": near}}, n=1), "regex near its bound"):
            self.check(re.fullmatch(near, content) is not None, f"near-bound regex: {content!r}")


# the weighing's domain (Weighed): chains' links straddling MAX_ROW when 2-6 options add them up, keys few so that
# options share them, patterns that name none of KEYS (an instance's key matches one keyword)
LINKS = (0, 3, 20, 60, 120, 200, 300)
KEYS = ("x", "y", "k", "id")
PATTERNS = ("^p[0-9]$", "^z$")
SCALARS = ({"type": "integer"}, {"type": "string"}, {"type": "boolean"}, {"type": "null"}, {"const": "c"})
LIMIT_ERROR = re.compile(r"Current row has (\d+) items")
MAX_DEPTH = 3


@dataclass
class Weighed:
    """One random schema of the row weighing's domain: `$defs` filled as its pieces are made."""

    rng: random.Random
    defs: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)  # models being made: a `$ref` to one is recursion

    def schema(self) -> dict[str, Any]:
        root = self.options(0) if self.rng.random() < 0.6 else self.value(0)
        return {**root, "$defs": self.defs} if "$ref" not in root else {"anyOf": [root], "$defs": self.defs}

    def chain(self) -> dict[str, Any]:
        """A `$ref` to a chain of its own (chain_defs' `anyOf [$ref next, integer]` links), or to `$ref`s that each
        only name the next (hops)."""
        name = f"c{len(self.defs)}_"
        links = self.rng.choice(LINKS)
        if self.rng.random() < 0.2:
            self.defs |= hop_chain(links, dict(self.rng.choice(SCALARS)), name)
        else:
            self.defs |= chain_defs(name, links, self.rng.choice(["integer", "string", "boolean"]))
        return {"$ref": f"#/$defs/{name}0"}

    def value(self, depth: int) -> dict[str, Any]:
        kinds = ["chain", "scalar"] + (["object", "array", "options", "model"] * 2 if depth < MAX_DEPTH else [])
        kinds += ["recursion"] if self.models else []
        kind = self.rng.choice(kinds)
        if kind == "chain":
            return self.chain()
        if kind == "object":
            return self.object(depth + 1)
        if kind == "array":
            return self.array(depth + 1)
        if kind == "options":
            return self.options(depth + 1)
        if kind == "model":
            return self.model(depth + 1)
        if kind == "recursion":  # Optional[Self] or List[Self]: an instance may end it
            ref = {"$ref": f"#/$defs/{self.rng.choice(self.models)}"}
            return {"anyOf": [ref, {"type": "null"}]} if self.rng.random() < 0.5 else {"type": "array", "items": ref}
        return dict(self.rng.choice(SCALARS))

    def model(self, depth: int) -> dict[str, Any]:
        """pydantic's nested model: a `$ref` to an object in `$defs`, Optional (`anyOf [$ref, null]`) or not."""
        name = f"m{len(self.defs)}"
        self.defs[name] = {}  # its place, so that recursion finds it
        self.models.append(name)
        self.defs[name] = self.object(depth)
        self.models.remove(name)
        ref = {"$ref": f"#/$defs/{name}"}
        return {"anyOf": [ref, {"type": "null"}]} if self.rng.random() < 0.4 else ref

    def object(self, depth: int) -> dict[str, Any]:
        names = self.rng.sample(KEYS, self.rng.randrange(1, 4))
        properties = {"kind": {"const": f"v{self.rng.randrange(3)}"}} if self.rng.random() < 0.2 else {}
        properties |= {name: self.value(depth) for name in names}
        node = {"type": "object", "properties": properties,
                "required": [n for n in properties if n == "kind" or self.rng.random() < 0.7]}
        if self.rng.random() < 0.2:
            node["patternProperties"] = {self.rng.choice(PATTERNS): self.value(depth)}
        pick = self.rng.random()
        node["additionalProperties"] = self.value(depth) if pick < 0.15 else False
        return node

    def array(self, depth: int) -> dict[str, Any]:
        if self.rng.random() < 0.5:
            return {"type": "array", "items": self.value(depth)} | (
                {"minItems": 1, "maxItems": 1} if self.rng.random() < 0.3 else {})
        prefix = [self.value(depth) for _ in range(self.rng.randrange(1, 4))]
        return {"type": "array", "prefixItems": prefix, "items": False, "minItems": len(prefix)}

    def options(self, depth: int) -> dict[str, Any]:
        """2-6 options: made alike (an ALIKE shape around each its own value, once or twice over) or each its own."""
        count = self.rng.randrange(2, 7)
        if self.rng.random() < 0.6:
            shapes = [ALIKE[name].option for name in self.rng.sample(sorted(ALIKE), self.rng.randrange(1, 3))]
            made = []
            for j in range(count):
                option = self.chain() if self.rng.random() < 0.7 or depth >= MAX_DEPTH else self.value(depth)
                for shape in shapes:
                    option = shape(j, option)
                made.append(option)
        else:
            made = [self.value(depth) for _ in range(count)]
        if self.rng.random() < 0.2:
            made = [{"anyOf": made[:2]}, *made[2:]]
        return {"oneOf" if self.rng.random() < 0.1 else "anyOf": made}


@dataclass
class Witnesses:
    """Random instances of a Weighed schema: `$ref`s and options followed, each ending short of a bound depth."""

    rng: random.Random
    defs: dict[str, Any]

    def of(self, node: dict[str, Any], depth: int = 0) -> Any:
        deep = depth > 12
        if "$ref" in node:
            return self.of(self.defs[node["$ref"].rsplit("/", 1)[1]], depth + 1)
        if "const" in node:
            return node["const"]
        options = node.get("anyOf") or node.get("oneOf")
        if options:
            ending = [o for o in options if "$ref" not in o and not (o.get("anyOf") or o.get("oneOf"))]
            return self.of(self.rng.choice(ending if deep and ending else options), depth + 1)
        kind = node.get("type")
        if kind == "object":
            return self.object(node, depth)
        if kind == "array":
            prefix = [self.of(item, depth + 1) for item in node.get("prefixItems", [])]
            items = node.get("items")
            least = node.get("minItems", 0) - len(prefix)
            more = 0 if items is False else least if deep else max(least, self.rng.randrange(0, 3))
            return prefix + [self.of(items, depth + 1) for _ in range(min(more, node.get("maxItems", more)))]
        return {"integer": 7, "string": "s", "boolean": True, "null": None}[kind]

    def object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        required, least = node.get("required", []), node.get("minProperties", 0)
        made = {name: self.of(value, depth + 1) for name, value in node.get("properties", {}).items()
                if name in required or (self.rng.random() < 0.6 and depth <= 12)}
        for pattern, value in node.get("patternProperties", {}).items():
            if self.rng.random() < 0.6 or len(made) < least:
                made[key_matching(pattern)] = self.of(value, depth + 1)
        if isinstance(node.get("additionalProperties"), dict) and (self.rng.random() < 0.6 or len(made) < least):
            made["q"] = self.of(node["additionalProperties"], depth + 1)
        return made


def key_matching(pattern: str) -> str:
    """A key the generator's and ALIKE's patterns (anchors, letters, digit classes) match."""
    key = re.sub(r"\[0-9\]", "1", pattern.strip("^$"))
    assert re.search(pattern, key), pattern
    return key


# The steered walk's probe limits: each a quarter past the last, so that a walk compiles its grammar a few dozen times
# at most (rows between two limits are not told apart)
LADDER = 1.25
FLOOR = 16  # the first probe limit (rows below it steer nothing)
WALK_TOKENS = 240  # a steered walk's most tokens
TRIED = 16  # the allowed tokens a step tries, their rows read
END_TOKENS = ENDOFTEXT_ID  # the first special token: a walk never ends itself (EOS) nor takes a special token
CHAIN_LINK = re.compile(r"(.*_)(\d+)")  # a `$defs` name of Weighed's chains: its prefix and its place
FREE = 1_000  # allowed tokens from which on the walk is inside a string (a free key or a string value)


def ladder(row: int) -> int:
    """The least probe limit at or past `row` (FLOOR at least)."""
    limit = FLOOR
    while limit < row:
        limit = max(limit + 1, int(limit * LADDER))
    return limit


@dataclass
class Steered:
    """llguidance's own mask walked a token at a time, steered to its heaviest rows: each step tries a few of the
    tokens the mask allows (all where few are: where bytes are forced it allows their longest token; else its
    printable one-character tokens first, then others at random), each on a copy of a matcher whose max_items_in_row
    is the walk's row record so far (ladder'd), so that one whose row is larger errs naming its size ("Current row has N
    items"); the largest is taken (a new record: the matcher made again past it), else a token at random, biased to
    open values, add keys and go on before closing (closing once half the walk is spent), and a string opened where
    many tokens are allowed filled with one of `keys` (the schema's own, keys its patterns match). llguidance checks
    the row at the end of each token: short tokens check more of them (fuzz40's Witnesses used the text's own)."""

    grammars: grammar.Grammars
    tokenizer: Any  # the HF tokenizer: a token's text
    chars: dict[str, int]  # each printable ASCII character's token
    text: str
    keys: list[str]
    rng: random.Random
    templates: dict[int, llguidance.LLMatcher] = field(default_factory=dict)  # by limit, compiled, first mask built
    texts: dict[int, str] = field(default_factory=dict)

    def matcher(self, limit: int, path: list[int]) -> llguidance.LLMatcher:
        if (template := self.templates.get(limit)) is None:
            limits = llguidance.LLParserLimits(initial_lexer_fuel=grammar.LIMITS.initial_lexer_fuel,
                                               step_lexer_fuel=grammar.LIMITS.step_lexer_fuel, max_items_in_row=limit)
            template = self.templates[limit] = llguidance.LLMatcher(self.grammars._tokenizer, self.text, log_level=0,
                                                                    limits=limits)
            template.compute_bitmask()
        matcher = template.deep_copy()
        matcher.consume_tokens(path)
        return matcher

    @staticmethod
    def row(matcher: llguidance.LLMatcher, token: int) -> int:
        """The row `token` makes past `matcher`'s limit (its size); 0 where within it, -1 where refused otherwise."""
        tried = matcher.deep_copy()
        if tried.consume_token(token) and not tried.is_error():
            return 0
        found = LIMIT_ERROR.search(tried.get_error())
        return int(found.group(1)) if found else -1

    def text_of(self, token: int) -> str:
        if (known := self.texts.get(token)) is None:
            known = self.texts[token] = self.tokenizer.decode([token])
        return known

    def tried(self, allowed: list[int], pending: str) -> list[int]:
        if len(allowed) <= TRIED:
            return allowed
        singles = [token for token in allowed if self.text_of(token) in self.chars]
        picked = self.rng.sample(singles, min(TRIED // 2, len(singles)))
        picked += self.rng.sample(allowed, TRIED - len(picked))
        if pending and self.chars.get(pending[0]) in allowed:  # a key's next character, where one token spells it
            picked.append(self.chars[pending[0]])
        return list(dict.fromkeys(picked))

    def walk(self) -> tuple[int, str]:
        """The largest row one walk read (to the first past ROW_ITEMS), and its text."""
        path: list[int] = []
        typed, pending, limit, largest = "", "", FLOOR, 0
        matcher = self.matcher(limit, path)
        while len(path) < WALK_TOKENS and not matcher.is_error() and largest <= grammar.ROW_ITEMS:
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
            allowed = np.flatnonzero(bits[:END_TOKENS]).tolist()
            if not allowed:
                break
            if len(allowed) >= FREE and typed.endswith('"') and not pending and self.rng.random() < 0.8:
                pending = self.rng.choice(self.keys) + '"'
            tried = self.tried(allowed, pending)
            rows = {token: self.row(matcher, token) for token in tried}
            heaviest = max(tried, key=rows.__getitem__)
            if rows[heaviest] > 0:
                largest, limit = max(largest, rows[heaviest]), ladder(rows[heaviest])
                typed, pending = typed + self.text_of(heaviest), ""
                path.append(heaviest)
                matcher = self.matcher(limit, path)
                continue
            open_ = [token for token in tried if rows[token] == 0]
            if not open_:
                break
            if pending and self.chars.get(pending[0]) in open_:
                token, pending = self.chars[pending[0]], pending[1:]
            else:
                pending = ""
                late = len(path) > WALK_TOKENS // 2
                token = self.rng.choices(open_, [self.bias(self.text_of(each), late) for each in open_])[0]
            typed += self.text_of(token)
            path.append(token)
            matcher.consume_token(token)
        return largest, typed

    @staticmethod
    def bias(text: str, late: bool) -> float:
        if any(ch in text for ch in "{["):
            return 0.2 if late else 4.0
        if any(ch in text for ch in "}]"):
            return 6.0 if late else 0.5
        if "," in text:
            return 0.5 if late else 3.0
        return 2.0 if '"' in text else 1.0


def schema_keys(schema: dict[str, Any]) -> list[str]:
    """The keys a steered walk types where a key is free: every property name in `schema`, a key each pattern
    matches (generator's and ALIKE's patterns), and `q`."""
    keys = {"q"}
    for node in schema_objects(schema):
        keys.update(node.get("properties", {}))
        keys.update(map(key_matching, node.get("patternProperties", {})))
    return sorted(keys)


def pruned(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without the `$defs` no `$ref` reaches from its root."""
    defs = schema.get("$defs")
    if not isinstance(defs, dict):
        return schema
    root = {key: value for key, value in schema.items() if key != "$defs"}
    kept: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and (name := ref[8:]) not in kept and name in defs:
                kept.add(name)
                stack.append(defs[name])
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return {**root, "$defs": {name: value for name, value in defs.items() if name in kept}}


def _subschemas(schema: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The path (keys and indices) of each schema object in `schema` (Weighed's keywords), the root's `()`: paths, not
    the objects schema_keywords' walk gives, as the shrinker cuts each by its place."""
    paths, stack = [], [()]
    while stack:
        path = stack.pop()
        node = _at(schema, path)
        if not isinstance(node, dict):
            continue
        paths.append(path)
        for key in ("properties", "patternProperties", "$defs"):
            if isinstance(node.get(key), dict):
                stack += [(*path, key, name) for name in node[key]]
        for key in ("anyOf", "oneOf", "prefixItems"):
            if isinstance(node.get(key), list):
                stack += [(*path, key, i) for i in range(len(node[key]))]
        stack += [(*path, key) for key in ("items", "additionalProperties") if isinstance(node.get(key), dict)]
    return paths


def _at(schema: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        schema = schema[part]
    return schema


def smaller(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Schemas a step smaller than `schema` (each a copy, its unreached `$defs` dropped), the largest cuts first: each
    chain of `$defs` (`{name}_{i}`) halved; each option, property, pattern, loose value and array place dropped; each
    subschema made an integer."""
    def copy() -> dict[str, Any]:
        return json.loads(json.dumps(schema))

    defs = schema.get("$defs", {})
    chains: dict[str, int] = {}
    for name in defs:
        if found := CHAIN_LINK.fullmatch(name):
            chains[found.group(1)] = max(chains.get(found.group(1), 0), int(found.group(2)))
    for prefix, links in chains.items():
        if links >= 2:
            made = copy()
            made["$defs"][f"{prefix}{links // 2}"] = made["$defs"][f"{prefix}{links}"]
            yield f"chain {prefix} of {links} halved", pruned(made)
    paths = [path for path in _subschemas(schema) if path[:1] != ("$defs",) or not CHAIN_LINK.fullmatch(path[1])]
    for path in paths:
        node = _at(schema, path)
        for key in ("anyOf", "oneOf", "prefixItems"):
            for i in range(len(node.get(key, [])) if isinstance(node.get(key), list) and len(node[key]) > 1 else 0):
                made = copy()
                place = _at(made, path)
                del place[key][i]
                if key == "prefixItems" and "minItems" in place:
                    place["minItems"] = len(place[key])
                yield f"{key} {i} of {path} dropped", pruned(made)
        for name in node.get("properties", {}) if isinstance(node.get("properties"), dict) else ():
            made = copy()
            place = _at(made, path)
            del place["properties"][name]
            if isinstance(place.get("required"), list) and name in place["required"]:
                place["required"].remove(name)
            yield f"property {name} of {path} dropped", pruned(made)
        for key in ("patternProperties", "additionalProperties"):
            if isinstance(node.get(key), dict):
                made = copy()
                _at(made, path)[key] = False if key == "additionalProperties" else {}
                yield f"{key} of {path} dropped", pruned(made)
    for path in paths:
        if path and path[-2:-1] != ("$defs",) and _at(schema, path) != {"type": "integer"}:
            made = copy()
            _at(made, path[:-1])[path[-1]] = {"type": "integer"}
            yield f"{path} made an integer", pruned(made)


def shrunk(schema: dict[str, Any], holds: Callable[[dict[str, Any]], bool], seconds: float) -> dict[str, Any]:
    """`schema` cut down a step at a time (smaller's first cut that `holds`) while one does, for `seconds` at most."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        for what, cut in smaller(schema):
            if time.monotonic() > ends:
                break
            if holds(cut):
                schema = cut
                print(f"  shrunk: {what} ({len(json.dumps(schema))} chars)", flush=True)
                break
        else:
            break
    return schema


def refused_otherwise(weight: int | str, text: str) -> bool:
    """Refused for something other than its row (llguidance's own refusal, e.g. oneOf's options that may overlap; our
    ManyOptions): no row of it to weigh against llguidance."""
    return isinstance(weight, str) and ("parser row" not in weight or bool(llguidance.LLMatcher.validate_grammar(text)))


class Weighing:
    """The weighing of Weighed schemas against llguidance following their Witnesses and Steered walks (main's
    `--weigh`); with `shrink_s`, each UNDER or OVER found shrunk (smaller) while it holds, for that many seconds."""

    def __init__(self, rng: random.Random, slow_s: float = 0.5, instances: int = 6, walks: int = 4,
                 shrink_s: float = 0.0) -> None:
        self.tokenizer = load_tokenizer(make_checkpoint())
        self.grammars = grammar.Grammars(self.tokenizer, TokenBytes(self.tokenizer), VOCAB_SIZE, EOS_IDS)
        self.chars = {ch: ids[0] for ch in map(chr, range(32, 127)) if len(ids := self.tokenizer.encode(ch)) == 1}
        self.rng, self.slow_s, self.instances, self.walks, self.shrink_s = rng, slow_s, instances, walks, shrink_s
        self.under: list[str] = []  # served, llguidance's row past its limit
        self.over: list[str] = []  # refused for its row, llguidance held every instance and walk within MAX_ROW
        self.slow: list[str] = []
        self.slow_schemas: list[dict[str, Any]] = []
        self.counts = {"served": 0, "refused": 0, "refused otherwise": 0, "refused, held in the margin": 0,
                       "refused, a walk past MAX_ROW": 0, "served, a walk past MAX_ROW": 0, "instances rejected": 0}
        self.most_s = 0.0

    def row_failure(self, text: str, instance: Any, items: int) -> int | None:
        """The row llguidance held past `items` (max_items_in_row) following `instance`; None where it followed it,
        -1 where the instance left the grammar for another reason (Witnesses' miss: the first few printed)."""
        limits = llguidance.LLParserLimits(initial_lexer_fuel=grammar.LIMITS.initial_lexer_fuel,
                                           step_lexer_fuel=grammar.LIMITS.step_lexer_fuel, max_items_in_row=items)
        matcher = llguidance.LLMatcher(self.grammars._tokenizer, text, log_level=0, limits=limits)
        for token in self.tokenizer.encode(json.dumps(instance)):
            matcher.compute_bitmask()
            if matcher.is_error() or not matcher.consume_token(token):
                break
        if not matcher.is_error() and not matcher.get_error():
            return None
        if found := LIMIT_ERROR.search(matcher.get_error()):
            return int(found.group(1))
        self.counts["instances rejected"] += 1
        if self.counts["instances rejected"] <= 3:
            print("REJECTED", json.dumps(instance)[:300], matcher.get_error()[:200], flush=True)
        return -1

    def held_past(self, text: str, instance: Any, items: int) -> bool:
        """Whether llguidance failed `instance` for a row past `items` (not for another reason)."""
        failure = self.row_failure(text, instance, items)
        return failure is not None and failure > 0

    def largest_row(self, text: str, instances: list[Any]) -> int:
        """The largest row llguidance held following `instances` (bisecting max_items_in_row)."""
        low, high = 1, grammar.ROW_ITEMS  # a failure at low, none at high
        while high - low > 1:
            middle = (low + high) // 2
            if any(self.held_past(text, instance, middle) for instance in instances):
                low = middle
            else:
                high = middle
        return high

    def steered(self, schema: dict[str, Any], text: str, rng: random.Random) -> tuple[int, str]:
        """The largest row `walks` Steered walks read, and the text of the walk that read it."""
        walker = Steered(self.grammars, self.tokenizer, self.chars, text, schema_keys(schema), rng)
        return max((walker.walk() for _ in range(self.walks)), key=lambda found: found[0])

    def weight(self, schema: dict[str, Any]) -> int | str:
        """check_json_schema's weight, or its refusal's message."""
        try:
            return grammar.check_json_schema(schema, True, "response_format")
        except InvalidRequest as exc:
            return exc.args[0]

    def flag(self, schema: dict[str, Any]) -> str | None:
        """UNDER (served, a walk's row past ROW_ITEMS) or OVER (refused for its row, every walk's within MAX_ROW)
        where `schema` is one (the shrinker's test: its walks seeded alike), else None."""
        weight = self.weight(schema)
        text = grammar._json_grammar(schema, True, "p")
        if refused_otherwise(weight, text):
            return None
        row, _ = self.steered(schema, text, random.Random(0))
        if isinstance(weight, int):
            return "UNDER" if row > grammar.ROW_ITEMS else None
        return "OVER" if 0 <= row <= grammar.MAX_ROW else None

    def schema(self, schema: dict[str, Any]) -> None:
        started = time.process_time()
        weight = self.weight(schema)
        spent = time.process_time() - started
        self.most_s = max(self.most_s, spent)
        shown = json.dumps(schema)
        if spent > self.slow_s:
            started = time.process_time()
            with contextlib.suppress(HopCycle):  # timed up to a cycle of bare `$ref`s (as sent: refused)
                grammar_rows.schema_weight(schema)
            self.slow_schemas.append(schema)
            self.found("SLOW", f"{spent:.2f} s CPU, schema_weight's {time.process_time() - started:.2f} s "
                               f"({len(shown)} chars): {shown[:300]}")
        text = grammar._json_grammar(schema, True, "p")
        if refused_otherwise(weight, text):
            self.counts["refused otherwise"] += 1  # llguidance's own refusal (oneOf's options may overlap), ManyOptions
            return
        witnesses = Witnesses(self.rng, schema.get("$defs", {}))
        instances = [witnesses.of(schema) for _ in range(self.instances * (1 if isinstance(weight, int) else 5))]
        failures = [self.row_failure(text, instance, grammar.ROW_ITEMS) for instance in instances]
        held = [instance for instance, failure in zip(instances, failures) if failure is None]
        rows = [failure for failure in failures if failure and failure > 0]
        if isinstance(weight, int):
            walked, typed = self.steered(schema, text, self.rng)
            self.counts["served"] += 1
            self.counts["served, a walk past MAX_ROW"] += grammar.MAX_ROW < walked <= grammar.ROW_ITEMS
            if rows or walked > grammar.ROW_ITEMS:
                self.found("UNDER", f"weight {weight}, llguidance's row {max([walked, *rows])} (walk {typed!r})",
                           schema)
            return
        self.counts["refused"] += 1
        if rows or not held:
            return
        largest = self.largest_row(text, held)
        if largest > grammar.MAX_ROW:  # held within the bound's own margin
            self.counts["refused, held in the margin"] += 1
        elif (walk := self.steered(schema, text, self.rng))[0] > grammar.MAX_ROW:  # the instances' miss
            self.counts["refused, a walk past MAX_ROW"] += 1
            print(f"WITNESS MISS {weight.split(',')[0]}; instances' largest row {largest}, a walk's {walk[0]} "
                  f"({walk[1]!r})", flush=True)
        else:
            self.found("OVER", f"{weight.split(',')[0]}; llguidance's largest row {largest}, a walk's {walk[0]} "
                               f"({walk[1]!r})", schema)

    def found(self, label: str, line: str, schema: dict[str, Any] | None = None) -> None:
        {"UNDER": self.under, "OVER": self.over, "SLOW": self.slow}[label].append(line)
        print(label, line if schema is None else f"{line}: {json.dumps(schema)[:2000]}", flush=True)
        if schema is not None and self.shrink_s:
            small = shrunk(schema, lambda cut: self.flag(cut) == label, self.shrink_s)
            walked = self.steered(small, grammar._json_grammar(small, True, "p"), random.Random(0))
            print(f"{label} SHRUNK weight {self.weight(small)!r}, walks' row {walked}: {json.dumps(small)}", flush=True)

    def weights(self, count: int) -> None:
        """`count` schemas' weights or refusals, printed (main's `--weights`)."""
        for _ in range(count):
            print("WEIGHT", self.weight(Weighed(self.rng).schema()), flush=True)

    def run(self, count: int) -> None:
        for _ in range(count):
            self.schema(Weighed(self.rng).schema())
        print(f"== {count} schemas: {self.counts}; {len(self.under)} under-weighed, {len(self.over)} over-weighed, "
              f"{len(self.slow)} slow (most {self.most_s:.3f} s CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemas", type=int, default=60)
    parser.add_argument("--regexes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-ms", type=float, default=50)
    parser.add_argument("--weigh", type=int, default=0, help="weigh this many schemas against llguidance instead")
    parser.add_argument("--slow-s", type=float, default=0.5)
    parser.add_argument("--walks", type=int, default=4, help="steered walks a weighed schema")
    parser.add_argument("--shrink-s", type=float, default=0.0, help="seconds to shrink each UNDER or OVER found")
    parser.add_argument("--write-slow", type=Path, help="write each SLOW schema into this directory")
    parser.add_argument("--weights", action="store_true", help="with --weigh: print each weight, follow nothing")
    args = parser.parse_args()
    if args.weigh:
        weighing = Weighing(random.Random(args.seed), args.slow_s, walks=args.walks, shrink_s=args.shrink_s)
        if args.weights:
            weighing.weights(args.weigh)
            return
        weighing.run(args.weigh)
        if args.write_slow:
            args.write_slow.mkdir(parents=True, exist_ok=True)
            for i, schema in enumerate(weighing.slow_schemas):
                (args.write_slow / f"slow-{args.seed}-{i}.json").write_text(json.dumps(schema))
        sys.exit(1 if weighing.under or weighing.over or weighing.slow else 0)
    log = Path(tempfile.mkdtemp(prefix="fuzz-schemas-")) / "server.log"
    with GunicornServer(cpu_env(make_checkpoint(), NANOQWEN_MAX_BATCH="8"), log) as srv:
        fuzz = Fuzz(srv, random.Random(args.seed))
        with health_polled(srv, 0.01) as polls:
            fuzz.bounds()
            fuzz.schemas(args.schemas)
            fuzz.regexes(args.regexes)
        held = max(p.held for p in polls)
        print(f"/health: {len(polls)} polls, held at most {held * 1000:.0f} ms; longest {most_held(polls)}")
        fuzz.check(held * 1000 <= args.held_ms, f"/health held {held * 1000:.0f} ms")
    print(f"== {fuzz.passed} passed, {len(fuzz.failures)} failed, {fuzz.cut} answers cut by max_tokens, "
          f"{len(fuzz.mid_answer)} requests whose grammar failed mid-answer, {fuzz.optional_counted} schemas refused "
          f"for minProperties beside optional properties; log: {log}")
    sys.exit(1 if fuzz.failures else 0)


if __name__ == "__main__":
    main()
