"""`POST /v1/chat/completions`: validate, tokenize, submit to the engine, stream or collect.

The request greenlet never runs torch, nor the chat template and the tokenizer: those run in a
NativePool worker, and the greenlet parks on its GeventEventStream, which the engine thread
feeds; the SSE generator pulls one event per engine step.
"""
from __future__ import annotations

import json
import logging
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from nanoqwen.api.channel import GeventEventStream
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError, error_body
from nanoqwen.api.metrics import RequestTrace, ServerStats
from nanoqwen.api.offload import NativePool, PoolFullError
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder, ToolParsing, fingerprint
from nanoqwen.api.schemas import ChatCompletionRequest, parse_chat_request
from nanoqwen.api.sse import DONE, HEADERS, sse
from nanoqwen.engine import Engine, QueueFullError
from nanoqwen.engine.engine import PromptTooLongError
from nanoqwen.engine.request import Event, SamplingParams
from nanoqwen.engine.stream import EventStream

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # nginx's status for "client closed request"; nobody reads it


class ClientGone(Exception):
    pass


def client_disconnected(environ: dict[str, Any]) -> bool:
    """True when the client reset its connection.

    End of stream is not a disconnect: a client may half-close (`shutdown(SHUT_WR)`, `nc -N`)
    once its request is sent and still read the answer. A client that is really gone shows up
    as a reset here, or as a failed write of the stream (gunicorn then closes our generator).
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):  # ECONNRESET, or a socket closed under us
        return True
    return False


def unavailable(engine: Engine) -> APIError | None:
    """The 503 to answer while the model is not serving, else None."""
    if engine.load_error is not None:
        return APIError(503, f"the model failed to load: {engine.load_error}", type="server_error",
                        code="model_load_failed")
    if not engine.ready:
        return APIError(503, "the model is still loading", type="server_error", code="model_loading",
                        headers={"Retry-After": RETRY_AFTER_S})
    return None


def template_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """A cheap measure of a chat prompt's size."""
    chars = sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages)
    return chars + (len(json.dumps(tools)) if tools else 0)


