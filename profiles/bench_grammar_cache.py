"""What a cached grammar costs a request: `Grammars.from_text` on a GBNF grammar already compiled (a cache hit),
and `Grammars.json_schema` on a schema already compiled, on the tiny test checkpoint's tokenizer.

    python profiles/bench_grammar_cache.py [--repeats 2000]

Prints the median microseconds per call of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from checkpoints import EOS_IDS, VOCAB_SIZE, make_checkpoint  # noqa: E402
from nanoqwen.engine.grammar import Grammars  # noqa: E402
from nanoqwen.loader import load_tokenizer  # noqa: E402
from nanoqwen.text import TokenBytes  # noqa: E402

# a GBNF grammar of the size a client sends: a small JSON-like record
GBNF = "\n".join(['root ::= "{" pair ("," pair)* "}"', 'pair ::= key ":" value',
                  'key ::= "\\"" [a-z]+ "\\""', 'value ::= number | string | "true" | "false" | "null"',
                  'number ::= "-"? [0-9]+ ("." [0-9]+)?', 'string ::= "\\"" [a-zA-Z0-9 ]* "\\""'] +
                 [f'rule{i} ::= "word{i}" | "other{i}" rule{i + 1}?' for i in range(40)] + ['rule40 ::= "end"'])
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}


def median_us(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    fn(*args)  # compiles: the calls timed are cache hits
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    tokenizer = load_tokenizer(make_checkpoint())
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)
    print(f"GBNF cache hit: {median_us(grammars.from_text, 'grammar', GBNF, 'g', repeats=args.repeats):.1f} us")
    print(f"JSON schema cache hit: {median_us(grammars.json_schema, SCHEMA, True, 's', repeats=args.repeats):.1f} us")


if __name__ == "__main__":
    main()
