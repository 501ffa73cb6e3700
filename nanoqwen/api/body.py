"""The request body: read within a deadline, parsed as strict UTF-8 JSON, checked for what the schema cannot see.

Python's json accepts lone UTF-16 surrogates (as `\\ud800` escapes, and as raw `ED A0 80` bytes,
which it decodes with `surrogatepass`), NaN/Infinity, and recurses once per nesting level; none
of that may reach the tokenizer, the schema or an error message.

Parsing and validating run on the event loop and cost time per JSON value, not per byte: a body
of a million tiny values (8 MiB of `1,` or of `"k":0,`) held the loop for seconds. Its values are
bounded before it is parsed, by counting the separators outside strings (C-speed byte scans).
"""
from __future__ import annotations

import codecs
import contextlib
import json
import re
import socket
from typing import Any

import gevent
from flask import Request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import RequestEntityTooLarge

from nanoqwen.api.errors import APIError, param_name

READ_CHUNK = 64 << 10
MAX_DEPTH = 64  # the deepest field of a valid request is ~5 levels down
# `,` and `:` outside strings: a full 40,960-token context as token ids takes 40,959
MAX_SEPARATORS = 1 << 16
_SURROGATE = re.compile("[\ud800-\udfff]")
# Decoded on the loop, so only C-speed codecs (punycode took 0.36 s per 100 kB, idna and the escape codecs are no
# charsets); Python's names for them, as codecs.lookup normalises.
CHARSETS = frozenset({"ascii", "iso8859-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                      "utf-32-be"})


class _BodyTimeout(Exception):
    pass


def _stop_reading(environ: dict[str, Any]) -> None:
    """After a failed read the rest of the body is garbage or never comes: EOF the connection's read
    side so that gunicorn, which drains the body before the next keep-alive request, closes it."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)


def _read_yielding(request: Request) -> bytes:
    """The body in chunks, letting the loop run between them: a recv whose data has already arrived
    returns without switching greenlets, so reading megabytes in one call held the loop."""
    stream = request.stream  # raises 413 when the Content-Length is past MAX_CONTENT_LENGTH
    chunks = []
    # a read past the limit raises 413 even where the body ended just at it (chunked, exactly 8 MiB)
    while not stream.is_exhausted and (chunk := stream.read(READ_CHUNK)):
        chunks.append(chunk)
        gevent.sleep(0)
    if stream.is_exhausted and request.environ["wsgi.input"].read(1):  # a chunked body past the limit
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _check_codings(request: Request) -> None:
    """A compressed body is refused, not parsed as if it were plain: we decode no Content-Encoding, and no
    transfer coding but chunked (gunicorn passes `Transfer-Encoding: gzip, chunked` on undecoded)."""
    for header, allowed in (("Content-Encoding", ("", "identity")), ("Transfer-Encoding", ("", "chunked"))):
        codings = [c.strip() for c in request.headers.get(header, "").lower().split(",")]
        if unsupported := [c for c in codings if c not in allowed]:
            _stop_reading(request.environ)
            raise APIError(415, f"Unsupported {header} '{unsupported[0]}': send the body uncompressed.",
                           code="unsupported_media_type")


def _codec(charset: str) -> str | None:
    with contextlib.suppress(LookupError):
        return codecs.lookup(charset).name
    return None


def _as_utf8(request: Request, data: bytes) -> bytes:
    """The body re-encoded from the charset its Content-Type declares (UTF-8 when it declares none)."""
    charset = request.mimetype_params.get("charset", "utf-8").strip().lower()
    codec = _codec(charset)
    if codec == "utf-8":
        return data
    if codec not in CHARSETS:
        raise APIError(415, f"Unsupported charset '{charset}' in the Content-Type (send UTF-8).",
                       code="unsupported_media_type")
    try:
        return data.decode(codec).encode("utf-8")
    except UnicodeError:
        raise APIError(400, f"The request body is not valid {charset}.") from None


def read_body(request: Request, timeout_s: float) -> bytes:
    """The body as UTF-8 bytes, or 408 when it takes longer than timeout_s to arrive (stalled uploads
    hold a worker connection each), 400 when it is malformed (bad chunked framing, cut short: the
    client closed before its Content-Length), 413 past the size limit (the connection then closes:
    gunicorn would read the rest to reuse it), 415 for a Content-Encoding or charset we do not decode."""
    _check_codings(request)
    try:
        with gevent.Timeout(timeout_s, _BodyTimeout):
            data = _read_yielding(request)
        if request.content_length is not None and len(data) < request.content_length:
            raise ValueError("the body ended before its Content-Length")
        return _as_utf8(request, data)
    except RequestEntityTooLarge:
        _stop_reading(request.environ)
        raise
    except _BodyTimeout:
        _stop_reading(request.environ)
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} seconds.",
                       code="request_timeout") from None
    except (ParseException, OSError, ValueError):
        _stop_reading(request.environ)
        raise APIError(400, "We could not read the body of your request (malformed or incomplete).") from None


class JSONError(ValueError):
    """A JSON text refused: `status` 400, or 413 for more values than a request needs; `path`: the value at fault."""

    def __init__(self, message: str, status: int = 400, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.path = path


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(value: Any, what: str) -> None:
    """Iteratively (a recursive walk would hit the recursion limit json.loads just passed)."""
    if isinstance(value, str) and _SURROGATE.search(value):  # a string's JSON alone (a model's call name)
        raise JSONError(f"{what} contains a lone UTF-16 surrogate (not valid Unicode).")
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)] if isinstance(value, (dict, list)) else []
    while stack:
        path, node = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise JSONError(f"{what} is nested more than {MAX_DEPTH} levels deep.")
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                raise JSONError(f"A key in {what} contains a lone UTF-16 surrogate.", path=path)
            if isinstance(child, str):
                if not child.isascii() and _SURROGATE.search(child):
                    raise JSONError(f"Invalid value for '{param_name(path + (key,))}' in {what}: the string contains "
                                    "a lone UTF-16 surrogate (not valid Unicode).", path=path + (key,))
            elif isinstance(child, (dict, list)):
                stack.append((path + (key,), child))


def _too_many_values(data: bytes) -> bool:
    """Whether `data` has more than MAX_SEPARATORS separators outside its strings (escaped
    quotes and backslashes removed first, so that every `"` left opens or closes a string)."""
    if data.count(b",") + data.count(b":") <= MAX_SEPARATORS:
        return False
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    if data.count(b'"') > 2 * (MAX_SEPARATORS + 1):  # a value per pair of quotes: more values than the limit
        return True
    outside = b"".join(data.split(b'"')[::2])
    return outside.count(b",") + outside.count(b":") > MAX_SEPARATORS


def load_json(data: bytes, what: str) -> Any:
    """Decoded JSON, within the limits on a request's values and depth; JSONError, its message naming
    `what` ("the JSON body"), for anything that is not strict JSON in valid Unicode."""
    if _too_many_values(data):
        raise JSONError(f"{what} has more than {MAX_SEPARATORS} values in all.", status=413)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONError(f"{what} is not valid UTF-8.") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise JSONError(f"{what} is nested too deeply.") from None
    except ValueError:
        raise JSONError(f"{what} is not valid JSON.") from None
    _check_tree(value, what)
    return value


def parse_json(data: bytes) -> Any:
    """The request body decoded; 400 for anything that is not strict JSON in valid Unicode, 413 for more
    values than a request needs."""
    try:
        return load_json(data, "the JSON body")
    except JSONError as exc:
        if exc.status == 413:
            raise APIError(413, f"{exc} Send a large batch as several requests.", code="request_too_large") from None
        message = str(exc)
        raise APIError(400, message[0].upper() + message[1:], param=param_name(exc.path) or None) from None


def loads_strict(text: str) -> Any:
    """JSON inside a string (a tool call's arguments, from a client or the model) held to a body's rules;
    ValueError (JSONError) for anything a body is refused for: json.loads alone raised RecursionError past
    ~1000 levels and passed NaN and lone surrogates on to the template or the answer."""
    return load_json(text.encode("utf-8", "surrogatepass"), "the string")
