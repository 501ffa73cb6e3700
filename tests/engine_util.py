"""Drive an Engine synchronously in the test thread (no engine thread): deterministic steps."""
from __future__ import annotations

import functools
import random
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from nanoqwen import loader
from nanoqwen.engine import Engine, EngineConfig, SamplingParams
from nanoqwen.engine.grammar import RowGrammar
from nanoqwen.engine.sequence import Request, Sequence
from nanoqwen.engine.stream import EventStream
from nanoqwen.sampler import compute_mask
from ops.cpu import linear as cpu_linear
from waits import wait_for

# Three prompts of different lengths (one a chat-template prefix): batched, each row decodes at its own
# context length, and where steps pad to buckets (graphs, compile, eager on a GPU) a bucket of 4 has a padded lane.
MIXED_PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1019)), [151644, 872, 198]]
# Tokens generated for MIXED_PROMPTS under Triton's interpreter, whose steps take seconds each: a prefill and 2 decode
# steps. 6 tokens ran 3 more decode steps of the same kernels and crossed no further 16-token KV block boundary.
INTERPRETED_TOKENS = 3
# A request's failure where its grammar's lexer gave out mid-answer (`a{100000}`: LIMITS' fuel), the engine's words
GRAMMAR_FAILED = "the output could not follow the grammar the request asked for: lexer error: too many expressions " \
                 "constructed"


def c_linear_rows(monkeypatch, native_bf16: bool) -> int:
    """Makes the C linears split fp32 rows as a CPU with (or without) native bf16 does, whatever this one has (CI's
    may have it, an AVX2 one has not) -> the most fp32 rows a C linear takes; torch's GEMM, which a CPU graph does
    not record, takes more."""
    monkeypatch.setattr(cpu_linear, "NATIVE_BF16", native_bf16)
    return cpu_linear.NATIVE_BF16_MAX_ROWS[torch.float32] if native_bf16 else cpu_linear.MAX_ROWS


_LOAD_TOKENIZER = loader.load_tokenizer


@functools.lru_cache(maxsize=4)  # ~40 MB each: the few checkpoints a file loads in turn
def _tokenizer(path: Path, files: frozenset[tuple[str, int, int]]):
    return _LOAD_TOKENIZER(path)


def shared_tokenizer(path: Path):
    """loader.load_tokenizer of a checkpoint folder as its files are now, kept for the last four checkpoints a test
    process loaded: ~2 s a load, which every engine the tests load, and every test reading a checkpoint's tokens, paid
    again for the same few checkpoints. For reading only: the engine changes nothing in it, nor may a test."""
    path = Path(path).resolve()
    if not path.is_dir():
        return _LOAD_TOKENIZER(path)
    files = frozenset((f.name, (s := f.stat()).st_mtime_ns, s.st_size) for f in path.iterdir() if f.is_file())
    return _tokenizer(path, files)


@contextmanager
def shared_tokenizers() -> Iterator[None]:
    """Engines loaded meanwhile take their checkpoint's tokenizer from shared_tokenizer. loader.load_tokenizer itself
    runs in every server's load, test_loader's and test_memory's tests, and the first load of each checkpoint here."""
    with mock.patch.object(loader, "load_tokenizer", shared_tokenizer):
        yield


def load_engine(path: Path, **overrides) -> Engine:
    config = dict(model=str(path), device="cpu", dtype="float32", graph="none", kernels="torch", max_batch=8)
    config.update(overrides)
    engine = Engine(EngineConfig(**config))
    with shared_tokenizers():
        engine.load()
    return engine


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: object = None  # request.PromptLogprobs, from the choice's first event


@dataclass
class Result:
    choices: list[Choice]
    usage: object = None
    error: str | None = None
    error_param: str | None = None


def collect(stream: EventStream, n: int = 1) -> Result:
    result = Result([Choice() for _ in range(n)])
    while True:
        try:
            event = stream.get(timeout=0)
        except TimeoutError:  # every event the steps so far produced is in
            break
        if event.error:
            result.error, result.error_param = event.error, event.error_param
        if event.usage:
            result.usage = event.usage
            continue
        choice = result.choices[event.index]
        choice.token_ids += event.token_ids
        choice.text += event.text
        choice.reasoning += event.reasoning
        choice.logprobs += event.logprobs or []
        choice.prompt_logprobs = event.prompt_logprobs or choice.prompt_logprobs
        choice.finish_reason = event.finish_reason or choice.finish_reason
    return result


