"""Structured outputs fuzzed through a real `gunicorn -k gevent server:app` (tiny checkpoint, CPU, fp32, sampled so
that answers wander): seeded random JSON Schemas within what README says the engine enforces (`strict: true`), each
answer that ended (`finish_reason: "stop"`) validated by the `jsonschema` package; a keyword the engine cannot enforce
put somewhere in one, a 400 naming it; random vLLM regexes (`structured_outputs.regex`), each ended answer matched by
Python's `re` (README: Unicode classes, as `re`); grammars past the bounds (MAX_ROW, MAX_PATTERN_CHARS, MAX_GBNF_CHARS,
a regex past the lexer's fuel) a 400 naming the field, and near them served. /health polled every 10 ms throughout
(chat_http.health_polled): the longest hold less the load printed, and a failure past `--held-ms`. Exit 1 on any
failure.

python profiles/fuzz_schemas.py [--schemas 60] [--regexes 30] [--seed 0] [--held-ms 50]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import jsonschema
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from chat_http import MODEL, cpu_env, health_polled, most_held  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from checks import Checks  # noqa: E402
from nanoqwen.engine import grammar  # noqa: E402
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
    rng.choice(schema_objects(schema))[keyword] = UNENFORCED[keyword]
    return schema


def schema_objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
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
               for node in schema_objects(schema))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemas", type=int, default=60)
    parser.add_argument("--regexes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-ms", type=float, default=50)
    args = parser.parse_args()
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