class ChatService:
    def __init__(self, engine: Engine, config: ServerConfig, stats: ServerStats) -> None:
        self.engine = engine
        self.config = config
        self.stats = stats
        self.tokenizing = NativePool(config.tokenizer_threads, config.max_pending_prompts)
        self.tokenizing_long = NativePool(config.long_prompt_threads, config.max_pending_long_prompts)
        self._info: dict[str, Any] | None = None

    @property
    def info(self) -> dict[str, Any]:
        """engine.info(), fixed once the model is loaded."""
        if self._info is None:
            self._info = self.engine.info()
        return self._info

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.info)

    def handle(self, body: Any, environ: dict[str, Any]) -> Response | dict[str, Any]:
        trace = self.stats.begin()
        req = parse_chat_request(body)
        self.check_serving(req.model)
        params = req.sampling_params(self.engine.sampling_defaults)
        prompt_ids = self._encode(req, params.max_tokens)
        channel = GeventEventStream()
        request_id = self._submit(prompt_ids, params, channel, req.split_reasoning)
        tools = ToolParsing(req.shows_tools, req.max_tool_calls)
        if req.stream:
            chunks = ChunkBuilder(self.config.served_model_name, self.fingerprint, req.include_usage, tools)
            events = self._stream(request_id, channel, chunks, params.n, trace, environ)
            return Response(events, mimetype="text/event-stream", headers=HEADERS)
        completion = self._collect(request_id, channel, req, tools, trace, environ)
        if completion is None:
            return Response(status=CLIENT_CLOSED)
        return completion

    def check_serving(self, model: str | None) -> None:
        """404 for a model name this server does not serve, 503 while the model does not serve."""
        if model is not None and not self.config.accepts_model(model):
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        if (error := unavailable(self.engine)) is not None:
            raise error

    def off_loop(self, chars: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) (templating, tokenising) in a native thread; prompts of `chars` characters or
        more go to their own pool, so a few long ones cannot hold up every short one."""
        pool = self.tokenizing_long if chars >= self.config.long_prompt_chars else self.tokenizing
        try:
            return pool.run(fn, *args)
        except PoolFullError as exc:
            raise APIError(503, f"the server is at capacity, retry later ({exc})", type="server_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None

    def _encode(self, req: ChatCompletionRequest, max_tokens: int | None) -> list[int]:
        longest = self.info["max_model_len"] - (max_tokens or 1)
        messages, tools = req.template_messages(), req.template_tools()
        try:
            return self.off_loop(template_chars(messages, tools), self.engine.encode_messages, messages,
                                 req.template_kwargs(), longest, tools)
        except PromptTooLongError as exc:
            raise self._context_error(exc.num_tokens, max_tokens) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def _context_error(self, prompt_tokens: int, max_tokens: int | None) -> APIError:
        limit = self.info["max_model_len"]
        if max_tokens is None:
            message = (f"This model's maximum context length is {limit} tokens. However, your messages "
                       f"resulted in {prompt_tokens} tokens, leaving none for the completion. "
                       "Please reduce the length of the messages.")
        else:
            message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} "
                       "in the completion). Please reduce the length of the messages or completion.")
        return APIError(400, message, param="messages", code="context_length_exceeded")

    def _submit(self, prompt_ids: list[int], params: SamplingParams, channel: EventStream,
                split_reasoning: bool) -> str:
        try:
            request_id, _ = self.engine.submit(prompt_ids, params, stream=channel, split_reasoning=split_reasoning)
        except QueueFullError as exc:
            raise APIError(503, f"the server is at capacity, retry later ({exc})", type="server_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return request_id

    def _events(self, channel: EventStream, environ: dict[str, Any]) -> Iterator[Event]:
        """The request's events, checking at each one (each engine step) and every poll interval
        while none comes (queued) that the client is still connected: one non-blocking select."""
        while True:
            try:
                event = channel.get(timeout=self.config.disconnect_poll_s)
            except TimeoutError:
                event = None
            if client_disconnected(environ):
                raise ClientGone
            if event is None:
                continue
            yield event
            if event.is_last:
                return

    def _collect(self, request_id: str, channel: EventStream, req: ChatCompletionRequest, tools: ToolParsing,
                 trace: RequestTrace, environ: dict[str, Any]) -> dict[str, Any] | None:
        builder = CompletionBuilder(self.config.served_model_name, self.fingerprint, req.n or 1, bool(req.logprobs),
                                    tools)
        finished = False
        try:
            for event in self._events(channel, environ):  # its last event is the `is_last` one
                trace.on_event(event)
                builder.add(event)
            finished = True
        except ClientGone:
            return None
        finally:
            if not finished:
                self.engine.abort(request_id)
                self.stats.abort(trace)
        if event.error is not None:
            self.stats.fail(trace)
            raise APIError(500, event.error, type="server_error")
        self.stats.finish(trace, event.usage)
        return builder.build(event.usage)

    def _stream(self, request_id: str, channel: EventStream, chunks: ChunkBuilder, n: int, trace: RequestTrace,
                environ: dict[str, Any]) -> Iterator[str]:
        finished = False
        try:
            for index in range(n):
                yield sse(chunks.role(index))
            for event in self._events(channel, environ):
                trace.on_event(event)
                out = self._chunks(event, chunks)
                if event.is_last:  # account for it before a failing write can cut the generator short
                    finished = True
                    if event.error is not None:
                        self.stats.fail(trace)
                    else:
                        self.stats.finish(trace, event.usage)
                for text in out:
                    yield text
            yield DONE
        except ClientGone:
            return
        except Exception:
            log.exception("chat completion stream %s failed", request_id)
            yield sse(error_body("internal server error", type="server_error"))
            yield DONE
        finally:
            if not finished:
                self.engine.abort(request_id)
                self.stats.abort(trace)

    @staticmethod
    def _chunks(event: Event, chunks: ChunkBuilder) -> list[str]:
        """The SSE events one engine event turns into."""
        out = [sse(chunk) for chunk in chunks.deltas(event)]
        if event.finish_reason is not None:
            out.append(sse(chunks.finish(event.index, event.finish_reason)))
        if event.error is not None:
            out.append(sse(error_body(event.error, type="server_error")))
        elif event.usage is not None and chunks.include_usage:
            out.append(sse(chunks.usage(event.usage)))
        return out
