"""The request body: read within a deadline, decoded, parsed as strict JSON (nanoqwen.api.strict_json)."""
from __future__ import annotations

import contextlib
import encodings
import json
from encodings.aliases import aliases
from typing import Any, NamedTuple

import gevent
from flask import Request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from nanoqwen.api import strict_json
from nanoqwen.api.errors import APIError, param_name, request_too_large
from nanoqwen.api.strict_json import Budget, JSONError

READ_CHUNK = 64 << 10
# Set in the environ when the connection must close after the answer (nanoqwen.worker does it).
CLOSE_CONNECTION = "nanoqwen.close_connection"
# nginx's status for "client closed request", for the log: nanoqwen's worker closes such a connection without an answer
CLIENT_CLOSED = 499
# Set in the environ, to the request's id, where the client was taken for gone before its answer (nanoqwen.worker)
CLIENT_GONE = "nanoqwen.client_gone"
BODY_READ = "nanoqwen.body_read"  # set when the app reads the body
# The codecs a body may be in, by Python's name; a client's charset maps to one through Python's own alias table
# (utf_8, utf-16-le, l1, cp819, iso_8859-1:1987...) by dict lookups. Never codecs.lookup: it caches every name it
# is asked for, failed ones too (an 8 KB name leaked 8 KB a request), and knows codecs that are no charsets (idna,
# the escape codecs) or too slow for the loop (punycode: 0.36 s per 100 kB).
# Decoded once, on the loop: 8 MiB takes milliseconds (UTF-8, latin-1) to tens of them (cp1252, a charmap).
CODECS = frozenset({"utf_8", "ascii", "latin_1", "cp1252", "utf_16", "utf_16_le", "utf_16_be", "utf_32", "utf_32_le",
                    "utf_32_be"})
ASCII_COMPATIBLE = frozenset({"utf_8", "ascii", "latin_1", "cp1252"})  # a JSON text's `,` `:` `"` `\\` are its bytes


class Body(NamedTuple):
    text: str
    raw: bytes | None  # the bytes, where they are in an ASCII-compatible charset


class ParsedBody(NamedTuple):
    value: Any
    budget: Budget  # what the body leaves of the request's values, to the JSON in its strings


class _BodyTimeout(Exception):
    pass


def _stop_reading(environ: dict[str, Any]) -> None:
    """After a failed read the rest of the body is garbage or never comes: the connection closes after the answer
    (nanoqwen's worker: `Connection: close`, then it reads and drops what still comes for a while), never read for
    the next request."""
    environ[CLOSE_CONNECTION] = True


def _chunked(request: Request) -> bool:
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def close_if_unread(request: Request) -> None:
    """A body the app did not read (an answer before it: 404, 405, 401; a GET with a body) past READ_CHUNK, or of a
    length not known (chunked), closes the connection after the answer: gunicorn reads what is left before the next
    request in one go, and a local client's 50 MB held the loop for 0.6 s."""
    environ = request.environ
    if environ.get(BODY_READ) or environ.get(CLOSE_CONNECTION):
        return
    length = request.content_length
    if (length or 0) > READ_CHUNK or (length is None and _chunked(request)):
        _stop_reading(environ)


def _read_yielding(request: Request) -> bytes:
    """The body in chunks, letting the loop run between them: a recv whose data has already arrived
    returns without switching greenlets, so reading megabytes in one call held the loop."""
    stream = request.stream  # raises 413 when the Content-Length is past MAX_CONTENT_LENGTH
    chunks = []
    # a read past the limit raises 413 even where the body ended just at it (chunked, exactly 8 MiB)
    while not stream.is_exhausted and (chunk := stream.read(READ_CHUNK)):
        chunks.append(chunk)
        if not stream.is_exhausted:  # none after a Content-Length body's last read (most requests: one read)
            gevent.sleep(0)
    if stream.is_exhausted and request.environ["wsgi.input"].read(1):  # a chunked body past the limit
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _check_codings(request: Request) -> None:
    """A compressed body is refused, not parsed as if it were plain: we decode no Content-Encoding, and no
    transfer coding but chunked. gunicorn refuses the other transfer codings itself (400, 501 for an unknown
    one) but passes `gzip, chunked` (and deflate, compress) on undecoded, and `identity, chunked` as chunked."""
    for header, allowed in (("Content-Encoding", ("", "identity")),
                            ("Transfer-Encoding", ("", "identity", "chunked"))):
        codings = [c.strip() for c in request.headers.get(header, "").lower().split(",")]
        if unsupported := [c for c in codings if c not in allowed]:
            _stop_reading(request.environ)
            raise APIError(415, f"Unsupported {header} '{unsupported[0]}': send the body uncompressed.",
                           code="unsupported_media_type")


