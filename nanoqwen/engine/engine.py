"""The engine: one real OS thread owns the model; any thread or greenlet submits and aborts.

submit() -> an EventStream fed by the engine thread, one Event per choice per step.
"""
from __future__ import annotations

import collections
import logging
import random
import time
import uuid

import torch

import ops
from nanoqwen import loader
from nanoqwen.config import EngineConfig, bind_device, resolve_device, resolve_dtype, resolve_threads
from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.request import Event, SamplingParams, TokenLogprob, TopLogprob, Usage
from nanoqwen.engine.scheduler import Scheduler
from nanoqwen.engine.sequence import Request, Sequence, Status
from nanoqwen.engine.stream import EventStream
from nanoqwen.engine.threads import NativeEvent, native_lock, start_native_thread
from nanoqwen.runner import ModelRunner, StepOutput, kv_bytes_per_token
from nanoqwen.text import TextPipeline, TokenBytes

log = logging.getLogger("nanoqwen")

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


class QueueFullError(RuntimeError):
    pass


class PromptTooLongError(ValueError):
    def __init__(self, num_tokens: int) -> None:
        super().__init__(f"the prompt has {num_tokens} tokens")
        self.num_tokens = num_tokens


def default_graph_mode(device: torch.device) -> str:
    return "cudagraph" if device.type == "cuda" else "none"


