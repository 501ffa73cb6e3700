"""gunicorn's gevent worker, adapted to a worker whose model runs in a native engine thread.

`nanoqwen.gunicorn_conf.post_fork` turns every gevent worker into this class, so it also holds for
`gunicorn -k gevent server:app` (a `-k` on the command line overrides the config's worker_class).
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import select
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import gevent
import gunicorn
from gevent import monkey, socket
from gevent.pool import Pool
from gunicorn import util
from gunicorn.arbiter import Arbiter
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.http.wsgi import Response
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

from nanoqwen.api.body import CLIENT_CLOSED, CLIENT_GONE, CLOSE_CONNECTION, READ_CHUNK
from nanoqwen.api.errors import error_body
from nanoqwen.api.shared_stats import PUBLISH_S, forgotten
from nanoqwen.boot_signals import exit_on_stop_signals
from nanoqwen.request_line import CheckedRequest, refused_method
from nanoqwen.send_timeout import SendTimeout, TimedWrites
from nanoqwen.settings import WORKER_TIMEOUT_S

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from gunicorn.http.message import Request

    from nanoqwen.api.metrics import ServerStats
    from nanoqwen.engine import Engine
    from nanoqwen.settings import EngineConfig

SHUTDOWN_MESSAGE = "the server is shutting down: this request ran past the grace period"
LINGER_S, LINGER_IDLE_S = 5.0, 1.0
STOPPING_WAIT_S = 1.0
LOAD_POLL_S = 0.2
ROOM_POLL_S = 0.25
OFF_SOCKET = "off the listening socket while its model loads: another worker serves"
PREDECESSOR_MARGIN_S = 10.0  # past --graceful-timeout: the old worker's kill, its reap and the master's forgetting


def route_logs(worker: GeventWorker) -> None:
    """nanoqwen's own log lines (the ready line, load errors) go to gunicorn's error log, in its format."""
    error_log = worker.log.error_log
    logger = logging.getLogger("nanoqwen")
    logger.handlers = list(error_log.handlers)
    logger.setLevel(error_log.level)
    logger.propagate = False


def _freeze_imported_objects() -> None:
    """Before the engine thread starts: what the imports made (torch, gevent, flask, the Hub's client: ~220k objects)
    is moved out of the collector's reach. Each of the load's 4-6 full collections walked it with the GIL held,
    ~130 ms of CPU, and /health's "loading" answers waited for them (0.2-0.45 s each at a load of 25); they walk only
    the load's objects now. Not collected first: the imports leave no cyclic garbage (none at this point under
    gunicorn, found with DEBUG_SAVEALL), and a collection would cost ~120 ms of CPU, which the loop's first answer
    would wait for, for nothing. Collections stay on while the model loads: off, a compile's garbage
    (NANOQWEN_GRAPH=compile) would pile up until the load's end."""
    gc.freeze()


def _freeze_loaded_objects() -> None:
    """A full collection walks every tracked object with the GIL held: walking the loaded process's
    stalled every greenlet for 0.3-0.6 s each time a large answer's objects triggered one."""
    gc.collect()
    gc.freeze()


