"""What every generating endpoint shares: the model checks, off-loop tokenising, submitting to the
engine, and turning its events into one JSON answer or an SSE stream with disconnect handling.

The request greenlet never runs torch, nor the chat template and the tokenizer: those run in a
NativePool worker, and the greenlet parks on its GeventEventStream, which the engine thread
feeds; the SSE generator pulls one event per engine step.
"""
from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, Literal, Protocol, TypeVar

import gevent.monkey
from flask import Response

from nanoqwen.api import request_id
from nanoqwen.api.body import CLIENT_CLOSED, CLIENT_GONE, ParsedBody, parse_json
from nanoqwen.api.channel import GeventEventStream
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.encode import encode_json
from nanoqwen.api.errors import APIError, generation_error
from nanoqwen.api.full_collections import FULL_COLLECTIONS
from nanoqwen.api.metrics import RequestTrace, ServerStats, Submitted
from nanoqwen.api.offload import NativePool, run_or_503
from nanoqwen.api.responses import fingerprint
from nanoqwen.api.sse import HEADERS, PROBE, sse
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine import Engine, QueueFullError, ShuttingDownError
from nanoqwen.engine.grammar import COMPILE_STACK_BYTES
from nanoqwen.engine.request import Event, SamplingParams, Usage
from nanoqwen.engine.validation import InvalidRequest

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
MODEL_LOADING = "model_loading"  # unavailable()'s code while the model loads
T = TypeVar("T")
LARGE_ANSWER = 2048  # a collected answer of more JSON objects (answer_weight) is built off the loop
# A stream holds frames for the events still waiting this long at most: a reader behind the engine (a loop saturated
# by its streams) always finds one waiting, and wrote nothing after its opening until its end.
MAX_HOLD_S = 0.1
# A body at least this long (characters) is parsed, and one of at least this many values validated, off the loop (in
# the long prompts' one thread: an everyday body, 1,100 token ids or 300 messages, validates in 0.1-1.5 ms, less than
# the hand-off, and must not queue behind long prompts)
LARGE_BODY_CHARS = 1 << 16
LARGE_BODY_VALUES = 1 << 13
# A request with this many values (separators) under its `tools` is validated (chat's), or made a chat request of
# (Responses'), off the loop, in the tokenising threads: each tool is validated as chat's Tool and measured
# (Tool.template), 1-5 us a value (a small tool's ~18 values the dearest), so at most a few ms on the loop. Agents send
# 64 tools and more routinely: one thread and 8 pending would turn them into 503s.
LARGE_TOOL_VALUES = 1 << 10
INTERIM_PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"
PROBED = "nanoqwen.probed"  # set in the environ once the client's end of stream is seen (client_probe)
Json = dict[str, Any]
Lane = Literal["loop", "short", "long"]
# The unpatched poll, which never blocks with a zero timeout: gevent's select then runs a turn of the loop (its
# gevent.sleep(0)) at each call, and select refuses descriptors past FD_SETSIZE (1024), which read as a client gone.
_poll = gevent.monkey.get_original("select", "poll")
_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux's: the peer's end of stream, told without reading the socket


def lane(values: int = 0, chars: int = 0, tool_values: int = 0) -> Lane:
    """Where a request of `values` JSON values (its budget's), `chars` characters of JSON (of its body or the stored
    items it brings in) or `tool_values` values under its tools is worked on (Serving.off_loop_if): "long", the long
    prompts' thread, for a large body; "short", the tokenising threads, for many tools; else on the "loop"."""
    if values >= LARGE_BODY_VALUES or chars >= LARGE_BODY_CHARS:
        return "long"
    return "short" if tool_values >= LARGE_TOOL_VALUES else "loop"


class ClientGone(Exception):
    pass


class Collector(Protocol):
    def add(self, event: Event) -> None: ...
    def build(self, usage: Usage) -> Json | bytes: ...  # bytes: the answer already encoded (encode_json)


def _encoded(answer: Json | bytes) -> bytes:
    return answer if isinstance(answer, bytes) else encode_json(answer)


class Streamer(Protocol):
    ending: str  # sent after the last chunk ("" for none)
    # its final chunks, and those repeats() names, repeat the answer so far: a large one's are framed off the loop
    repeats_answer: bool

    def repeats(self, chunk: Json) -> bool: ...

    def opening(self) -> list[Json]: ...
    def chunks(self, event: Event) -> list[Json]: ...
    def frame(self, chunk: Json, split: bool = False) -> str: ...
    # the stream's error, after an engine error's event (Event.error, error_param) or an exception of our own
    def failure(self, message: str, param: str | None = None) -> list[Json]: ...


