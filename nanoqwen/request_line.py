"""A request's head checked as gunicorn parses it: a request line refused at its first byte that cannot be one, and
an HTTP/1.1 request without Host, or any with a Host that is not one, refused once its head is whole.

gunicorn reads a request line until its CRLF (or 4 KiB) before it looks at it, so a TLS ClientHello sent to this
plain-HTTP port (`https://` on an `http://` server) or other binary bytes without a line feed got no answer, and held
their connection slot, until the keep-alive timeout (75 s). nginx and uvicorn (httptools) check a request line byte by
byte and answer `400` at the first byte it cannot hold: so does this, through gunicorn's own refusal of a bad request
line (a JSON 400, `Connection: close`). Only bytes gunicorn would refuse once the line were whole are refused early:
a line is visible ASCII and spaces (RFC 9112 3: a method token, a target of visible ASCII, the version), after at most
one empty line (RFC 9112 2.2); slow (byte by byte) and pipelined requests read as before. With `proxy_protocol` on,
a connection's first request is not checked early (its PROXY header, v2 binary, comes first): it gets gunicorn's own
refusal once its line is whole.

RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header (gunicorn refuses a second one
itself, as a singleton field, and served one without; HTTP/1.0 has no Host to require), and to any whose Host is not
a valid `uri-host [":" port]` (RFC 3986 3.2.2; empty where the target has no authority). A comma, valid in a reg-name
but in no host name, is refused too: it is how two Host lines read once a proxy joins them into one (RFC 9110 5.3).
So is a name werkzeug's routing cannot encode as IDNA (an empty label, one past 63 characters), which it refused later
with a vaguer 400 ("The browser (or proxy) sent a request ...") on a connection kept open. An IPv6 zone id
(`[fe80::1%25eth0]`, RFC 6874) is no RFC 3986 IP-literal: RFC 6874 4 has clients and proxies remove it before sending.
A target in absolute-form (`GET http://name/path`) names the host in the Host header's place (RFC 9112 3.2.2): its
authority is held to the same syntax, and an http URI must name a host (RFC 9110 4.2.1: `http:///x`, `http://:80/x`
are invalid); these were a 403 on a loopback listener (api/hosts.py) and served on any other. Its scheme must be
http or https, the URIs an HTTP server is the origin of (RFC 9110 4.2; RFC 9110 7.4: a server does not process a
request for a target outside its authority), and it carries no userinfo (`user:password@`: RFC 9110 4.2.4 has a
recipient treat it as an error); both were served. An empty path is `/` (RFC 9110 4.2.3): `GET http://h` was a 404
naming the empty path. A port, in the Host header or the target, is at most 65535 (RFC 9293 3.1: 16 bits; WHATWG URL
refuses one past it): `h:99999` was served.

RFC 9110 6.2: a server answers in the highest version it conforms to whose major version is at most the request's:
an `HTTP/1.2` request (gunicorn parses any `HTTP/1.x`) is answered `HTTP/1.1` and served as one, as nginx and h11
(uvicorn) do; gunicorn echoed `HTTP/1.2 200 OK`, and SERVER_PROTOCOL read as no HTTP/1.1 (serving.probe_interim took
a half-closed client of it for gone).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gunicorn.http.errors import InvalidHeader, InvalidRequestLine
from gunicorn.http.message import Request

# what the start of a request may be while its line is incomplete: its CR may have come without the LF yet
LINE_SO_FAR = re.compile(rb"(?:\r\n)?[\x20-\x7e]*(?:\r\n|\r?\Z)")
HEAD_LINE = re.compile(rb"(?:\r\n)?HEAD ")  # a request line of a HEAD, before gunicorn splits it (its method)
SHOWN_BYTES = 16  # of a refused start, in the log and the answer (escaped by repr)
# IP-literal (IPv6 and IPvFuture, loosely) or reg-name less the comma, then an optional port
HOST = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|(?:[A-Za-z0-9._~!$&'()*+;=-]|%[0-9A-Fa-f]{2})*)(?::(?P<port>[0-9]*))?")
MAX_PORT = 65535
# RFC 9112 3.2.2: a request-target in absolute-form, its scheme and its authority (which names the host)
ABSOLUTE_FORM = re.compile(r"([a-z][a-z0-9+.-]*)://([^/?#]*)", re.IGNORECASE)
SCHEMES = ("http", "https")
VERSION = (1, 1)  # the highest HTTP/1 this server conforms to


class MissingHost(InvalidHeader):
    """gunicorn answers an InvalidHeader with a 400 of str(exc), in our envelope with `Connection: close`."""

    def __str__(self) -> str:
        return "An HTTP/1.1 request must send a Host header (RFC 9112 3.2)."


class InvalidHost(InvalidHeader):
    """`hdr`: the Host's value."""

    def __str__(self) -> str:
        return f"The Host header must be a host name or address and an optional port up to {MAX_PORT} (RFC 9112 " \
               f"3.2), not " \
               f"{self.hdr[:SHOWN_BYTES * 4]!r}."