def _check_media_type(request: Request) -> None:
    """A body labelled anything but `application/json` is refused, as vLLM refuses it, and so is an unlabelled one a
    browser page sent (it says its `Origin`); an unlabelled one from anything else (a raw client, requests' data=)
    is read as JSON. A page may POST a body unlabelled or labelled text/plain, a form or multipart to any origin with
    no CORS preflight: read as JSON, any page its user opened could make the server generate."""
    if request.mimetype == "application/json" or not (request.mimetype or "Origin" in request.headers):
        return
    _stop_reading(request.environ)
    label = request.headers.get("Content-Type", "")[:100]
    what = f"Unsupported Content-Type '{label}'" if label else "A body with no Content-Type from a web page (Origin)"
    raise APIError(415, f"{what}: send it as application/json.", code="unsupported_media_type")


def _codec_of(charset: str) -> str | None:
    """The codec in CODECS that `charset` (any case) names, as encodings' search function resolves a name."""
    name = encodings.normalize_encoding(charset.lower())
    codec = aliases.get(name) or aliases.get(name.replace(".", "_")) or name
    return codec if codec in CODECS else None


def _charset(request: Request) -> tuple[str, str | None]:
    """(the charset the Content-Type names, lower-cased, UTF-8 when none; its codec, None for one outside CODECS)."""
    charset = request.mimetype_params.get("charset", "utf-8").strip().lower()
    return charset, _codec_of(charset)


def _decode(data: bytes, charset: str, codec: str | None) -> Body:
    """The body's text. vLLM ignores the label and reads the bytes as json.loads does: UTF-8, or UTF-16/32 or
    UTF-8 with a BOM where json.detect_encoding sees one (or the NULs of UTF-16/32 in the first bytes); a JSON
    text starts with an ASCII character, so that reading is unambiguous. So do we, whatever the label; only a
    body that is not valid there is read in its label's charset (latin-1 text that is not UTF-8, say: old Java
    clients label UTF-8 ISO-8859-1 too, and Starlette reads UTF-8 there as well). A body still undecodable: 415
    naming an unknown label, else 400."""
    detected = json.detect_encoding(data)
    with contextlib.suppress(UnicodeDecodeError):
        return Body(data.decode(detected), data if detected in ("utf-8", "utf-8-sig") else None)
    if codec is None:
        raise APIError(415, f"Unsupported charset '{charset[:100]}' in the Content-Type, and the body is not valid "
                       "UTF-8, UTF-16 or UTF-32 (send UTF-8).", code="unsupported_media_type")
    if codec != _codec_of(detected):  # the label's own charset, where it is not the one just tried
        with contextlib.suppress(UnicodeDecodeError):
            return Body(data.decode(codec), data if codec in ASCII_COMPATIBLE else None)
    raise APIError(400, f"The request body is not valid {charset}.")


def read_body(request: Request, timeout_s: float) -> Body:
    """The body's text, decoded from the charset its Content-Type names, or 408 when it takes longer than
    timeout_s to arrive (stalled uploads hold a worker connection each), 400 when it is malformed (bad
    chunked framing, cut short: the client closed before its Content-Length), 413 past the size limit
    (the connection then closes: gunicorn would read the rest to reuse it), 415 for a Content-Encoding
    we do not decode, a Content-Type not JSON (_check_media_type), or a charset we do not decode on a body that is
    not valid UTF-8, UTF-16 or UTF-32; 411 when the request says neither its Content-Length nor chunked (gunicorn
    reads no body then)."""
    request.environ[BODY_READ] = True
    _check_codings(request)
    _check_media_type(request)
    if request.content_length is None and not _chunked(request):
        _stop_reading(request.environ)  # the body the client sends anyway is not a next request
        raise APIError(411, "This request needs a body: send a Content-Length header (or a chunked "
                       "Transfer-Encoding).", code="length_required")
    charset, codec = _charset(request)
    try:
        with gevent.Timeout(timeout_s, _BodyTimeout):
            data = _read_yielding(request)
        if request.content_length is not None and len(data) < request.content_length:
            raise ValueError("the body ended before its Content-Length")
        return _decode(data, charset, codec)
    except RequestEntityTooLarge:
        _stop_reading(request.environ)
        raise
    except _BodyTimeout:
        _stop_reading(request.environ)
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} seconds.",
                       code="request_timeout") from None
    # werkzeug's stream turns a read's error (gunicorn's NoMoreData: a chunked body cut short) into
    # ClientDisconnected, a 400 of its own wording that left the connection open
    except (ParseException, OSError, ValueError, ClientDisconnected):
        _stop_reading(request.environ)
        raise APIError(400, "We could not read the body of your request (malformed or incomplete).") from None


def parse_json(text: str, raw: bytes | None = None) -> ParsedBody:
    """The request body's JSON (`raw`: as strict_json.loads) and its values charged, in the parse, to the request's
    budget; 400 for anything that is not strict JSON in valid Unicode, 413 for more values than a request needs."""
    budget = Budget()
    try:
        return ParsedBody(strict_json.loads(text, "the JSON body", raw, budget, fields=True), budget)
    except JSONError as exc:
        if exc.status == 413:
            raise request_too_large(str(exc)) from None
        message = str(exc)
        raise APIError(400, message[0].upper() + message[1:], param=param_name(exc.path) or None) from None