# gunicorn's refusals that a client can act on without reading the message
GUNICORN_CODES = {404: "not_found", 414: "uri_too_long", 431: "request_header_fields_too_large",
                  501: "unsupported_transfer_coding"}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str, head_only: bool = False) -> None:
    """gunicorn's own answers (a request line, header or chunk it cannot parse: 400, 414, 431, 501; an
    error past the app: 500) in OpenAI's envelope, in place of its HTML page. gunicorn's reason for a 501
    is "Bad Request"; and a 501 is the client's doing (a transfer coding nobody here knows), not a
    server_error, which clients (openai-python) retry. head_only: the answer to a HEAD, its body left out (RFC 9110
    9.3.2)."""
    type = "server_error" if status_int >= 500 and status_int != 501 else "invalid_request_error"
    body = json.dumps(error_body(mesg or reason, type, code=GUNICORN_CODES.get(status_int))).encode()
    try:
        phrase = HTTPStatus(status_int).phrase
    except ValueError:  # a status HTTPStatus does not know: gunicorn's reason
        phrase = reason
    head = (f"HTTP/1.1 {status_int} {phrase}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + (b"" if head_only else body))


def linger(sock: socket.socket) -> None:
    """nginx's lingering close, after an answer sent before the request's body was read: the answer's FIN, then what
    the client still sends read and dropped, yielding, for LINGER_S at most. Closing at once, with its data unread,
    resets the connection, and a client still sending lost the answer (curl: no status)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(min(LINGER_IDLE_S, left))  # the deadline holds inside a wait too
            if not sock.recv(READ_CHUNK):
                break
            gevent.sleep(0)  # a recv whose data has arrived returns without letting the loop run


def _body_follows(req: Request) -> bool:
    reader = req.body.reader
    return isinstance(reader, ChunkedReader) or (isinstance(reader, LengthReader) and reader.length > 0)


Idle = dict[gevent.Greenlet, gevent.Timeout]  # the connections waiting for a request's head, oldest first


def _end_wait(greenlet: gevent.Greenlet, timeout: gevent.Timeout, begun_too: bool = True) -> None:
    """Ends a connection's keep-alive wait as if it had timed out, at the loop's next turn and only if it still waits
    then: a kill queued now could land after the request's head arrived in the same turn, inside the request (a
    500 and a traceback, a stream cut). Not `begun_too`: only if no byte of the next request's head has come."""
    gevent.get_hub().loop.run_callback(
        lambda: timeout.pending and (begun_too or greenlet not in WaitedRequest.begun) and greenlet.throw(timeout))


class WaitedRequest(CheckedRequest):
    """CheckedRequest that marks a connection waiting for its next request (in `waiting`, the worker's) once that
    head's first bytes have come (`begun`, left as the wait ends): a request under way, which the stop's end of the
    waits leaves to be read and served. A head begun before the 1 s mark and whole after it met the close: no answer
    (the rest of it reset)."""

    waiting: ClassVar[Idle] = {}
    begun: ClassVar[set[gevent.Greenlet]] = set()

    def read_into(self, unreader: Any, buf: bytearray, stop: bool = False) -> None:
        super().read_into(unreader, buf, stop)
        if (current := gevent.getcurrent()) in self.waiting:  # its wait takes it out as it ends (--keep-alive 0: none)
            self.begun.add(current)


