"""What a cached grammar's lexer grows as its copies consume tokens (its wear), per grammar shape, in-process.

    python profiles/lexer_wear.py [--tokens 4000] [--answer 400] [--every 1000] [--seed 0] [--states N] [--shapes ...]
    python profiles/lexer_wear.py --flood K [--budget BYTES] [--tokens 4000]

One `Grammars` over the test checkpoints' tokenizer (Qwen3's real vocabulary), each shape compiled once (what the cache
charges), then copies of it (RowGrammar's `grammar.matcher()`) each stepping up to `--answer` tokens, every token drawn
uniformly from the mask (the widest walk of the lexer; a model's sampling is narrower), until `--tokens` in all or the
lexer errs (`--states`: llguidance's max_lexer_states for the run, else LIMITS'). Prints, every `--every` tokens,
what malloc has handed out since the compile, in bytes per token consumed, and the largest such rate of any window.
`--flood`: K distinct growing grammars through one cache (flood's doc).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llguidance
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from checkpoints import EOS_IDS, VOCAB_SIZE, make_checkpoint  # noqa: E402
from nanoqwen.engine import grammar as grammar_module  # noqa: E402
from nanoqwen.engine.grammar import Grammar, Grammars, RowGrammar  # noqa: E402
from nanoqwen.engine.grammar_cache import heap_used  # noqa: E402
from nanoqwen.loader import load_tokenizer  # noqa: E402
from nanoqwen.settings import GRAMMAR_CACHE_BYTES  # noqa: E402
from nanoqwen.text import TokenBytes  # noqa: E402

SHAPES: dict[str, tuple[str, str]] = {  # name: (llguidance kind, text)
    "regex-branching": ("regex", "[ab]*a[ab]{20}"),
    "regex-letters": ("regex", "[a-z]*a[a-z]{20}"),
    "regex-ascii": ("regex", "[ -~]*a[ -~]{16}"),
    "regex-words": ("regex", "([a-z]+ )*x[a-z ]{14}"),
    "json-string": ("json_schema", '{"type": "string"}'),
    "json-object": ("json_schema", '{"type": "object", "properties": {"a": {"type": "string", "pattern": '
                                   '"^[a-z]*q[a-z]{10}$"}, "b": {"type": "array", "items": {"type": "number"}}}, '
                                   '"required": ["a", "b"], "additionalProperties": false}'),
    "lark": ("grammar", 'start: item+\nitem: WORD " " | NUM ","\nWORD: /[a-z]*k[a-z]{8}/\nNUM: /[0-9]+(\\.[0-9]+)?/'),
}


def wear(grammars: Grammars, grammar: Grammar, tokens: int, answer: int, every: int,
         rng: np.random.Generator) -> list[tuple[int, int]]:
    """(tokens consumed, heap bytes grown since the compile) every `every` tokens; stops where the lexer errs. Each
    answer a RowGrammar, its tokens fed as the engine thread feeds them (sync: the grammar's wear counted)."""
    start, done, seen = heap_used() or 0, 0, []
    words = np.zeros((grammars.vocab_size + 31) // 32, dtype=np.int32)
    while done < tokens:
        row = RowGrammar.of(grammar, None, grammars.eos_ids)
        matcher, output = row.matcher, []
        for _ in range(answer):
            row.sync(output, 0)
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if matcher.is_error():
                grown = (heap_used() or 0) - start
                print(f"    lexer error after {done} tokens, +{grown / 1e6:.2f} MB: {matcher.get_error()[:80]}")
                return seen
            allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
            allowed = allowed[~np.isin(allowed, grammars.eos_ids)]
            if not len(allowed) or matcher.is_stopped():
                break
            output.append(int(rng.choice(allowed)))
            done += 1
            if done % every == 0:
                seen.append((done, (heap_used() or 0) - start))
    return seen


def flood(grammars: Grammars, args: argparse.Namespace) -> None:
    """`--flood` distinct branching regexes one after another, each compiled (cached) then worn by `--tokens` in
    answers of `--answer`, as requests that end (their copies let go of): what malloc holds since the start against
    the cache's budget and its bytes (each weighed at the next one's lookup)."""
    start = heap_used() or 0
    for i in range(args.flood):
        grammar = grammars.from_text("regex", f"c{i}[ab]*a[ab]{{20}}", "profile")
        wear(grammars, grammar, args.tokens, args.answer, args.tokens, np.random.default_rng(args.seed + i))
        del grammar
        cached, held = grammars.cache_stats()
        print(f"{i + 1:4d} grammars  heap +{((heap_used() or 0) - start) / 1e6:7.1f} MB  cached {cached:3d} holding "
              f"{held / 1e6:7.1f} MB (budget {args.budget / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--answer", type=int, default=400)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--states", type=int, default=None)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--flood", type=int, default=0, help="distinct `c{i}[ab]*a[ab]{20}` regexes, each worn")
    parser.add_argument("--budget", type=int, default=GRAMMAR_CACHE_BYTES, help="the cache's bytes")
    args = parser.parse_args()
    if args.states is not None:
        limits = grammar_module.LIMITS
        grammar_module.LIMITS = llguidance.LLParserLimits(
            initial_lexer_fuel=limits.initial_lexer_fuel, step_lexer_fuel=limits.step_lexer_fuel,
            verbose_errors=False, max_lexer_states=args.states)
    tokenizer = load_tokenizer(make_checkpoint())
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS, cache_bytes=args.budget)
    if args.flood:
        flood(grammars, args)
        return
    for name in args.shapes.split(","):
        kind, text = SHAPES[name]
        grammar = grammars.json_schema(json.loads(text), True, "profile") if kind == "json_schema" else \
            grammars.from_text(kind, text, "profile")
        print(f"{name}: charged {grammar.size / 1e6:.2f} MB at its compile")
        seen = wear(grammars, grammar, args.tokens, args.answer, args.every, np.random.default_rng(args.seed))
        last = (0, 0)
        top = 0.0
        for done, grown in seen:
            rate = (grown - last[1]) / (done - last[0])
            top = max(top, rate)
            print(f"    {done:6d} tokens  +{grown / 1e6:7.2f} MB  {grown / done:8.0f} B/token  window {rate:8.0f}")
            last = (done, grown)
        print(f"    largest window rate {top:.0f} B/token")


if __name__ == "__main__":
    main()
