"""The compiled-grammar cache bounded by the bytes its grammars hold, not only by their count: each grammar charged
what malloc handed out across its compile and first mask (a 10-character regex may hold 11 MB), the oldest dropped,
in the engine and through a served worker's /stats."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from chat_http import MODEL, cpu_env, server_stats
from checkpoints import EOS_IDS, VOCAB_SIZE
from nanoqwen.engine import grammar as grammar_module
from nanoqwen.engine.grammar import LEXER_BYTES, WEAR_BYTES, Grammars, RowGrammar
from nanoqwen.engine.grammar_cache import WORN_SHARE, GrammarCache, heap_used
from nanoqwen.loader import load_tokenizer
from nanoqwen.text import TokenBytes
from server_process import GunicornServer

BUDGET = 24 << 20
BIG = 8 << 20  # the least a `b{i}a{30000}` regex holds once its first mask has built its lexer (~11 MB)


def big_regex(i: int) -> str:
    return f"b{i}a{{30000}}"


@dataclass
class Sized:
    compiled: int
    worn: int = 0  # what its requests' wear adds

    @property
    def size(self) -> int:
        return self.compiled + self.worn


def test_cache_drops_the_oldest_past_its_bytes_and_counts_a_shared_grammar_once() -> None:
    cache: GrammarCache[str, Sized] = GrammarCache(max_entries=8, max_bytes=25)
    a, b, c = Sized(10), Sized(10), Sized(10)
    cache.put("a", a)
    cache.put("b", b)
    cache.put("b again", b)  # what another request sent for the same grammar
    assert cache.bytes == 20 and list(cache.entries) == ["a", "b", "b again"]
    assert cache.put("a", a) == [] and cache.released == 0  # kept again (two compiles of one): nothing let go of
    assert cache.get("a") is a  # now the most recently used
    cache.put("c", c)
    assert list(cache.entries) == ["a", "c"] and cache.bytes == 20  # b's keys went, then its bytes
    huge = Sized(100)
    cache.put("huge", huge)  # past the budget alone: kept alone, to serve its request sent again
    assert list(cache.entries) == ["huge"] and cache.bytes == 100
    assert cache.put("a", a) == [huge]  # what went, for the caller to let go of after its lock
    assert list(cache.entries) == ["a"] and cache.bytes == 10
    assert cache.released == 10 + 10 + 10 + 100 and cache.grammars == 1  # b once (both its keys gone), a, c, huge


def test_cache_weighs_its_grammars_anew_as_they_grow() -> None:
    """A grammar's size grows after it is kept (its requests wear its lexer): each lookup and keep counts it anew, drops
    the oldest past the budget, and a grammar let go of takes with it the bytes it was counted for."""
    cache: GrammarCache[str, Sized] = GrammarCache(max_entries=8, max_bytes=100)
    a, b = Sized(10), Sized(10)
    cache.put("a", a)
    cache.put("b", b)
    cache.put("b again", b)
    b.worn = 20
    assert cache.reweigh() == [] and cache.bytes == 40
    a.worn = 80
    assert cache.reweigh(drop=False) == [] and cache.bytes == 65  # /stats' weighing: it drops none
    a.worn, b.worn = 80 + 100, 100
    assert cache.reweigh(drop=False) == [] and cache.bytes == 35 + 35  # wear counted up to 100 // WORN_SHARE
    cache.max_bytes = 30
    assert cache.reweigh() == [a] and cache.bytes == 10 + 30 // WORN_SHARE
    assert cache.released == 10  # what its compile took: its wear's charge is an estimate, never on the heap
    assert cache.put("c", Sized(40)) == [b, b] and cache.bytes == 40 and cache.released == 10 + 10  # both its keys


def test_a_grammar_s_wear_is_charged_and_drops_it(tiny_checkpoint: Path) -> None:
    """The tokens its requests' matchers consumed are charged WEAR_BYTES each (what its shared lexer may have grown,
    measured: profiles/lexer_wear.py), up to LEXER_BYTES, seen by /stats' weighing and by the next lookup's eviction."""
    tokenizer: PreTrainedTokenizerFast = load_tokenizer(tiny_checkpoint)
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS, cache_bytes=1 << 20)
    worn = grammars.from_text("regex", "[ab]*a[ab]{20}", "structured_outputs.regex")
    other = grammars.from_text("regex", "c+", "structured_outputs.regex")
    compiled = worn.size + other.size
    assert grammars.cache_stats() == (2, compiled)
    row = RowGrammar.of(worn, None, EOS_IDS)
    a = tokenizer.convert_tokens_to_ids("a")
    row.sync([7, a, a, a], num_prompt_tokens=1)  # the engine thread's step: the tokens sampled since the last
    assert worn.wear == 3 and grammars.cache_stats() == (2, compiled + 3 * WEAR_BYTES)
    row.sync([7, a, a, a] + [a] * 60, num_prompt_tokens=1)
    assert worn.size == worn.compiled + 63 * WEAR_BYTES
    assert grammars.cache_stats() == (2, compiled + (1 << 20) // WORN_SHARE)  # its wear counted up to a share
    grammars._cache.max_bytes = compiled  # what they took to compile: the worn one is now past it
    assert grammars.cached(("regex", "c+")) is other  # its lookup weighed the worn one past the budget: it went
    assert grammars.cache_stats() == (1, other.size)
    worn.wear = 10**9
    assert worn.size == worn.compiled + LEXER_BYTES  # no more than llguidance's max_lexer_states holds


def test_a_compile_beside_an_eviction_is_charged_its_own_growth(tiny_checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """malloc's count is the process's: where the other compiling thread's grammar evicts one while this compile
    runs, the heap shrinks by the evicted grammar's bytes meanwhile, and an 11 MB grammar was charged 0 (8 of 48 in a
    two-thread flood). The bytes the cache let go of are added back, what their compiles took (a worn one's wear is an
    estimate, not on the heap: a compile beside its eviction was charged 150 MB); and they are freed after the lock."""
    tokenizer: PreTrainedTokenizerFast = load_tokenizer(tiny_checkpoint)
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS, cache_bytes=10 << 20)
    freed_in_lock: list[bool] = []

    class Evicted(Sized):
        def __del__(self) -> None:
            freed_in_lock.append(grammars._lock.locked())

    grammars.keep(("old",), Evicted(8 << 20, worn=100 << 20))
    before = 100 << 20
    readings = iter([before, None])

    def heap_used() -> int:  # after: the other thread's grammar kept (evicting the old one), then this compile's 1 MB
        if next(readings) is None:
            grammars.keep(("other",), Sized(3 << 20))
            return before - (8 << 20) + (1 << 20)
        return before

    monkeypatch.setattr(grammar_module, "heap_used", heap_used)
    made = grammars.from_text("regex", "a", "structured_outputs.regex")
    assert made.size == (1 << 20) + len(made.text)
    assert freed_in_lock == [False]
    assert grammars.cache_stats() == (2, (3 << 20) + made.size)


@pytest.mark.skipif(heap_used() is None, reason="malloc's count (glibc's mallinfo2) is what the cache measures")
def test_grammars_charged_what_they_hold_and_kept_within_the_budget(tiny_checkpoint: Path) -> None:
    tokenizer: PreTrainedTokenizerFast = load_tokenizer(tiny_checkpoint)
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS, cache_bytes=BUDGET)
    made = [grammars.from_text("regex", big_regex(i), "structured_outputs.regex") for i in range(3)]
    assert all(grammar.size > BIG for grammar in made)
    cached, held = grammars.cache_stats()
    assert cached == 2 and held == made[1].size + made[2].size <= BUDGET
    assert grammars.cached(("regex", big_regex(0))) is None  # the oldest went
    assert grammars.cached(("regex", big_regex(2))) is made[2]
    small = grammars.json_schema({"type": "object"}, strict=False, param="response_format")
    assert 0 < small.size < 1 << 20


@pytest.mark.skipif(heap_used() is None, reason="malloc's count (glibc's mallinfo2) is what the cache measures")
def test_served_worker_keeps_its_grammars_within_the_budget(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Through gunicorn and the openai client: distinct regexes of ~11 MB each, 4 of them past the 24 MiB set; the
    worker's /stats reports the cache's bytes within it (profiles/grammar_cache_flood.py watches its RSS), a grammar's
    wear included."""
    env = cpu_env(tiny_checkpoint, NANOQWEN_GRAMMAR_CACHE_MEMORY=str(BUDGET))
    with GunicornServer(env, tmp_path / "gunicorn.log") as srv:
        client = srv.openai_client()

        def constrained(regex: str) -> None:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                           extra_body={"structured_outputs": {"regex": regex}})

        constrained("a+")
        worker = server_stats(srv)["workers"][0]
        assert worker["grammar_cache_bytes"] < 1 << 20
        # an answer's tokens wear its grammar's lexer (WEAR_BYTES each, all but the last fed to its matcher)
        client.completions.create(model=MODEL, prompt="hi", max_tokens=61,
                                  extra_body={"structured_outputs": {"regex": "[ab]{2000}"}})
        worn = server_stats(srv)["grammar_cache_bytes"] - worker["grammar_cache_bytes"]
        assert 60 * WEAR_BYTES <= worn < 60 * WEAR_BYTES + (1 << 20)
        for i in range(4):
            constrained(big_regex(i))
        stats = server_stats(srv)
        assert stats["grammars_cached"] == 2  # "a+", the worn one and the first two went
        assert BIG * 2 < stats["grammar_cache_bytes"] <= BUDGET