def kv_pool_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory > 0:
        return int(config.kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8) - (1 << 30)  # leave room for activations, graphs and sampling
    return 2 << 30


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
        self._stopping = False
        self._stopped = NativeEvent()
        self.tokens_generated = 0
        self.requests_finished = 0
        self._info: dict = {}
        self.sampling_defaults: dict = {}  # the checkpoint's, for fields a request leaves out

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        start_native_thread(self._main)

    def load(self) -> None:
        """Loads the model in the calling thread (start() does it in the engine thread)."""
        cfg = self.config
        started = time.perf_counter()
        threads = resolve_threads(cfg.threads)
        torch.set_num_threads(threads)
        path = loader.resolve_checkpoint(cfg.model, cfg.revision)
        shards = loader.check_files(path)
        model_config = loader.load_model_config(path)
        device = bind_device(resolve_device(cfg.device))
        dtype = resolve_dtype(cfg.dtype, model_config.torch_dtype, device)
        kernels = ops.default_backend(device) if cfg.kernels == "auto" else cfg.kernels
        ops.set_backend(kernels, device)
        graph = default_graph_mode(device) if cfg.graph == "auto" else cfg.graph
        if graph == "cudagraph" and device.type != "cuda":
            raise ValueError(f"NANOQWEN_GRAPH=cudagraph needs a CUDA device, not {device.type}")
        max_model_len = min(cfg.max_model_len or model_config.max_position_embeddings,
                            model_config.max_position_embeddings)
        self.tokenizer = loader.load_tokenizer(path)
        self.generation = loader.load_generation_defaults(path, self.tokenizer)
        self.sampling_defaults = self.generation.sampling() if cfg.generation_config == "auto" else {}
        self.token_bytes = TokenBytes(self.tokenizer)
        vocab = self.tokenizer.get_vocab()
        self._think_ids = (vocab.get("<think>"), vocab.get("</think>"))
        model = loader.build_model(model_config, shards, max_model_len, device, dtype)

        per_block = kv_bytes_per_token(model_config, dtype) * cfg.block_size
        num_blocks = cfg.num_kv_blocks or kv_pool_bytes(cfg, device) // per_block
        num_blocks = min(num_blocks, 1 + cfg.max_batch * -(-max_model_len // cfg.block_size))
        if num_blocks < 2:
            raise ValueError("the KV cache budget is too small for even one block")
        if (num_blocks - 1) * cfg.block_size < max_model_len:
            max_model_len = (num_blocks - 1) * cfg.block_size
            log.warning("KV pool holds %d tokens: max_model_len lowered to that", max_model_len)
        self.max_model_len = max_model_len
        self.model_config = model_config
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_batch, cfg.max_prefill_tokens)
        with torch.inference_mode():
            self.runner = ModelRunner(
                model, device=device, dtype=dtype, graph=graph, max_batch=cfg.max_batch,
                max_model_len=max_model_len, block_size=cfg.block_size, num_blocks=num_blocks,
            )
        self._info = {
            "model_path": str(path),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "kernels": kernels,
            "graph": graph,
            "max_batch": cfg.max_batch,
            "max_model_len": max_model_len,
            "block_size": cfg.block_size,
            "num_kv_blocks": num_blocks,
            "threads": threads,
        }
        self.ready = True
        log.info("ready: model=%s device=%s dtype=%s kernels=%s graph=%s kv_cache_tokens=%d threads=%d "
                 "load_time=%.1fs", path, device, self._info["dtype"], kernels, graph,
                 (num_blocks - 1) * cfg.block_size, threads, time.perf_counter() - started)

    def info(self) -> dict:
        return dict(self._info)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._stopped.wait(timeout)

    def _main(self) -> None:
        try:
            try:
                self.load()
            except Exception as exc:  # reported by /health; the thread ends
                self.load_error = str(exc) if isinstance(exc, (loader.ModelLoadError, ValueError)) else repr(exc)
                log.error("model load failed: %s", self.load_error)
                return
            with torch.inference_mode():
                while not self._stopping:
                    try:
                        self._drain_inbox()
                        if not self.scheduler.has_work:
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
                        max_tokens: int | None = None, tools: list[dict] | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids; PromptTooLongError past max_tokens.

        CPU-heavy for long prompts: servers call it from a worker thread. The Rust tokenizer runs
        without the GIL (encode_batch releases it, encode does not), and the ids only become a
        Python list (which holds the GIL, ~0.1 s per million) once the length is known to fit.
        """
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {})
            )
        except Exception as exc:  # jinja errors from the checkpoint's template
            raise ValueError(f"could not apply the chat template: {exc}") from None
        (encoding,) = self.tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=False)
        if max_tokens is not None and len(encoding) > max_tokens:
            raise PromptTooLongError(len(encoding))
        return encoding.ids

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the problem; the server maps it to a 400."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion."
            )
        if params.max_tokens is not None and params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if params.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= params.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if params.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        if not 1 <= params.n <= self.config.max_batch:
            raise ValueError(f"n must be between 1 and {self.config.max_batch}")
        if len(params.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, *, stream: EventStream | None = None,
        split_reasoning: bool = True,
    ) -> tuple[str, EventStream]:
        self.validate(prompt_ids, params)
        stream = stream if stream is not None else EventStream()
        stop_ids = params.stop_token_ids if params.ignore_eos else [*self.generation.eos_token_ids, *params.stop_token_ids]
        request = Request(
            request_id=uuid.uuid4().hex, params=params, stream=stream, num_prompt_tokens=len(prompt_ids),
            split_reasoning=split_reasoning, stop_ids=frozenset(stop_ids),
        )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        think_in_prompt = split_reasoning and self._prompt_opens_thinking(prompt_ids)
        for i in range(params.n):
            seq = Sequence(request, i, prompt_ids, seed=base_seed + i * 0x9E3779B9, max_tokens=max_tokens)
            seq.text = TextPipeline(
                self.token_bytes, params.stop, params.skip_special_tokens, split_reasoning, think_in_prompt
            )
            request.sequences.append(seq)
        with self._lock:
            if self._num_queued >= self.config.max_queue:
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._num_queued += 1
            self._requests[request.request_id] = request
        self._inbox.append(("submit", request))
        self._wakeup.set()
        return request.request_id, stream

    def _prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the template already opened <think> for this turn (the output then starts in reasoning)."""
        think, end_think = self._think_ids

        def last(token: int | None) -> int:
            return max((i for i, t in enumerate(prompt_ids) if t == token), default=-1)

        return think is not None and last(think) > last(end_think)

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def fail_all(self, message: str) -> None:
        """Ends every request, queued or running, with an error event carrying `message`."""
        self._inbox.append(("fail_all", message))
        self._wakeup.set()

    def stats(self) -> dict:
        with self._lock:
            queued = self._num_queued
            active = len(self._requests) - queued
        blocks = getattr(self, "block_manager", None)
        queries = blocks.prefix_queries if blocks else 0
        hits = blocks.prefix_hits if blocks else 0
        return {
            "queue_length": queued,
            "active_requests": active,
            "tokens_generated": self.tokens_generated,
            "requests_finished": self.requests_finished,
            "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "kv_usage": blocks.usage if blocks else 0.0,
            "preemptions": self.scheduler.preemptions if blocks else 0,
        }

    # -- engine thread --------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                for seq in item.sequences:
                    self.scheduler.add(seq)
            elif kind == "fail_all":
                self._fail_all(item)
            else:
                request = self._requests.get(item)
                if request is not None:
                    for seq in request.sequences:
                        if seq.status is not Status.FINISHED:
                            self._finish(seq, "abort")

    def step(self) -> None:
        seqs, prefill = self.scheduler.schedule()
        if not seqs:
            return
        if prefill:
            for seq in seqs:
                if not seq.request.started:
                    seq.request.started = True
                    seq.request.cached_tokens = seq.num_cached_tokens
                    with self._lock:
                        self._num_queued -= 1
        try:
            output = self.runner.prefill(seqs) if prefill else self.runner.decode(seqs)
        except Exception as exc:  # fail this batch, keep serving the rest
            log.exception("engine step failed")
            self.block_manager.reset_prefix_cache()
            for request in {id(s.request): s.request for s in seqs}.values():
                self._fail(request, f"internal error during generation: {type(exc).__name__}: {exc}")
            return
        for i, seq in enumerate(seqs):
            self.block_manager.register_full_blocks(seq, len(seq))
            self._append_token(seq, i, output)

    def _append_token(self, seq: Sequence, row: int, output: StepOutput) -> None:
        token = output.tokens[row]
        params = seq.request.params
        seq.token_ids.append(token)
        self.tokens_generated += 1
        event = Event(index=seq.index, token_ids=[token])
        if params.logprobs:
            event.logprobs = [self._logprob(token, output, row, params.top_logprobs)]
        finish = None
        stopped_by_token = token in seq.request.stop_ids
        if stopped_by_token:
            finish = "stop"
        else:
            event.reasoning, event.text, stopped = seq.text.add(token)
            if stopped:
                finish = "stop"
            elif seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
                finish = "length"
        if finish is None:
            seq.request.stream.put(event)
            return
        if finish == "length" or stopped_by_token:
            reasoning, text = seq.text.finish()
            event.reasoning += reasoning
            event.text += text
        self._finish(seq, finish, event)

    def _logprob(self, token: int, output: StepOutput, row: int, k: int) -> TokenLogprob:
        tb = self.token_bytes
        top = [
            TopLogprob(token_id=t, token=tb.piece(t), logprob=v, bytes=list(tb.bytes(t)))
            for t, v in zip(output.top_ids[row][:k], output.top_values[row][:k])
        ]
        return TokenLogprob(token_id=token, token=tb.piece(token), logprob=output.logprobs[row],
                            bytes=list(tb.bytes(token)), top_logprobs=top)

    def _finish(self, seq: Sequence, reason: str, event: Event | None = None) -> None:
        self.scheduler.finish(seq)
        event = event or Event(index=seq.index)
        event.finish_reason = reason
        seq.finish_reason = reason
        request = seq.request
        request.stream.put(event)
        if request.finished:
            self._close(request)
            request.stream.put(Event(index=0, usage=Usage(
                prompt_tokens=request.num_prompt_tokens,
                completion_tokens=sum(s.num_output_tokens for s in request.sequences),
                cached_tokens=request.cached_tokens,
            )))

    def _fail(self, request: Request, message: str) -> None:
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
        self._close(request)
        request.stream.put(Event(error=message))

    def _fail_all(self, message: str) -> None:
        self.block_manager.reset_prefix_cache()
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            self._fail(request, message)

    def _close(self, request: Request) -> None:
        with self._lock:
            if self._requests.pop(request.request_id, None) is not None:
                if not request.started:
                    self._num_queued -= 1
                self.requests_finished += 1