class ContinueOnRead:
    """The `wsgi.input` of a request that expects `100 Continue`: sent at the app's first read of the body, as
    uvicorn's h11 does, where gunicorn sends it before the app has seen the request, so that a client sent a whole
    body to a request the app then refused (401, 404, 413). `sent` stays False when the app answers unread."""

    def __init__(self, body: Any, sock: Any) -> None:
        self._body = body
        self._sock = sock
        self.sent = False

    def _continue(self) -> None:
        if not self.sent:
            self.sent = True
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read(self, size: int | None = None) -> bytes:
        self._continue()
        return self._body.read(size)

    def readline(self, size: int | None = None) -> bytes:
        self._continue()
        return self._body.readline(size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        self._continue()
        return self._body.readlines(size)

    def __iter__(self) -> Iterator[bytes]:
        self._continue()
        return iter(self._body)


class NanoqwenWorker(GeventWorker):
    """Differences from GeventWorker:

    - gevent patches network I/O and time only (socket, ssl, dns, select, time). Threads, queues,
      subprocess, os (fork, posix_spawn, waitpid) and signal stay real: torch runs in native threads
      (the engine's, and those inductor and Triton start from it) that compile through subprocess
      (inductor's compile workers and cc, Triton's ptxas/gcc/ldconfig, the CPU kernels' cc).
      gevent's subprocess needs child watchers, which exist only on the main thread's loop, and its
      threads would be greenlets of a hub nobody runs (joined at exit, they hang the worker).
      Request greenlets wait only on gevent objects (nanoqwen.api.channel), so the loop stays free:
      a greenlet must never wait on a `threading` lock, event or `queue.Queue` that another thread
      holds or feeds (that stops the loop); offload blocking work to native threads and wait on a
      gevent object (gevent's hub threadpool does both).
    - the engine thread starts here, after the fork: `--preload` only imports the app in the master.
    - a failed model load exits with WORKER_BOOT_ERROR: the master stops and logs why.
    - a stop signal before gunicorn's handlers are in place (while torch imports) exits at once (boot_signals), and
      a stop while the model loads does not wait for the load.
    - what the imports made is moved out of the garbage collector's reach before the engine starts, so that the
      load's collections do not walk it (_freeze_imported_objects); once the model is loaded, what exists then (the
      tokenizer, the model) follows (_freeze_loaded_objects, in the engine thread before requests are let in).
    - what gunicorn answers itself (a request it cannot parse) is an OpenAI-style JSON error; a path outside an
      operator's SCRIPT_NAME (a deployment under a prefix) is a 404 (gunicorn's is a 500).
    - an answer before the request's body was read (the app sets CLOSE_CONNECTION) says `Connection: close` (gunicorn
      ignores an app's Connection header) and closes the connection after a lingering read (linger): gunicorn would
      read the rest of the body before the next request in one go, holding the loop.
    - a client whose end of stream came before its answer could be probed (the app's CLIENT_CLOSED: an HTTP/1.0 one)
      is sent nothing, its connection closed, as nginx does; gunicorn wrote the 499 meant for the log.
    - a response's write that makes no progress for NANOQWEN_SEND_TIMEOUT closes the connection, as a
      client gone does (nanoqwen.send_timeout): one log line, no stack trace.
    - `Expect: 100-continue` is answered at the app's first read of the body (ContinueOnRead); an answer before it
      closes the connection, as one before a large body does: the client sends the body or not, as it likes.
    - on SIGTERM or at --max-requests, keep-alive connections close 1 s after the stop or after their requests
      end (STOPPING_WAIT_S), and streams still running just before the grace period ends are failed so that they
      end with an error event, not a cut; a request begun after that (a kept-alive connection's next one) is refused
      a 503 `server_shutting_down` before any head, which nginx and openai's client retry elsewhere;
      requests answered while the model loads do not count towards --max-requests, nor those the app began to answer
      while it loaded where it loaded by their end.
    - with every connection slot taken and a client waiting to connect, the connection idle longest is closed
      (_make_room).
    - a worker whose model loads stays off the shared listening socket while another worker serves
      (_wait_while_a_sibling_serves), and its snapshot says whether it serves (_serving).
    - with several workers, one that reaches --max-requests while no other serves serves on until one does
      (_hold_at_limit), and a reload's new worker on CUDA, its KV pool sized from the free memory, loads once the old
      one whose slot it took has gone (_wait_for_predecessors).
    - a request line is refused at its first byte that cannot be one (a TLS ClientHello: nanoqwen.request_line), not
      once 4 KiB or a line feed came.
    """

    nanoqwen_predecessors: tuple[int, ...] = ()  # the old workers whose slot it took (nanoqwen.gunicorn_conf.pre_fork)

    def patch(self) -> None:
        # Imported before patching: modules that break once `select` is patched stay out of reach
        # (trio, pulled in by httpx, needs select.epoll). huggingface_hub's HfApi pulls it in: transformers, which
        # the engine thread imports as the model loads (~0.3 s of CPU that /health's first answer no longer waits
        # for), and the Hub's downloads find it imported.
        import huggingface_hub.hf_api  # noqa: F401

        import nanoqwen.engine  # noqa: F401

        # Expected after the imports above: httpx's TLS modules keep the unpatched ssl (fine: Hub
        # downloads run in the engine thread), and gevent's scan of live objects trips a torch alias.
        warnings.filterwarnings("ignore", "Monkey-patching ssl after ssl", monkey.MonkeyPatchWarning)
        warnings.filterwarnings("ignore", ".*torch.distributed.reduce_op", FutureWarning)
        monkey.patch_all(thread=False, queue=False, subprocess=False, os=False, signal=False)
        self.sockets = [socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]

    def init_process(self) -> None:
        # without nanoqwen's config (its at-fork hook): patch() imports torch first (a stop in the milliseconds from
        # the fork to here is still queued for the master's loop; not tested: the config's hook covers the tests)
        exit_on_stop_signals()
        self._idle: Idle = WaitedRequest.waiting
        self._pools: list[Pool] = []  # each listener's connections (worker_connections of them)
        self._unread: set[gevent.Greenlet] = set()  # requests answered before their body was read: linger after
        self._expecting: set[gevent.Greenlet] = set()  # requests whose `100 Continue` waits for the app's read
        self._app_began_loading: set[gevent.Greenlet] = set()  # requests the app began to answer as the model loads
        self._send_timeout_s = 0.0  # the app's ServerConfig.send_timeout_s, read in run() once the app is imported
        self._engine: Engine  # the app's, set in run() once the app is imported
        self._stats: ServerStats  # the app's, set in run() once the app is imported
        self._accepting = False  # its listeners started (_wait_while_a_sibling_serves has let it)
        self._draining = False
        self._script_name = os.environ.get("SCRIPT_NAME", "")  # gunicorn's wsgi.create reads it so too
        self._head_answers: set[socket.socket] = set()  # connections whose error answer is to a HEAD
        util.write_error = self._write_error  # the one caller is Worker.handle_error
        route_logs(self)
        super().init_process()

    @contextlib.contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """The keep-alive wait for a connection's next request; shutdown ends the waits under way STOPPING_WAIT_S
        later (_drain), and one begun after the stop (a stream whose head went out before it has ended since) lasts
        that long: for the keep-alive timeout it held the exit to the graceful timeout, and ended at once it reset the
        request a client sends as soon as its answer ends (about every other stop, each such client); that one is
        served, its answer closing the connection (_end_after_stop)."""
        timeout = gevent.Timeout(self.cfg.keepalive, False)
        current = gevent.getcurrent()
        self._idle[current] = timeout
        if not self.alive:
            gevent.spawn(self._end_after_stop, current, timeout)
        try:
            with timeout:
                yield
        finally:
            self._idle.pop(current, None)  # gone already where _make_room ended the wait
            WaitedRequest.begun.discard(current)

    def handle_error(self, req: Request | None, client: socket.socket, addr: tuple[str, int] | None,
                     exc: BaseException) -> None:
        """gunicorn's answer to an error, to a HEAD without its body (RFC 9110 9.3.2): a refused head's method read
        where it was parsed (gunicorn passes no request for most), an error past the app's from its request."""
        method = refused_method(exc) or getattr(req, "method", None)
        if method == "HEAD":
            self._head_answers.add(client)
        try:
            super().handle_error(req, client, addr, exc)
        finally:
            self._head_answers.discard(client)

    def _write_error(self, sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
        write_json_error(sock, status_int, reason, mesg, head_only=sock in self._head_answers)

    def handle_request(self, listener_name: str, req: Request, sock: socket.socket, addr: tuple[str, int]) -> None:
        # an operator's SCRIPT_NAME (a deployment under a prefix): gunicorn answered a path outside it with a 500 and
        # served one that only starts with its characters (`/apiv1/models` under `/api`)
        if self._outside_script_name(req.path):
            self.log.info("%s %s %s: outside SCRIPT_NAME %s, a 404", addr, req.method, req.path, self._script_name)
            write_json_error(sock, 404, "Not Found", f"Unknown endpoint: {req.method} {req.path}: this server serves "
                                                     f"the paths under {self._script_name.rstrip('/')}/",
                             head_only=req.method == "HEAD")
            if _body_follows(req):
                linger(sock)
            raise StopIteration
        current = gevent.getcurrent()
        # gunicorn counts each request towards --max-requests (its handle_request adds one): one answered 503 while
        # the model loads does not count, or a worker polled that often before it loaded restarted, and its
        # successor too, forever (the server never ready); taken off before gunicorn's check of the limit
        counted, loading = self.nr, not self._engine.ready
        self.nr -= loading
        if not loading:
            self._hold_at_limit()
        if req._expected_100_continue:  # gunicorn's wsgi.create would send it before the app sees the request
            req._expected_100_continue = False
            if _body_follows(req):  # none to wait for: the request is whole (RFC 9110 10.1.1: no 100 is needed)
                self._expecting.add(current)
        try:
            super().handle_request(listener_name, req, TimedWrites(sock, self._send_timeout_s), addr)
        except StopIteration:  # gunicorn closes the connection after this answer
            if current in self._unread:
                linger(sock)
            raise
        except SendTimeout as exc:  # the app's generator is closed by now: as if the client had gone
            self.log.info("closed the connection of %s %s: %s", req.method, req.path, exc.strerror)
            # a reset, not a FIN behind the unread data: the kernel would keep the socket and its full send
            # buffer (up to tcp_wmem's 4 MiB) for as long as it probes the client's shut window
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise StopIteration from None  # gunicorn's way to close a connection without logging an error
        finally:
            if loading:  # and not twice: gunicorn refuses some requests before it counts them (a bad SCRIPT_NAME)
                self.nr = max(self.nr, counted)
                # loaded before the app began its answer: answered as served (/health's 200). Not where the app
                # began it loading: `ready` turns in the loading thread, also after a "loading" answer (or any other,
                # /metrics') and before this look (under load, while it is written)
                if self._engine.ready and current not in self._app_began_loading:
                    self._count_served()
                self._app_began_loading.discard(current)
            self._unread.discard(current)
            self._expecting.discard(current)

    def _count_served(self) -> None:
        """One more request towards --max-requests, and the check of its limit as gunicorn's handle_request makes it
        (kept alike on an upgrade). Its answer is sent by now, without the `Connection: close` gunicorn's would have:
        the exit closes that connection as an idle keep-alive one."""
        self._hold_at_limit()
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False

    def _hold_at_limit(self) -> None:
        """Before a request counts towards --max-requests: where it is the one that reaches the limit, with several
        workers and none other serving (loading: splitting the requests evenly, the workers reach their limits within
        one load of each other), the restart waits (_restart_when_another_serves). Restarting then left no worker
        loaded, and the respawned ones answered 503 model_loading (61 of 80 requests: profiles/RESULTS.md, lane
        scale43). A lone worker restarts at once, as gunicorn's does."""
        if self.nr + 1 < self.max_requests or self.cfg.workers < 2 or self._stats.may_restart():
            return
        self.max_requests = sys.maxsize  # gunicorn's check of the limit (and _count_served's) left to the wait
        gevent.spawn(self._restart_when_another_serves)

    def _restart_when_another_serves(self) -> None:
        """The deferred restart: once another worker serves and no other's restart is under way (may_restart), or
        gunicorn's --timeout after the limit (a sibling that never loads does not keep this one for ever; where
        --timeout is 0, gunicorn's "none", nanoqwen's default of it), whichever comes first; a stop meanwhile
        (SIGTERM) is that stop. Asked each PUBLISH_S, as often as the others' answers change: each question reads the
        run directory on the event loop, while this worker serves."""
        bound_s = self.cfg.timeout or WORKER_TIMEOUT_S
        self.log.info("worker %s reached --max-requests while no other worker serves: it restarts once one does, "
                      "in %s s (--timeout) at most", self.pid, bound_s)
        deadline, served = time.monotonic() + bound_s, False
        while self.alive and not (served := self._stats.may_restart()):
            if time.monotonic() >= deadline:
                self.log.warning("worker %s: no restart turn came within %s s (--timeout) of its --max-requests (no "
                                 "other worker served, or another's restart held it): restarting all the same",
                                 self.pid, bound_s)
                break
            gevent.sleep(PUBLISH_S)
        if self.alive:
            if served:
                self.log.info("Autorestarting worker: another worker serves.")
            self.alive = False
            self._start_drain()

    def _outside_script_name(self, path: str) -> bool:
        """Whether path lies outside the operator's SCRIPT_NAME (none: nothing does): gunicorn strips its characters
        (`/apiv1/models` was served under `/api`) and answers a path not starting with them, as written (`/api` under
        `/api/`), with a 500; the prefix is a whole path segment, with or without its trailing slash."""
        prefix = self._script_name.rstrip("/")
        if not prefix:
            return False
        return not path.startswith(self._script_name) or (path != prefix and not path.startswith(f"{prefix}/"))

    def _closing_when_told(self, environ: WSGIEnvironment, start_response: StartResponse) -> object:
        """The app, whose answer closes the connection where it set CLOSE_CONNECTION. `start_response` is gunicorn's
        response's bound method."""
        if not self.alive:  # this request reached --max-requests: gunicorn's graceful exit, which SIGTERM's drains
            self._start_drain()
        body = None
        if gevent.getcurrent() in self._expecting:
            body = environ["wsgi.input"] = ContinueOnRead(environ["wsgi.input"], environ["gunicorn.socket"])

        def start(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> object:
            unread = environ.get(CLOSE_CONNECTION) or (body is not None and not body.sent)
            if unread or not self.alive:  # not alive: a request begun before the stop answers `Connection: close`
                start_response.__self__.force_close()
            if unread:
                self._unread.add(gevent.getcurrent())
            return start_response(status, headers, exc_info)

        if not self._engine.ready:  # not counted towards --max-requests though loaded by its end (handle_request)
            self._app_began_loading.add(gevent.getcurrent())
        answer = self._app(environ, start)
        if CLIENT_GONE in environ:  # nginx's 499 is for its log: it sends such a client nothing (a half-closed one
            if callable(close := getattr(answer, "close", None)):  # could read it)
                close()
            # its request id: gunicorn's access log, which names it, never sees this request
            self.log.info("%s %s: the client's end of stream came before its answer, taken for a close (%s): the "
                          "connection closed without one request_id=%s", environ["REQUEST_METHOD"],
                          environ["PATH_INFO"], CLIENT_CLOSED, environ[CLIENT_GONE])
            raise StopIteration
        return answer

    def run(self) -> None:
        from nanoqwen.wsgi import app, engine, start_engine

        # _closing_when_told's and handle_request's holds on gunicorn: fail here, not by answering as gunicorn would
        if not callable(getattr(Response, "force_close", None)):
            raise RuntimeError(f"gunicorn {gunicorn.__version__}: its Response has no force_close")
        if not hasattr(Request, "_expected_100_continue"):
            raise RuntimeError(f"gunicorn {gunicorn.__version__}: its Request has no _expected_100_continue")
        if getattr(ggevent, "Pool", None) is not Pool:  # GeventWorker.run makes each listener's pool by this name
            raise RuntimeError(f"gunicorn {gunicorn.__version__}: its gevent worker makes no gevent Pool")
        if RequestParser.mesg_class is not Request or not callable(getattr(Request, "read_into", None)):
            raise RuntimeError(f"gunicorn {gunicorn.__version__}: its parser reads no Request through read_into")
        ggevent.Pool = self._pool
        RequestParser.mesg_class = WaitedRequest
        self._send_timeout_s = app.extensions["nanoqwen.config"].send_timeout_s
        self._engine = engine
        self._app: WSGIApplication = self.wsgi
        self.wsgi = self._closing_when_told
        self._stats = app.extensions["nanoqwen.stats"]
        self._stats.serving = self._serving
        _freeze_imported_objects()
        if not self._wait_for_predecessors(engine.config):
            return
        start_engine(before_ready=_freeze_loaded_objects)
        gevent.spawn(self._exit_if_load_fails, engine)
        gevent.spawn(self._publish_stats, self._stats)
        try:
            if self._wait_while_a_sibling_serves():
                self._accepting = True
                gevent.spawn(self._make_room)
                super().run()
        finally:  # a graceful exit (SIGTERM, max_requests) keeps what requests recorded since the last publish
            self._stats.flush_metrics()
            if not engine.ready and engine.load_error is None and sys.exc_info()[0] in (None, SystemExit):
                # stopped while the model loads: waiting for the load serves no one, and finalizing the interpreter
                # beside the engine thread's native code aborted now and then (SIGABRT); a crash keeps its traceback
                self.log.info("Worker exiting before its model loaded (pid: %s)", self.pid)
                os._exit(0)

    def _wait_for_predecessors(self, config: EngineConfig) -> bool:
        """A reload's new worker takes the slot of an old one, which drains meanwhile (nanoqwen.gunicorn_conf's
        on_reload). Where its KV pool takes a share of the device's free memory (kv_pool_from_free_memory: CUDA) it
        loads and publishes once that one has gone and the master has forgotten it, so that the old one's memory is
        free; its imports overlap the old one's drain. Elsewhere it loads at once, the two sharing the slot meanwhile:
        waiting kept every new worker off the socket for the drain, none accepting (up to --graceful-timeout more:
        profiles/RESULTS.md, lane maxreq44fix). The wait ends, logged, PREDECESSOR_MARGIN_S past --graceful-timeout (a
        pid reused, a snapshot whose removal failed). False: stopped while it waited."""
        from nanoqwen.config import kv_pool_from_free_memory, resolve_device  # torch: never in the master

        if not self.nanoqwen_predecessors or not kv_pool_from_free_memory(config, resolve_device(config.device)):
            return True
        bound_s = self.cfg.graceful_timeout + PREDECESSOR_MARGIN_S
        deadline = time.monotonic() + bound_s
        while self.alive and not all(forgotten(pid) for pid in self.nanoqwen_predecessors):
            if time.monotonic() >= deadline:
                self.log.warning("worker %s: its predecessor(s) %s still there %s s after it began to wait "
                                 "(--graceful-timeout + %s s): loading all the same", self.pid,
                                 ", ".join(map(str, self.nanoqwen_predecessors)), bound_s, PREDECESSOR_MARGIN_S)
                break
            self.notify()  # gunicorn's heartbeat
            gevent.sleep(LOAD_POLL_S)
        return self.alive

    def _wait_while_a_sibling_serves(self) -> bool:
        """Keeps this worker off the shared listening socket while its model loads and another worker serves: idle, a
        loading worker accepted first and answered 503 model_loading that its ready sibling would have served (61 of
        80 requests under --max-requests 8 with 2 workers: profiles/RESULTS.md, lane scale43). It accepts once its
        model is loaded, or at once when no other worker serves (a lone worker, all of them loading, the old ones of
        a SIGHUP stopping); a run directory it cannot read is taken for none. False: stopped while it waited."""
        waited = False
        while self.alive and not self._engine.ready and self._stats.another_serves():
            if not waited:
                waited = True
                self.log.info("worker %s: %s", self.pid, OFF_SOCKET)
            self.notify()  # gunicorn's heartbeat: its master kills a silent worker at --timeout
            gevent.sleep(LOAD_POLL_S)
        return self.alive

    def _serving(self) -> bool:
        """What this worker's snapshot says its respawned siblings can leave to it (_wait_while_a_sibling_serves)."""
        return self._accepting and self.alive and self._engine.ready

    def _pool(self, size: int) -> Pool:
        pool = Pool(size)
        self._pools.append(pool)
        return pool

    def _make_room(self) -> None:
        """With every connection slot of a listener taken and a client waiting in its backlog, closes its connections
        idle longest: keep-alive ones and, unlike nginx (which reclaims only connections that sent nothing), ones
        whose request head is not yet whole (slowloris). 1000 connections that sent nothing held every slot for the
        keep-alive timeout (75 s), and every new client, /health's too, waited that long. gevent's server accepts
        again once a closed one's greenlet has ended."""
        # run once the worker's run() yields, by when GeventWorker.run has made one pool a listener, in their order
        if len(self._pools) != len(self.sockets):
            self.log.error("gunicorn %s made %d connection pools for %d listeners: idle connections will not make "
                           "room for new ones", gunicorn.__version__, len(self._pools), len(self.sockets))
            return
        try:
            while self.alive:
                gevent.sleep(ROOM_POLL_S)
                for listener, pool in zip(self.sockets, self._pools, strict=True):
                    while self.alive and pool.full() and select.select([listener], [], [], 0)[0]:
                        if not self._end_oldest_wait(pool):
                            break
                        gevent.sleep(ROOM_POLL_S / 10)  # its slot freed and the waiting client accepted
        except (OSError, ValueError):  # a listener closed: shutting down
            return

    def _end_oldest_wait(self, pool: Pool) -> bool:
        """Ends the oldest keep-alive wait of the pool's connections (popped: a second end could land outside the
        wait); False where none of them waits."""
        greenlet = next((g for g in self._idle if g in pool), None)
        if greenlet is None:
            return False
        _end_wait(greenlet, self._idle.pop(greenlet))
        return True

    def _publish_stats(self, stats: ServerStats) -> None:
        """Keeps this worker's /stats entry and metrics fresh for the other workers' scrapes. A snapshot's write or a
        metrics' map that fails (a full disk, the run directory gone) is logged once per kind and tried again each
        PUBLISH_S."""
        failed: set[str] = set()
        while True:
            try:
                stats.publish()
            except OSError as exc:
                kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                if kind not in failed:
                    failed.add(kind)
                    self.log.warning("worker %s: its statistics are not published, tried again every %s s: %s",
                                     self.pid, PUBLISH_S, exc)
            else:
                if failed:
                    self.log.info("worker %s: its statistics are published again", self.pid)
                    failed.clear()
            gevent.sleep(PUBLISH_S)

    def _exit_if_load_fails(self, engine: Engine) -> None:
        while not engine.ready:
            if engine.load_error is not None:  # the engine logged why
                sys.exit(Arbiter.WORKER_BOOT_ERROR)  # gevent re-raises SystemExit in the main greenlet
            gevent.sleep(LOAD_POLL_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # SIGTERM: graceful shutdown
        super().handle_exit(sig, frame)
        self._start_drain()

    def _start_drain(self) -> None:
        """Once: an idle keep-alive connection (a client's pool, nginx's) held the exit until it closed, up to the
        graceful timeout, and no worker accepted meanwhile."""
        if not self._draining:
            self._draining = True
            gevent.spawn(self._drain)

    def _end_after_stop(self, greenlet: gevent.Greenlet, timeout: gevent.Timeout) -> None:
        """Ends a keep-alive wait past the stop `wait_s` later unless its request's head has begun to come, which has
        as long again to be whole: a head begun before the mark and whole after it met the close (no answer, the rest
        of it reset). Both within half the graceful timeout, so that gevent's run loop (its check each second) sees
        the connections done before the master's kill."""
        wait_s = min(STOPPING_WAIT_S, self.cfg.graceful_timeout / 4)
        gevent.sleep(wait_s)  # a request already on its way is served
        _end_wait(greenlet, timeout, begun_too=False)
        gevent.sleep(wait_s)
        _end_wait(greenlet, timeout)

    def _drain(self) -> None:
        if self._accepting:  # that it no longer serves, said at once: a respawned sibling waiting for it accepts
            with contextlib.suppress(OSError):  # the publish loop logs it, and says it within PUBLISH_S
                self._stats.publish()
        for greenlet, timeout in list(self._idle.items()):  # as a wait begun after the stop
            gevent.spawn(self._end_after_stop, greenlet, timeout)
        # gevent's run loop checks every second whether its connections are done, and the master
        # kills the worker at `grace`: fail what still runs early enough for both.
        grace = self.cfg.graceful_timeout
        gevent.sleep(grace - min(1.5, grace / 2))
        from nanoqwen.wsgi import engine

        engine.fail_all(SHUTDOWN_MESSAGE, refuse_later=True)
