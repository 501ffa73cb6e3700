"""The engine: one real OS thread owns the model; any thread or greenlet submits and aborts.

submit() -> an EventStream fed by the engine thread, one Event per choice per step.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import time
import uuid
import weakref
from collections.abc import Callable

import torch

from nanoqwen import loader
from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.grammar import Grammars, RowGrammar
from nanoqwen.engine.loading import load_model
from nanoqwen.engine.ngram import NgramProposer
from nanoqwen.engine.output import first_event, prompt_token_logprobs, released_logprobs, token_event, usage_event
from nanoqwen.engine.pieces import TURN_START, turn_pieces, word_pieces, words_split
from nanoqwen.engine.request import Event, PromptLogprobs, SamplingParams
from nanoqwen.engine.scheduler import Scheduler
from nanoqwen.engine.sequence import Request, Sequence, Status
from nanoqwen.engine.step_counts import StepCounts
from nanoqwen.engine.stream import EventStream
from nanoqwen.engine.threads import NativeEvent, native_lock, start_native_thread
from nanoqwen.engine.validation import (
    InvalidRequest,
    PromptTooLongError,
    check_allowed_token_ids,
    completion_limit,
    validate_request,
)
from nanoqwen.engine.wakeups import HeldWakeups
from nanoqwen.runner import ModelRunner, StepOutput
from nanoqwen.runner.graphs import replay_text
from nanoqwen.sampler import token_bitmask
from nanoqwen.settings import EngineConfig
from nanoqwen.text import TextPipeline

log = logging.getLogger("nanoqwen")


class QueueFullError(RuntimeError):
    pass


class ShuttingDownError(RuntimeError):
    """enqueue's refusal once a fail_all refused later requests (a stopping worker's cut): none would be served."""


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ready = False
        self.load_error: str | None = None
        self._inbox: collections.deque = collections.deque()
        self._wakeup = NativeEvent()
        self._lock = native_lock()
        self._requests: dict[str, Request] = {}
        self._num_queued = 0
        self._allowed: tuple[list[int] | None, torch.Tensor | None] = (None, None)  # see allowed_mask
        self._stopping = False
        self._refusing = False  # every request submitted from now on is refused (fail_all's refuse_later)
        self._started = False
        self._stopped = NativeEvent()
        self._stopped.set()  # until start(): shutdown has no thread to wait for
        self.tokens_generated = 0
        self.requests_finished = 0
        self.spec_drafts = 0  # steps in which a row verified drafts (vLLM's spec_decode_num_drafts)
        self.spec_draft_tokens = 0  # tokens drafted
        self.spec_accepted_tokens = 0  # drafts the sampler agreed with
        self.steps = StepCounts()  # by the tokens they ran
        self.sampling_defaults: dict = {}  # the checkpoint's, for fields a request leaves out
        self.think_ids: tuple[int | None, int | None] = (None, None)  # <think>, </think>, once loaded

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, before_ready: Callable[[], None] | None = None) -> None:
        """Loads the model and serves in the engine thread; `before_ready` runs there once the model is
        loaded, before `ready` lets requests in. Once per engine: a second thread would step the same state."""
        if self._started:
            raise RuntimeError("the engine is already started")
        self._started = True
        self._stopped.clear()
        engine = weakref.ref(self)  # the hook outlives engines (tests make many): it must not keep one alive
        os.register_at_fork(after_in_child=lambda: (e := engine()) is not None and e._lost_in_fork())
        start_native_thread(lambda: self._main(before_ready))

    def _lost_in_fork(self) -> None:
        """A forked child has no engine thread (`gunicorn -k gevent --preload nanoqwen.wsgi:app` without
        nanoqwen's worker): /health and every request say so rather than wait for a model forever."""
        self.ready = False
        self.load_error = ("the engine was started before this process forked (gunicorn --preload without "
                           "nanoqwen's worker): serve with `nanoqwen serve` or -k nanoqwen.worker.NanoqwenWorker")
        self._lock = native_lock()  # the parent's engine thread may have held it at the fork
        self._stopped.set()

    def load(self, before_ready: Callable[[], None] | None = None) -> None:
        """Loads the model in the calling thread (start() does it in the engine thread)."""
        cfg = self.config
        started = time.perf_counter()
        loaded = load_model(cfg)
        runtime = self.runtime = loaded.runtime
        self.model_config = loaded.model_config
        self.tokenizer = loaded.tokenizer
        self.turns_split = TURN_START in self.tokenizer.get_added_vocab()  # where turn_pieces keeps the tokens
        self.words_split = words_split(self.tokenizer)  # where word_pieces does
        self.token_bytes = loaded.token_bytes
        self.generation = loaded.generation
        self.sampling_defaults = self.generation.sampling() if cfg.generation_config == "auto" else {}
        self.think_ids = loaded.think_ids
        self.grammars = Grammars(self.tokenizer, self.token_bytes, self.model_config.vocab_size,
                                 self.generation.eos_token_ids, cfg.grammar_cache_memory)
        self.block_manager = BlockManager(runtime.num_kv_blocks, runtime.block_size, cfg.enable_prefix_caching)
        spec = runtime.speculative
        self.scheduler = Scheduler(self.block_manager, runtime.max_batch, cfg.max_prefill_tokens, cfg.max_step_tokens,
                                   cfg.prefill_stall,
                                   NgramProposer(spec, runtime.max_model_len).propose if spec is not None else None)
        with torch.inference_mode():
            self.runner = ModelRunner(loaded.model, runtime)
        if before_ready is not None:
            before_ready()
        info = self._info()
        log.info("ready: model=%s device=%s dtype=%s quant=%s kernels=%s cpu_isa=%s float_gemv=%s graph=%s "
                 "cpu_replay=%s kv_cache_tokens=%d threads=%d max_step_tokens=%d prefill_stall=%g speculative=%s "
                 "load_time=%.1fs", runtime.model_path, info["device"], info["dtype"], runtime.quant, runtime.kernels,
                 cfg.cpu_isa, runtime.float_gemv, runtime.graph, replay_text(info["cpu_replay"]),
                 runtime.kv_cache_tokens, runtime.threads, cfg.max_step_tokens, cfg.prefill_stall, info["speculative"],
                 time.perf_counter() - started)
        self.ready = True  # after the `ready:` line: whoever sees /health answer 200 finds it in the log

    def info(self) -> dict:
        return self._info() if self.ready else {}

    def _info(self) -> dict:
        """The runtime's settings, and how its decode steps replay (GraphRunner.cpu_replay, found as they were
        recorded)."""
        return self.runtime.info() | {"cpu_replay": self.runner.graphs.cpu_replay}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._stopped.wait(timeout)

    def _main(self, before_ready: Callable[[], None] | None) -> None:
        try:
            try:
                self.load(before_ready)
            except Exception as exc:  # reported by /health; the thread ends
                self.load_error = str(exc) if isinstance(exc, (loader.ModelLoadError, ValueError)) else repr(exc)
                log.error("model load failed: %s", self.load_error)
                return
            with torch.inference_mode():
                while not self._stopping:
                    try:
                        self.drain_inbox()
                        if not self.scheduler.has_work:
                            # glibc keeps the heap a prefill freed (its working set: tens of MB) for reuse;
                            # when idle, resident memory is worth more than the page faults of the next one
                            loader.release_freed_heap()
                            self._wakeup.wait()
                            self._wakeup.clear()
                            continue
                        self.step()
                    except Exception as exc:  # a bug must cost the requests in flight, not the server
                        log.exception("engine loop failed")
                        self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")
        finally:
            self._stopped.set()

    # -- API (any thread) -----------------------------------------------------------------
    def encode_messages(self, messages: list[dict], chat_template_kwargs: dict | None = None,
                        max_tokens: int | None = None, tools: list[dict] | None = None) -> list[int]:
        """The prompt's token ids (ending in a generation prompt unless chat_template_kwargs says otherwise);
        PromptTooLongError past max_tokens. CPU-heavy for long prompts: servers call it from a worker thread."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, **{"add_generation_prompt": True, **(chat_template_kwargs or {})}
            )
        except Exception as exc:  # jinja errors from the checkpoint's template
            raise InvalidRequest(f"could not apply the chat template: {exc}", param="messages") from None
        return self._encoded([self.pieces(text)], False, max_tokens)[0]

    def encode_texts(self, texts: list[str], add_special_tokens: bool = True,
                     max_tokens: int | None = None) -> list[list[int]]:
        """Plain texts' token ids (no template: a legacy completion's prompts, /tokenize's), those `tokenizer(texts)`
        makes; PromptTooLongError for the first past max_tokens. CPU-heavy for long texts: a worker thread's."""
        special = add_special_tokens and self.tokenizer.backend_tokenizer.num_special_tokens_to_add(False) > 0
        return self._encoded([[text] if special else self.pieces(text) for text in texts], special, max_tokens)

    def pieces(self, text: str) -> list[str]:
        """`text` cut where its pieces' tokens, in order, are the whole's (nanoqwen/engine/pieces.py): before each
        turn, and each turn between words, where this tokenizer keeps the tokens so."""
        turns = turn_pieces(text) if self.turns_split else [text]
        return [piece for turn in turns for piece in word_pieces(turn)] if self.words_split else turns

    def _encoded(self, texts: list[list[str]], add_special_tokens: bool, max_tokens: int | None) -> list[list[int]]:
        """Each text's ids from its pieces (Engine.pieces), PromptTooLongError for the first of more than max_tokens.

        The Rust tokenizer runs without the GIL (encode_batch_fast releases it, encode does not), and the ids only
        become Python lists (which holds the GIL, ~0.1 s per million) once the lengths are known to fit.
        Freeing an encoding holds the GIL too, a stall of every stream and /health: the offsets of a 7 MB prompt's
        3.7M tokens took 0.23 s to free in one call, so none are made (encode_batch_fast), and the encodings, a
        piece each (16,000 turns encoded in parallel in 2.7 s against 9.0 whole), are freed one by one.
        """
        encodings = self.tokenizer.backend_tokenizer.encode_batch_fast(
            [piece for pieces in texts for piece in pieces], add_special_tokens=add_special_tokens)
        bounds = list(itertools.accumulate((len(pieces) for pieces in texts), initial=0))
        counts = [sum(len(encoding) for encoding in encodings[start:end]) for start, end in itertools.pairwise(bounds)]
        too_long = next((count for count in counts if max_tokens is not None and count > max_tokens), None)
        out: list[list[int]] = []
        for start, end in itertools.pairwise(bounds) if too_long is None else ():
            ids: list[int] = []
            for encoding in encodings[start:end]:
                ids += encoding.ids  # extended in C: a Python loop over the tokens would hold the GIL
            out.append(ids)
        while encodings:
            encodings.pop()  # one at a time: the GIL may pass between them
        if too_long is not None:
            raise PromptTooLongError(too_long)
        return out

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises validation.InvalidRequest naming the problem and its parameter (the server's 400)."""
        validate_request(prompt_ids, params, vocab_size=self.model_config.vocab_size,
                         max_model_len=self.runtime.max_model_len, max_batch=self.runtime.max_batch)
        self.allowed_mask(params)

    def allowed_mask(self, params: SamplingParams) -> torch.Tensor | None:
        """params.allowed_token_ids checked and as a bitmask row, built once per list: a batched completion
        submits every prompt with the same params, and the list may hold tens of thousands of ids."""
        allowed = params.allowed_token_ids
        if allowed is None:
            return None
        if self._allowed[0] is not allowed:  # the memo keeps the list alive, so its identity cannot be reused
            check_allowed_token_ids(params, self.model_config.vocab_size)
            self._allowed = (allowed, token_bitmask(allowed, self.model_config.vocab_size))
        return self._allowed[1]

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, *, stream: EventStream | None = None,
        split_reasoning: bool = True,
    ) -> tuple[str, EventStream]:
        stream = stream if stream is not None else EventStream()
        return self.submit_all([prompt_ids], params, [stream], split_reasoning)[0], stream

    def submit_all(self, prompts: list[list[int]], params: SamplingParams, streams: list[EventStream],
                   split_reasoning: bool = True) -> list[str]:
        """Every prompt as a request of its own on its stream, all or none: each is validated before any is queued,
        and they reach the scheduler together (a legacy completion's prompts, admitted steps apart, began apart);
        more of them than the queue holds at all is refused before any is built."""
        if len(prompts) > self.config.max_queue:
            raise InvalidRequest(f"{len(prompts)} prompts are more than the server queues at once "
                                 f"({self.config.max_queue})", param="messages")
        requests = [self.request(ids, params, stream, split_reasoning) for ids, stream in zip(prompts, streams,
                                                                                               strict=True)]
        self.enqueue(requests)
        return [request.request_id for request in requests]

    def request(self, prompt_ids: list[int], params: SamplingParams, stream: EventStream,
                split_reasoning: bool) -> Request:
        """The validated request of `prompt_ids` and its sequences, not yet queued."""
        self.validate(prompt_ids, params)
        eos_ids = self.generation.eos_token_ids
        request = Request(
            request_id=uuid.uuid4().hex, params=params, stream=stream, num_prompt_tokens=len(prompt_ids),
            stop_ids=frozenset([*([] if params.ignore_eos else eos_ids), *params.stop_token_ids]),
            all_stop_ids=tuple(sorted({*eos_ids, *params.stop_token_ids})),
            allowed_mask=self.allowed_mask(params),
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = PromptLogprobs(self.token_bytes.piece(prompt_ids[0]), [])
        max_tokens = completion_limit(self.runtime.max_model_len, len(prompt_ids), params.max_tokens)
        base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        think_in_prompt = split_reasoning and self._prompt_opens_thinking(prompt_ids)
        # A grammar starts after </think> if the prompt or the first token opens a thought, else from the first
        # token (a vocabulary without both tokens has no thought that could close).
        think, end_think = self.think_ids if split_reasoning and None not in self.think_ids else (None, None)
        may_open = None if think_in_prompt else think
        for i in range(params.n):
            seq = Sequence(request, i, prompt_ids, seed=base_seed + i * 0x9E3779B9, max_tokens=max_tokens)
            seq.text = TextPipeline(
                self.token_bytes, params.stop, params.skip_special_tokens, split_reasoning, think_in_prompt,
                params.min_tokens,
            )
            if params.grammar is not None:
                seq.grammar = RowGrammar.of(params.grammar, end_think, self.generation.eos_token_ids, may_open)
            request.sequences.append(seq)
        return request

    def enqueue(self, requests: list[Request]) -> None:
        """Queues `requests` as one inbox item, so the engine takes them in at once; QueueFullError (none queued) where
        they would take the queue past its bound, ShuttingDownError (none queued) after a fail_all that refused later
        requests."""
        with self._lock:
            if self._refusing:
                raise ShuttingDownError("this worker is stopping and takes no new request")
            if self._num_queued + len(requests) > self.config.max_queue:
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._num_queued += len(requests)
            for request in requests:
                self._requests[request.request_id] = request
        self._inbox.append(("submit", requests))
        self._wakeup.set()

    def _prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the template already opened <think> for this turn (the output then starts in reasoning)."""
        think, end_think = self.think_ids

        def last(token: int | None) -> int:
            return max((i for i, t in enumerate(prompt_ids) if t == token), default=-1)

        return think is not None and last(think) > last(end_think)

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def fail_all(self, message: str, refuse_later: bool = False) -> None:
        """Ends every request, queued or running, with an error event carrying `message`; `refuse_later`: enqueue
        refuses every request from now on (a stopping worker's cut before its handlers are killed: a request begun
        after it would be cut without an answer). One registered before is in the requests fail_all's item ends: its own
        inbox item, behind fail_all's, is passed over; ahead of it, it is scheduled and failed with the rest."""
        if refuse_later:
            with self._lock:
                self._refusing = True
        self._inbox.append(("fail_all", message))
        self._wakeup.set()

    def stats(self) -> dict:
        with self._lock:
            queued = self._num_queued
            active = len(self._requests) - queued
        blocks = getattr(self, "block_manager", None)
        queries = blocks.prefix_queries if blocks else 0
        hits = blocks.prefix_hits if blocks else 0
        runner = getattr(self, "runner", None)
        grammars = getattr(self, "grammars", None)
        cached, cached_bytes = grammars.cache_stats() if grammars else (0, 0)
        return {
            "queue_length": queued,
            "active_requests": active,
            "tokens_generated": self.tokens_generated,
            "requests_finished": self.requests_finished,
            "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            # in tokens, as vLLM counts them (its queries: every prompt token; ours: those of the blocks looked up)
            "prefix_cache_queried_tokens": queries * blocks.block_size if blocks else 0,
            "prefix_cache_hit_tokens": hits * blocks.block_size if blocks else 0,
            "kv_usage": blocks.usage if blocks else 0.0,
            "preemptions": self.scheduler.preemptions if blocks else 0,
            "spec_decode_num_drafts": self.spec_drafts,
            "spec_decode_num_draft_tokens": self.spec_draft_tokens,
            "spec_decode_num_accepted_tokens": self.spec_accepted_tokens,
            "spec_decode_acceptance_rate": self.spec_accepted_tokens / self.spec_draft_tokens
            if self.spec_draft_tokens else 0.0,
            # NANOQWEN_GRAPH=compile's graphs, all made while loading: a count that grows after is a request's wait
            "graph_compiles": runner.graphs.compiles if runner else 0,
            "grammars_cached": cached,
            "grammar_cache_bytes": cached_bytes,
            "step_buckets": self.steps.buckets.copy(),  # a copy: the engine thread adds to it
            "step_tokens": self.steps.tokens,
            # the KV cache's configuration, once loaded (vLLM's cache_config_info)
            **({"block_size": blocks.block_size, "kv_blocks": blocks.num_blocks,
                "prefix_caching": blocks.enable_prefix_caching} if blocks else {}),
        }

    # -- engine thread --------------------------------------------------------------------
    def drain_inbox(self) -> None:
        """Takes in what other threads queued (submits, aborts, fail_all); runs where step() runs: the engine
        thread, or a synchronous driver (tests, benchmarks) that has not started it."""
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                for request in item:
                    if request.request_id not in self._requests:
                        continue  # a fail_all queued between its registration and this item closed it already
                    for seq in request.sequences:
                        self.scheduler.add(seq)
            elif kind == "fail_all":
                self._fail_all(item)
            else:
                request = self._requests.get(item)
                if request is not None:
                    for seq in request.sequences:
                        if seq.status is not Status.FINISHED:  # its held text too: the answer ends here
                            self._finish(seq, "abort", _held_text(seq))

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            return
        for seq, _ in batch.prefill:
            if not seq.request.started:
                seq.request.started = True
                seq.request.cached_tokens = seq.num_cached_tokens
                with self._lock:
                    self._num_queued -= 1
                seq.request.stream.admitted()
        sampled = batch.sampled  # before the step moves the computed counts
        started = time.perf_counter()
        try:
            output = self.runner.step(batch)
        except Exception as exc:  # fail this batch, keep serving the rest
            log.exception("engine step failed")
            self.block_manager.reset_prefix_cache()
            requests = list({id(s.request): s.request for s, _ in batch.rows}.values())
            self._fail(requests, f"internal error during generation: {type(exc).__name__}: {exc}")
            return
        if sampled:  # its tokens are on the host: the device work is done, the step timed whole
            self.scheduler.observe(batch, time.perf_counter() - started)
        tokens = 0
        for seq, n in batch.rows:
            seq.num_computed_tokens += n - len(seq.draft_ids)  # drafts count once verified
            tokens += n
        self.steps.add(tokens)
        for (seq, _), scored in zip(batch.rows, output.prompt_logprobs or ()):
            if scored is not None:
                seq.request.prompt_logprobs.tokens += prompt_token_logprobs(seq, scored, self.token_bytes)
        row = 0
        with HeldWakeups():  # the streams' readers are woken once, with every token of the step
            failed = output.grammar_failed  # the answer cannot go on and follow its grammar: a 200 would lie
            if failed:
                self._fail_grammars(failed)
            for seq in sampled:
                # its request failed: its token is dropped (the status looked up only then, ~0.5 µs a row on 3.11)
                if failed and seq.status is Status.FINISHED:
                    pass
                elif seq.max_tokens == 0:  # the prompt scored, no answer (`echo` with `max_tokens: 0`)
                    self._finish(seq, "length", first_event(seq))
                elif seq.draft_ids:
                    self._verify(seq, row, output)
                else:
                    self._append_token(seq, row, output)
                row += 1 + len(seq.draft_ids)
                seq.draft_ids = []

    def _verify(self, seq: Sequence, row: int, output: StepOutput) -> None:
        """Appends a drafting row's tokens: the drafts the sampler agreed with, then its first other token
        (or the one after the last draft), one by one, until one of them ends the choice."""
        drafts = seq.draft_ids
        accepted = next((i for i, draft in enumerate(drafts) if output.tokens[row + i] != draft), len(drafts))
        self.spec_drafts += 1
        self.spec_draft_tokens += len(drafts)
        self.spec_accepted_tokens += accepted
        for i in range(accepted + 1):
            if i:
                seq.num_computed_tokens += 1  # the accepted draft's k/v, written by the step
            if self._append_token(seq, row + i, output):
                return
        self.block_manager.trim(seq)

    def _append_token(self, seq: Sequence, row: int, output: StepOutput) -> bool:
        """-> whether the token ended the choice."""
        event, finish = token_event(seq, row, output, self.token_bytes, self.runtime.max_model_len)
        self.tokens_generated += 1
        if finish is None:
            seq.request.stream.put(event)
        else:
            self._finish(seq, finish, event)
        return finish is not None

    def _finish(self, seq: Sequence, reason: str, event: Event | None = None) -> None:
        self.scheduler.finish(seq)
        event = event or Event(index=seq.index)
        event.finish_reason = reason
        request = seq.request
        request.stream.put(event)
        if request.finished:
            self._close(request)
            request.stream.put(usage_event(request))

    def _fail(self, requests: list[Request], message: str, param: str | None = None) -> None:
        """Ends the requests with an error event each, after the text each unfinished choice held back (an incomplete
        UTF-8 character, what might have begun a stop string): as at a finish by length, the answer ended there.
        Every held text goes before any error: a legacy completion's prompts share a stream, which ends at its first.
        `param`: the requests' field at fault (Event.error_param), None for the server's error."""
        for request in requests:
            for seq in request.sequences:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq)
                    if (held := _held_text(seq)) is not None:
                        request.stream.put(held)
        for request in requests:
            self._close(request)
            request.stream.put(Event(error=message, error_param=param))

    def _fail_grammars(self, failed: list[Sequence]) -> None:
        """Fails the requests of the sequences whose grammar erred, each once (n > 1: whichever choices erred), with
        its first erring choice's reason (a legacy completion's other prompts, each a request of its own, Serving
        aborts at the error)."""
        first: dict[int, Sequence] = {}
        for seq in failed:
            first.setdefault(id(seq.request), seq)
        for seq in first.values():
            self._fail([seq.request], f"the output could not follow the grammar the request asked for: "
                       f"{seq.grammar.error}", seq.request.params.grammar_field)

    def _fail_all(self, message: str) -> None:
        self.block_manager.reset_prefix_cache()
        with self._lock:
            requests = list(self._requests.values())
        self._fail(requests, message)

    def _close(self, request: Request) -> None:
        with self._lock:
            if self._requests.pop(request.request_id, None) is not None:
                if not request.started:
                    self._num_queued -= 1
                self.requests_finished += 1


def _held_text(seq: Sequence) -> Event | None:
    """The text a choice that fails or is aborted held back, as an event of its own (None: none held). A pipeline that
    raises is logged and passed over: its request's error (or abort) event must still go out."""
    try:
        reasoning, text = seq.text.finish() if seq.text is not None else ("", "")
    except Exception:
        log.exception("the held text of %s was lost", seq.request.request_id)
        return None
    logprobs = released_logprobs(seq, None, 0, True) if seq.held_logprobs else None  # those of the text held
    held = text or reasoning or logprobs
    return Event(index=seq.index, text=text, reasoning=reasoning, logprobs=logprobs) if held else None
