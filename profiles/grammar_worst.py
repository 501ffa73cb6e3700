"""The worst grammars each structured-output bound allows, sent to a real `gunicorn -k gevent server:app` (the tiny test
checkpoint, CPU, fp32) as vLLM's `guided_grammar` / `guided_json`: Lark and JSON Schema shapes without consts that
reach llguidance's u16 symbol count, nest past its parser, repeat nullable pieces, or fill the 8 MiB body. Each must be
a 400 naming the field, a 413, or a 200 whose answer follows the grammar; never a 5xx, a lost worker or /health held
past HELD_S. A case expected to fail mid-answer (MIDWAY: ambiguous repeats, whose row grows with the answer) must end
its stream in an OpenAI-style error event naming the field, then `[DONE]`. Prints one line a case (status, seconds,
/health's most held, the error); exit status 0 only when every case is as expected.

    python profiles/grammar_worst.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import MODEL, cpu_env, health_polled, most_held  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from server_process import GunicornServer  # noqa: E402

HELD_S = 1.0  # the brief's bound on a /health answer held by the worker's own work
BODY_BYTES = 8 << 20  # api/config's max_body_bytes: each body is sized just under it
MIDWAY = "fails mid-answer"  # a case's expectation: a 200 stream whose last event is the grammar's error


def _fill(unit: str, head: str = "start: ", tail: str = "") -> str:
    """`head` then `unit` repeated as often as the body allows (its JSON escapes counted), then `tail`."""
    encoded = len(json.dumps(unit)) - 2
    return head + unit * ((BODY_BYTES - 4096 - len(head) - len(tail)) // encoded) + tail


def _object(k: int, base: int) -> dict[str, Any]:
    names = [f"p{base}_{j}" for j in range(k)]
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}, "required": names,
            "additionalProperties": False}


# (name, the request's grammar field and value); a name ending in MIDWAY is expected to fail mid-answer
CASES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("11,000 rules of three alternatives (u16 symbols)", lambda: {"guided_grammar": "start: " + " ".join(
        f"r{i}" for i in range(11_000)) + "\n" + "\n".join(f'r{i}: "a" | "b" "c" | ("d" "e")' for i in range(11_000))}),
    ("11,000 rules of short sequences (u16 symbols)", lambda: {"guided_grammar": "start: " + " ".join(
        f"r{i}" for i in range(11_000)) + "\n" + "\n".join(f'r{i}: "a" "b" ("c" "d") ("e" | "f")'
                                                          for i in range(11_000))}),
    ('32,000 `"a"*` in a row', lambda: {"guided_grammar": "start: " + " ".join(['"a"*'] * 32_000) + ' "z"'}),
    (f'300 `"a"*` in a row (ambiguous: ~7 items a piece a token, the row past 2,000 at the first): {MIDWAY}',
     lambda: {"guided_grammar": "start: " + " ".join(['"a"*'] * 300) + ' "z"'}),
    ("groups nested 4 M deep (8 MB)", lambda: {"guided_grammar": _fill("[", tail='"a"')}),
    ("alternatives nested (8 MB)", lambda: {"guided_grammar": _fill('("b" | ')}),
    ("flat groups of alternatives (8 MB)", lambda: {"guided_grammar": _fill('("a"|"b") ')}),
    ("one literal repeated (8 MB)", lambda: {"guided_grammar": _fill('"a" ')}),
    ("5,000 required properties", lambda: {"guided_json": _object(5_000, 0)}),
    ("1,000 $refs to 4-property objects", lambda: {"guided_json": {
        "$defs": {f"d{i}": _object(4, i) for i in range(1_000)}, "type": "object",
        "properties": {f"r{i}": {"$ref": f"#/$defs/d{i}"} for i in range(1_000)},
        "required": [f"r{i}" for i in range(1_000)]}}),
    ("an array of exactly 20,000 items", lambda: {"guided_json": {
        "type": "array", "items": {"type": "integer"}, "minItems": 20_000, "maxItems": 20_000}}),
]


def run(srv: GunicornServer, name: str, extra: dict[str, Any]) -> bool:
    """One case's line; whether it passed."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 8, "temperature": 0, "stream": True, **extra}
    started = time.monotonic()
    with health_polled(srv, interval=0.02) as polls:
        answer = requests.post(f"{srv.url}/v1/completions", json=body, timeout=600)
        text = answer.text
    seconds, held = time.monotonic() - started, max((p.held for p in polls), default=0.0)
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    failed_midway = answer.status_code == 200 and '"error"' in text
    if failed_midway:
        error = json.loads(events[-2])["error"] if events[-1:] == ["[DONE]"] and len(events) > 1 else {}
    else:
        error = answer.json()["error"] if answer.status_code != 200 else {}
    well_formed = bool(error.get("param")) and error.get("type") == "invalid_request_error"
    if name.endswith(MIDWAY):
        expected = failed_midway and well_formed
    else:
        expected = not failed_midway and (answer.status_code in (200, 413) or bool(error.get("param")))
    passed = answer.status_code < 500 and held < HELD_S and expected
    print(f"{'ok  ' if passed else 'FAIL'} {name}: "
          f"{answer.status_code} in {seconds:.1f} s, /health held {most_held(polls)[-1:]}, "
          f"{len(json.dumps(body)) / 1e6:.2f} MB; {error.get('param')} {str(error.get('message', ''))[:120]!r}"
          + (" (the stream ended in an error event)" if failed_midway else ""), flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="cases whose name holds one of these")
    args = parser.parse_args()
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="1024")
    with GunicornServer(env, Path(tempfile.mkdtemp()) / "gunicorn.log") as srv:
        (before,) = requests.get(f"{srv.url}/stats", timeout=30).json()["workers"]
        passed = [run(srv, name, make()) for name, make in CASES
                  if args.only is None or any(word in name for word in args.only)]
        (after,) = requests.get(f"{srv.url}/stats", timeout=30).json()["workers"]
    print(f"{sum(passed)} of {len(passed)} cases passed; worker pid {before['pid']} -> {after['pid']}")
    return 0 if all(passed) and before["pid"] == after["pid"] else 1


if __name__ == "__main__":
    sys.exit(main())