def client_probe(environ: dict[str, Any]) -> bool:
    """Whether the client is still there: one non-blocking poll (its flags; a peek where the OS has no POLLRDHUP).
    True: its end of stream (FIN) came, seen for the first time, to be probed now; ClientGone: it is gone. No read:
    a TLS socket's recv takes no flags, and a byte the client sent before its reset hid the reset from a peek
    (still read where the OS has no POLLRDHUP: _peeked_end).

    End of stream is not a disconnect: a client may half-close (`shutdown(SHUT_WR)`, `nc -N`) once its request is
    sent and still read the answer. A client that is really gone shows up as a reset here, or as a failed write
    (gunicorn then closes the stream's generator). But a client that closed its socket (timed out, a proxy whose
    client left) sends the same FIN, and an answer may write nothing for long (a collected one until it is generated,
    a stream while queued or while its text is held back, as a tool call's): the first end of stream seen is to be
    probed (True), once per request, and its caller then writes what the client must skip (probe_interim before the
    answer's head, an SSE comment line in a stream), which a closed socket answers with a reset. A reset after the FIN
    is no error to recv (it reads the end of stream first), only to a write or SO_ERROR, which a later check reads.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        poller = _poll()
        poller.register(sock, select.POLLIN | _RDHUP)
        events = poller.poll(0)
        if not events:
            return False
        flags = events[0][1]
        if flags & (select.POLLERR | select.POLLHUP | select.POLLNVAL):  # a reset, or a socket closed under us
            raise ClientGone
        if flags & _RDHUP if _RDHUP else _peeked_end(sock):  # the client's FIN
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # and a reset since
                raise ClientGone
            if not environ.get(PROBED):
                environ[PROBED] = True
                return True
    except (OSError, ValueError):  # ECONNRESET, or a socket closed under us
        raise ClientGone from None
    return False


def _peeked_end(sock: Any) -> bool:
    """Where the OS has no POLLRDHUP (macOS): the end of stream is an empty peek. A TLS socket takes no peek (its
    recv refuses flags): its end of stream is not seen before a write fails."""
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except ValueError:
        return False


def probe_interim(environ: dict[str, Any]) -> None:
    """The probe of a client whose answer has not started: an interim `100 Continue`, which HTTP/1.1 clients must
    skip. HTTP/1.0 ones know none, and no byte they must skip can come before the status line: their end of stream is
    taken for a close, as nginx takes any client's while it waits for its upstream (a half-closed HTTP/1.0 client's
    connection is closed without an answer: nanoqwen.worker)."""
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        raise ClientGone
    try:
        environ["gunicorn.socket"].sendall(INTERIM_PROBE)
    except OSError:  # reset already
        raise ClientGone from None


def answer_weight(event: Event) -> int:
    """About the JSON objects an event adds to a collected answer: one for the event (its text), and
    with logprobs one per token and per alternative (the prompt's too, with echo)."""
    scored = [*(event.logprobs or ()), *(event.prompt_logprobs.tokens if event.prompt_logprobs else ())]
    return 1 + sum(1 + len(lp.top_logprobs) for lp in scored)


def invalid_request(exc: InvalidRequest, prompt_param: str = "messages") -> APIError:
    """The 400 of an engine refusal; `prompt_param` is where this endpoint's prompt is (the engine says messages)."""
    param = prompt_param if exc.param == "messages" else exc.param
    return APIError(400, str(exc), param=param, code=exc.code)


def retry_later(message: str, code: str) -> APIError:
    """A 503 for a request not begun, that another worker or replica may serve: nginx (deploy/nginx.conf) and
    openai's client retry it."""
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": RETRY_AFTER_S})


def unavailable(engine: Engine) -> APIError | None:
    """The 503 to answer while the model is not serving, else None."""
    if engine.load_error is not None:
        return APIError(503, f"the model failed to load: {engine.load_error}", type="server_error",
                        code="model_load_failed")
    if not engine.ready:
        return retry_later("the model is still loading", MODEL_LOADING)
    return None


class Batch(GeventEventStream):
    """One stream for several engine requests (the prompts of a batched completion): choice
    indices follow on from request to request, and the end is one event with the usage summed.
    With `reports_admission`, an `admitted` event comes first once the engine starts on one of them."""

    def __init__(self, submitted: Submitted, reports_admission: bool = False) -> None:
        super().__init__()
        self.request_ids: list[str] = []
        self.submitted = submitted
        self._open = 0
        self._usage = Usage(0, 0)
        self._unreported = reports_admission  # the admission still to report

    def admit_part(self) -> None:
        """Called by the engine thread, the only writer."""
        if self.submitted.admitted is None:
            self.submitted.admitted = time.perf_counter()
        if self._unreported:
            self._unreported = False
            self.put(Event(admitted=True))

    def part(self, offset: int) -> _Part:
        self._open += 1
        return _Part(self, offset)

    def put_part(self, event: Event, offset: int) -> None:
        """Called by the engine thread, the only writer."""
        event.index += offset
        if event.usage is not None:
            total = self._usage
            self._usage = Usage(total.prompt_tokens + event.usage.prompt_tokens,
                                total.completion_tokens + event.usage.completion_tokens,
                                total.cached_tokens + event.usage.cached_tokens)
            self._open -= 1
            if self._open:
                return
            event.usage = self._usage
        self.put(event)


class _Part:
    def __init__(self, batch: Batch, offset: int) -> None:
        self.batch = batch
        self.offset = offset

    def put(self, event: Event) -> None:
        self.batch.put_part(event, self.offset)

    def admitted(self) -> None:
        self.batch.admit_part()


def _frames(chunks: Streamer, event: Event, split: bool = False) -> list[str]:
    out = [chunks.frame(chunk, split) for chunk in chunks.chunks(event)]
    if event.error is not None:
        out.extend(chunks.frame(chunk) for chunk in chunks.failure(event.error, event.error_param))
    return out


def _broken(chunks: Streamer, message: str) -> list[str]:
    """The last frames of a stream our own code broke: what it held, cut as an engine error cuts it, then its failure.
    The builder's state may have broken with the first exception: a cut that raises too is left out, and a failure
    that raises too (a Responses one repeats the items so far) is sent as the bare error body, which clients of every
    kind read as an error."""
    try:
        held = [chunks.frame(chunk) for chunk in chunks.chunks(Event(error=message))]
    except Exception:
        log.exception("the held output of a broken stream was lost")
        held = []
    try:
        failure = [chunks.frame(chunk) for chunk in chunks.failure(message)]
    except Exception:
        log.exception("the failure event of a broken stream could not be built")
        failure = [sse(generation_error(message).body())]
    return [*held, *failure]


class Serving:
    def __init__(self, engine: Engine, config: ServerConfig, stats: ServerStats) -> None:
        self.engine = engine
        self.config = config
        self.stats = stats
        self.tokenizing = NativePool(config.tokenizer_threads, config.max_pending_prompts)
        self.tokenizing_long = NativePool(config.long_prompt_threads, config.max_pending_long_prompts)
        # llguidance's compile recurses once per link of a grammar's chain: a deep stack
        self.compiling = NativePool(config.grammar_threads, config.max_pending_grammars, COMPILE_STACK_BYTES,
                                    "grammars are already being compiled")
        # every job is an answer already generated: waiting beats refusing it, and it shares no lane with prompts
        self.encoding = NativePool(1, max_pending=1 << 20)
        self._info: dict[str, Any] = {}
        self._fingerprint = ""

    @property
    def info(self) -> dict[str, Any]:
        """engine.info(), fixed once the model is loaded (the empty one before is not kept)."""
        if not self._info:
            self._info = self.engine.info()
        return self._info

    @property
    def fingerprint(self) -> str:
        """fingerprint(info), once the model is loaded (a JSON dump and a hash a request)."""
        if not self._fingerprint and self.info:
            self._fingerprint = fingerprint(self.info)
        return self._fingerprint

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
        return run_or_503(pool, fn, *args)

    def parse_body(self, text: str, raw: bytes | None) -> ParsedBody:
        """body.parse_json(text, raw), off the loop past LARGE_BODY_CHARS (8 MiB of JSON: ~130 ms)."""
        return self.off_loop_if(lane(chars=len(text)), parse_json, text, raw)

    def validate(self, parse: Callable[[Any, Budget], T], body: Any, budget: Budget) -> T:
        """parse(body, budget), a request's validation, off the loop for a body of LARGE_BODY_VALUES values or more
        (16,000 messages: ~60 ms; a Responses input of as many items: ~200 ms), or of LARGE_TOOL_VALUES values under
        its tools (chat's are validated and measured as it parses: 300 small tools ~11-69 ms)."""
        return self.off_loop_if(lane(budget.used, tool_values=budget.fields.get("tools", 0)), parse, body, budget)

    def off_loop_if(self, where: Lane, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the threads `where` (lane) names, where it would hold every stream and /health on the loop;
        else here: a hand-off to a thread costs more than a small request's work. fn runs in the thread as a whole:
        what it hands off itself (off_loop) must be done there in its place."""
        if where == "loop":
            return fn(*args)
        return run_or_503(self.tokenizing_long if where == "long" else self.tokenizing, fn, *args)

    def compile_off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) (a grammar's compile, on its cache's miss) in the grammars' own native threads: a prompt's
        tokenising never waits for other clients' grammars; the collector's full walks put off meanwhile
        (full_collections: a large schema's objects walked with the GIL held stalled every stream)."""
        return run_or_503(self.compiling, FULL_COLLECTIONS.put_off, fn, *args)

    def submit(self, prompts: list[list[int]], params: SamplingParams, split_reasoning: bool,
               prompt_param: str = "messages", reports_admission: bool = False) -> Batch:
        """Every prompt as one engine request with params.n choices, all on one stream (Batch)."""
        batch = Batch(Submitted(params.n, params.max_tokens, list(map(len, prompts))), reports_admission)
        try:
            batch.request_ids += self.engine.submit_all(prompts, params, [batch.part(i * params.n)
                                                                          for i in range(len(prompts))],
                                                        split_reasoning=split_reasoning)
        except QueueFullError as exc:
            raise retry_later(f"the server is at capacity, retry later ({exc})", "queue_full") from None
        except ShuttingDownError as exc:
            raise retry_later(f"the server is shutting down, retry the request ({exc})",
                              "server_shutting_down") from None
        except InvalidRequest as exc:
            raise invalid_request(exc, prompt_param) from None
        return batch

    def respond(self, batch: Batch, stream: Streamer | None, collector: Collector, trace: RequestTrace,
                environ: dict[str, Any]) -> Response | Json:
        """An SSE response from `stream` when given, else the collected JSON answer (a large one
        built and encoded in a native thread: with logprobs it takes seconds)."""
        if stream is not None:
            return Response(self._stream(batch, stream, trace, environ), mimetype="text/event-stream",
                            headers=HEADERS)
        answer = self._collect(batch, collector, trace, environ)
        if answer is not None:
            return answer
        environ[CLIENT_GONE] = request_id.request_id()
        return Response(status=CLIENT_CLOSED)

    def detached(self, batch: Batch, stream: Streamer, trace: RequestTrace) -> Iterator[list[str]]:
        """The frames of `stream` for a generation no client holds (a background response), an event's together:
        no disconnect ends it."""
        return self._batches(batch, stream, trace, {})

    def abort(self, batch: Batch) -> None:
        for engine_id in batch.request_ids:
            self.engine.abort(engine_id)

    def _events(self, batch: Batch, environ: dict[str, Any], writes: bool = False) -> Iterator[Event | None]:
        """The request's events, checking that the client is still connected (client_probe) every poll interval while
        none comes (queued) and at each one (each engine step), unless the answer `writes` as its events come (a
        stream, whose own writes and checks cover its events: _batches). None: the client's end of stream came, to be
        probed now in the answer's own way."""
        while True:
            try:
                event = batch.get(timeout=self.config.disconnect_poll_s)
            except TimeoutError:
                event = None
            if (event is None or not writes) and client_probe(environ):
                yield None
            if event is None:
                continue
            yield event
            if event.is_last:
                return

    def _collect(self, batch: Batch, builder: Collector, trace: RequestTrace,
                 environ: dict[str, Any]) -> Response | Json | None:
        finished = False
        weight = 0
        try:
            for event in self._events(batch, environ):  # its last event is the `is_last` one
                if event is None:
                    probe_interim(environ)
                    continue
                trace.on_event(event)
                builder.add(event)
                weight += answer_weight(event)
            finished = True
        except ClientGone:
            return None
        finally:
            batch.close()
            if not finished:
                self.abort(batch)
                self.stats.abort(trace, batch.submitted)
        if event.error is not None:
            self.abort(batch)  # the other prompts of a batch
            self.stats.fail(trace, batch.submitted)
            raise generation_error(event.error, event.error_param)
        usage = event.usage
        self.stats.finish(trace, usage, batch.submitted)
        if weight < LARGE_ANSWER:
            answer = builder.build(usage)
            return answer if isinstance(answer, dict) else Response(answer, mimetype="application/json")
        return Response(self.encoding.run(lambda: _encoded(builder.build(usage))), mimetype="application/json")

    def _frames_large(self, chunks: Streamer, event: Event) -> list[str]:
        """A large answer's event framed in the encoding thread: its last whole (it repeats the answer), another only
        where it repeats it (an item's `.done` events as the next item starts)."""
        if event.is_last:
            return self.encoding.run(_frames, chunks, event, True)
        built = chunks.chunks(event)
        if not any(chunks.repeats(chunk) for chunk in built):
            return [chunks.frame(chunk) for chunk in built]
        return self.encoding.run(lambda: [chunks.frame(chunk, True) for chunk in built])

    def _stream(self, batch: Batch, chunks: Streamer, trace: RequestTrace, environ: dict[str, Any]) -> Iterator[str]:
        """One write per wake-up: the frames of every event already waiting (and the ending after the last) go out
        together, in one socket send, where a write per frame cost a send each; held MAX_HOLD_S at most."""
        with closing(self._batches(batch, chunks, trace, environ)) as batches:
            # an opening of no chunk (a role delta that waits for the choice's output) still sends the headers now
            yield "".join(next(batches))
            pending: list[str] = []
            held_since = 0.0
            for out in batches:
                if out and not pending and batch.waiting:  # else written now
                    held_since = time.monotonic()
                pending += out
                if pending and not batch.ended and (not batch.waiting
                                                    or time.monotonic() - held_since >= MAX_HOLD_S):
                    yield "".join(pending)
                    pending = []
            if pending:
                yield "".join(pending)

    def _batches(self, batch: Batch, chunks: Streamer, trace: RequestTrace,
                 environ: dict[str, Any]) -> Iterator[list[str]]:
        """The stream's frames, each event's in one list (its last event's may be megabytes: a background
        stream keeps them whole for a follower that keeps up)."""
        finished = aborted = False
        weight = 0
        next_probe = 0.0
        try:
            yield [chunks.frame(chunk) for chunk in chunks.opening()]
            for event in self._events(batch, environ, writes=True):
                if event is None:
                    yield [PROBE]
                    continue
                trace.on_event(event)
                aborted |= event.finish_reason == "abort"  # cancelled (a background response): no client gone
                if chunks.repeats_answer:  # only a stream whose last events repeat the answer weighs it
                    weight += answer_weight(event)
                large = chunks.repeats_answer and weight >= LARGE_ANSWER
                out = self._frames_large(chunks, event) if large else _frames(chunks, event)
                # The client is checked at an event that writes nothing (held text: no failed write would notice it
                # gone), else at the first one past each poll interval, as a write fails once it is gone (a check a
                # token was a tenth of the hub's time per streamed token); not at the last (usage alone: it ends).
                now = time.monotonic()
                if not event.is_last and (not out or now >= next_probe):
                    next_probe = now + self.config.disconnect_poll_s
                    if client_probe(environ):
                        out = [*out, PROBE]
                if event.is_last:  # account for it before a failing write can cut the generator short
                    finished = True
                    if event.error is not None:
                        self.abort(batch)  # the other prompts of a batch
                        self.stats.fail(trace, batch.submitted)
                    elif aborted:
                        self.stats.abort(trace, batch.submitted)
                    else:
                        self.stats.finish(trace, event.usage, batch.submitted)
                yield out
            if chunks.ending:
                yield [chunks.ending]
        except ClientGone:
            return
        except Exception:
            log.exception("stream of %s failed", batch.request_ids)
            if not finished:  # ours, not the client's: the engine stops before the last frames go out
                finished = True
                self.abort(batch)
                self.stats.fail(trace, batch.submitted)
            failure = _broken(chunks, "internal server error")
            yield [*failure, chunks.ending] if chunks.ending else failure
        finally:
            batch.close()
            if not finished:
                self.abort(batch)
                self.stats.abort(trace, batch.submitted)