class InvalidTarget(InvalidHeader):
    """`hdr`: why the absolute-form target is refused (AbsoluteTarget.refusal)."""

    def __str__(self) -> str:
        return self.hdr


def refused_method(exc: BaseException) -> str | None:
    """The method of a request whose head gunicorn or CheckedRequest refused, where its request line was read."""
    return getattr(exc, "request_method", None)


class CheckedRequest(Request):
    """gunicorn's Request, whose head's reads check the request line received so far, and whose parsed head has a
    valid Host, where HTTP/1.1 requires one, and a valid authority in an absolute-form target. Both of gunicorn's
    parsers (its Python one and gunicorn_h1c's) read the head through read_into, and through parse: while the request
    line is not parsed (`method` unset), the buffer starts with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """gunicorn reads and checks the head here (parse, then its body's framing): where it is refused, the method
        read is kept on the error (a HEAD's, where its line was refused before gunicorn split it: too long, a bare LF),
        as gunicorn's handle_error is given no request for most (nanoqwen.worker answers a HEAD without a body)."""
        self._head_line = False  # the request line read starts as a HEAD's: its refusals before its split too
        try:
            super().__init__(*args, **kwargs)
        except Exception as exc:
            exc.request_method = self.method or ("HEAD" if self._head_line else None)  # type: ignore[attr-defined]
            raise

    def read_into(self, unreader: Any, buf: bytearray, stop: bool = False) -> None:
        super().read_into(unreader, buf, stop)
        if self.method is None:
            self._head_line = HEAD_LINE.match(buf) is not None
        # a PROXY protocol v2 header (binary) comes before the first request when enabled
        if self.method is None and not LINE_SO_FAR.match(buf) and (
                self.req_number > 1 or self.cfg.proxy_protocol == "off"):
            raise InvalidRequestLine(bytes(buf[:SHOWN_BYTES]))

    def parse(self, unreader: Any) -> bytes:
        rest = super().parse(unreader)
        self.version = min(self.version, VERSION)  # the answer's status line and SERVER_PROTOCOL
        hosts = [value for name, value in self.headers if name == "HOST"]  # one at most: gunicorn refuses a second
        if self.version >= (1, 1) and not hosts:
            raise MissingHost("Host", req=self)
        if hosts and not valid_host(hosts[0]):
            raise InvalidHost(hosts[0], req=self)
        absolute = absolute_target(self.uri)
        if absolute is not None and absolute.refusal is not None:
            raise InvalidTarget(absolute.refusal, req=self)
        if not self.path and absolute is not None:  # gunicorn's path of `http://h` or `http://h?q`
            self.path = "*" if self.method == "OPTIONS" else "/"  # RFC 9112 3.2.4: OPTIONS's is the server, as `*`
        return rest


@dataclass(frozen=True)
class AbsoluteTarget:
    """A request target in absolute-form: its authority (host and port), and why it is refused (the module's
    docstring; None: served). One parse for the head's check and the Host check (api/hosts.py), each making its own
    (hosts.py also serves without nanoqwen's worker): microseconds, an origin-form target ends at its first `/`."""

    authority: str
    refusal: str | None


def absolute_target(target: str) -> AbsoluteTarget | None:
    """None for a target in any other form."""
    absolute = ABSOLUTE_FORM.match(target)
    return None if absolute is None else AbsoluteTarget(absolute[2], _refusal(absolute[1], absolute[2]))


def _refusal(scheme: str, authority: str) -> str | None:
    if scheme.lower() not in SCHEMES:
        return f"A request target in absolute-form must be an http or https URI (RFC 9112 3.2.2, RFC 9110 4.2), not " \
               f"{scheme[:SHOWN_BYTES]!r}."
    if "@" in authority:  # not shown: it holds a password
        return "A request target must not carry userinfo (`user:password@`): RFC 9110 4.2.4 has its recipient treat " \
               "it as an error."
    # RFC 9110 4.2.1: an http URI without a host is invalid
    if not (authority.partition(":")[0] and valid_host(authority)):
        return f"A request target in absolute-form must name a host and an optional port up to {MAX_PORT} (RFC 9112 " \
               f"3.2.2, RFC 9110 4.2.1), not {authority[:SHOWN_BYTES * 4]!r}."
    return None


def valid_host(host: str) -> bool:
    """Whether `host` is a `uri-host [":" port]`, its port at most MAX_PORT, that werkzeug's routing takes."""
    return bool(syntax := HOST.fullmatch(host)) and _valid_port(syntax["port"] or "") and _routable(host)


def _valid_port(port: str) -> bool:
    digits = port.lstrip("0")
    return len(digits) <= len(str(MAX_PORT)) and int(digits or 0) <= MAX_PORT  # no int() of thousands of digits


def _routable(host: str) -> bool:
    """Whether werkzeug's routing takes the name (Map.bind: lowered, before any ':', encoded as IDNA)."""
    try:
        host.lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True
