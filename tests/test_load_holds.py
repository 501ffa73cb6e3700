"""What holds the GIL while the model loads, and so the event loop's /health "loading" answers: C calls that do not
release it, and the collector's walks."""
from __future__ import annotations

import gc
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import openai
import pytest

from chat_http import MODEL, cpu_env
from checkpoints import EOS_IDS, VOCAB_SIZE, make_checkpoint
from nanoqwen.engine import grammar
from nanoqwen.loader import load_tokenizer
from nanoqwen.text import TokenBytes
from schema_shapes import ref_chain
from server_process import GunicornServer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CONFIG = Path(__file__).with_name("gunicorn_collections.py")


@dataclass(frozen=True)
class Served:
    log: str  # the worker's, from its start to its stop
    refusal: openai.APIStatusError | None  # the schema's answer where it was not served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A worker that served once its model loaded (tests/gunicorn_collections.py), then weighed a schema (a 3,000-link
    chain of `$ref`'d anyOfs: ~100k objects walked), stopped. Whatever the schema's answer: the tests say which they
    expect."""
    log = tmp_path_factory.mktemp("loading") / "gunicorn.log"
    refusal = None
    with GunicornServer(cpu_env(make_checkpoint()), log, args=["-c", str(CONFIG)]) as srv:
        fmt = {"type": "json_schema", "json_schema": {"name": "chain", "strict": True, "schema": ref_chain(3_000)}}
        try:
            srv.openai_client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=1, response_format=fmt)
        except openai.APIStatusError as error:
            refusal = error
    return Served(srv.log(), refusal)


def test_the_loads_collections_do_not_walk_the_imports(served: Served) -> None:
    """Each full collection while the model loads (one at least: the freeze's at its end) finds the imports' objects
    frozen already: walking them held the GIL for ~130 ms of CPU a time, 4-6 times a load."""
    frozen = [int(n) for n in re.findall(r"^load collection: frozen (\d+)$", served.log, re.MULTILINE)]
    assert frozen and min(frozen) > 100_000, frozen  # torch, gevent, flask, the Hub client: ~220k


def test_no_full_collection_walks_a_schema_being_weighed(served: Served) -> None:
    """A large schema's weighing keeps its copy and memos alive while it allocates millions: each full collection it
    triggered walked them all with the GIL held (10-151 ms of CPU, twice a 264 KB schema, every stream and /health
    waiting: profiles/RESULTS.md, stall42). None starts while a grammar is made (nanoqwen/api/full_collections.py)."""
    # weighed to its end: refused for its parser rows
    assert isinstance(served.refusal, openai.BadRequestError) and "parser row" in served.refusal.message, served.refusal
    assert "grammar young collection" in served.log.splitlines()  # the hook finds a grammar job's frames
    assert re.findall(r"^grammar collection: .*$", served.log, re.MULTILINE) == []


def test_the_worker_serves_before_it_imports_transformers(served: Served) -> None:
    """transformers (~0.3 s of CPU, past what the Hub's client costs) is imported by the thread that loads the model,
    while /health answers "loading", not by the worker before its loop serves."""
    assert "imported transformers: False" in served.log.splitlines()


def _holds(run: Callable[[], object]) -> list[float]:
    """The CPU seconds of this thread's stretches over a millisecond, while `run` runs, in which it called or returned
    from no function, Python's or a builtin (C that no other thread can run beside: none of llguidance's calls release
    the GIL); in their order. Collections are off meanwhile: one's walk of the test process would read as such a
    stretch."""
    holds: list[float] = []
    last = time.thread_time()

    def event(_frame: FrameType, _event: str, _arg: object) -> None:
        nonlocal last
        now = time.thread_time()
        if now - last > 1e-3:
            holds.append(now - last)
        last = now

    gc.disable()
    sys.setprofile(event)
    try:
        run()
    finally:
        sys.setprofile(None)
        gc.enable()
    return holds


@pytest.fixture(scope="module")
def vocabulary() -> tuple[PreTrainedTokenizerFast, TokenBytes]:
    """The Qwen3-sized tokenizer and its bytes table, built once, outside the profiled part: under the profile hook the
    table's ~450k C calls took seconds."""
    tokenizer = load_tokenizer(make_checkpoint())
    return tokenizer, TokenBytes(tokenizer)


def test_the_grammar_tokenizer_is_built_in_two_holds(vocabulary: tuple[PreTrainedTokenizerFast, TokenBytes]) -> None:
    """llguidance's LLTokenizer, built whole, held the GIL through (~0.48 s of CPU for Qwen3's vocabulary) and /health
    waited for all of it; Grammars builds it in two calls (its trie, then its slices), with Python between them, where
    the loop's thread takes the GIL: two stretches of C, each over a quarter of all the build's stretches together
    (built whole: one, 0.51-0.57 s of 0.52-0.59)."""
    holds = _holds(lambda: grammar.Grammars(*vocabulary, VOCAB_SIZE, EOS_IDS))
    assert len([held for held in holds if held > sum(holds) / 4]) == 2, holds


def test_the_grammar_tokenizer_is_built_with_the_model(vocabulary: tuple[PreTrainedTokenizerFast, TokenBytes],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Built at the first grammar request instead, its ~0.5 s of CPU with the GIL would hold the streams being served:
    once Grammars is made, compiling grammars builds no LLTokenizer (a /health bound cannot tell 0.4 s held from
    load)."""
    grammars = grammar.Grammars(*vocabulary, VOCAB_SIZE, EOS_IDS)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("an LLTokenizer built after the load")
    monkeypatch.setattr(grammar.llguidance, "LLTokenizer", refused)
    grammars.from_text("regex", "[ab]+", "p")
    grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}, True, "p")