def engine_step(engine: Engine, n: int = 1) -> None:
    """`n` engine-loop iterations in the calling thread, in inference mode as on the engine thread: each takes in
    submits and aborts, then runs one step."""
    with torch.inference_mode():
        for _ in range(n):
            engine.drain_inbox()
            engine.step()


def run(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        engine_step(engine)
        if not engine.scheduler.has_work:
            return
    raise AssertionError("engine did not finish")


def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[Result]:
    streams = [engine.submit(p, params)[1] for p in prompts]
    run(engine)
    return [collect(s, params.n) for s in streams]


def generate_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Prompt i with params i, all submitted before the engine runs (one batch); each first choice's tokens."""
    streams = [engine.submit(prompt, p)[1] for prompt, p in zip(prompts, params)]
    run(engine)
    return [collect(s).choices[0].token_ids for s in streams]


def sequence(prompt: list[int], request_id: str = "r", params: SamplingParams | None = None,
             max_tokens: int = 1000) -> Sequence:
    """A request's one sequence (choice 0, seed 0), as the engine gives it to the scheduler: no model needed."""
    request = Request(request_id, params or SamplingParams(), EventStream(), len(prompt))
    seq = Sequence(request, 0, list(prompt), seed=0, max_tokens=max_tokens)
    request.sequences.append(seq)
    return seq


def fill_row(row: RowGrammar, bitmask: torch.Tensor, slot: int = 0) -> bool:
    """Bitmask row `slot` gets the tokens `row` allows next, as LogitAdjuster fills a row (fill_start, the matcher's
    mask, fill_end); whether its matcher erred."""
    if row.fill_start(bitmask, slot):
        compute_mask(row.matcher, bitmask, slot)
    return row.fill_end(bitmask, slot)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


# model -> {(prompt, dtype, device): the longest greedy run generated for it so far}; weak: a freed model's runs go
# with it
_GREEDY_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads `count` meanwhile (an engine's load sets the process's to its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hf_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy tokens after `prompt`, exactly `max_tokens` of them: as the engine's `ignore_eos`, EOS
    may be chosen and does not stop it (`eos_token_id=None`: neither a stop nor min_new_tokens' ban on it).
    Generated once per model, dtype, device and prompt: a shorter run is the start of a longer one, and the suite
    asks for the same references in many tests and files. On one thread: a token's few small ops spent ~4x the CPU on
    two where both cores were busy (the suite's two processes), waiting for each other's thread."""
    runs = _GREEDY_RUNS.setdefault(hf_model, {})
    key = (tuple(prompt), hf_model.dtype, hf_model.device)
    if len(runs.get(key, ())) < max_tokens:
        with torch_threads(1):
            out = hf_model.generate(
                torch.tensor([prompt], device=hf_model.device), max_new_tokens=max_tokens, eos_token_id=None,
                do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=hf_model.device),
            )
        runs[key] = out[0, len(prompt):].tolist()
    return runs.get(key, [])[:max_tokens]


def started_engine(checkpoint: Path, **overrides: object) -> Engine:
    """An engine on its own thread, as the server runs it (fp32 on the CPU, plus `overrides`), once its model is
    loaded."""
    engine = Engine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", **overrides))
    with shared_tokenizers():
        engine.start()

        def loaded() -> bool:
            assert engine.load_error is None, engine.load_error
            return engine.ready

        wait_for(loaded, 60, 0.01, "the engine to load")
    return engine


def odd_text(rng: random.Random, parts: int) -> str:
    """Words, spaces, newlines, contractions, digits, punctuation, combining marks, emoji and added tokens at random:
    a text to tokenise in pieces (nanoqwen/engine/pieces.py) as the whole."""
    choices = ["a", "Ab", " ", "  ", "\n", "\r\n", " x", "x ", "'s", "'LL", "7", "12", "!", " .", "é", "e\u0301",
               "\u0301", "\u4e2d\u6587", "\U0001f642", "\t", "<|im_start|>", "<|im_end|>", "<think>", " 'd", "\u5b57",
               "\u30a2", "\ud55c", "\uff0c", "\u3002", "\uff01\uff1f", " \u3001", "4"]
    return "".join(rng.choice(choices) for _ in range(parts))
