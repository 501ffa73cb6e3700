"""nanoqwen.request_line on gunicorn's own parser, fed a request in pieces as a socket delivers them."""
from __future__ import annotations

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import InvalidRequestLine
from gunicorn.http.parser import RequestParser

from nanoqwen.request_line import CheckedRequest, InvalidHost, InvalidTarget

REQUEST = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nX-Latin: caf\xe9\r\nContent-Length: 2\r\n\r\n{}"


class CheckedParser(RequestParser):
    mesg_class = CheckedRequest


def _requests(pieces: list[bytes]) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of each request parsed from `pieces`, each delivered as one read."""
    return [(req.method, req.path, req.body.read()) for req in CheckedParser(Config(), iter(pieces), ("127.0.0.1", 1))]


@pytest.mark.parametrize("raw", [REQUEST, b"\r\n" + REQUEST, REQUEST + REQUEST], ids=["plain", "empty-line-first",
                                                                                       "pipelined"])
def test_requests_read_byte_by_byte_or_whole_are_parsed(raw: bytes) -> None:
    """Each prefix of a request line is checked as it comes (a CR awaiting its LF too), and nothing past the line: a
    header's obs-text byte is gunicorn's to judge."""
    whole = _requests([raw])
    assert whole == _requests([raw[i:i + 1] for i in range(len(raw))])
    assert whole[0] == ("POST", "/v1/chat/completions", b"{}") and len(whole) == raw.count(b"POST")


@pytest.mark.parametrize("raw", [b"\x16\x03\x01\x02\x00\x01", b"GET /\x00", b"GET /\xff", b"GET\t/", b"\r\x00",
                                 b"GET / HTTP/1.1\rX"])
def test_the_first_byte_no_request_line_holds_is_refused(raw: bytes) -> None:
    """Refused at the read that brought it, never waiting for the line's end (the pieces after it are not read)."""
    with pytest.raises(InvalidRequestLine):
        _requests([raw, *(b"ignored" for _ in range(1000))])


def test_a_bad_byte_after_a_served_request_is_refused_in_the_next_one() -> None:
    parser = CheckedParser(Config(), iter([REQUEST, b"\x16\x03"]), ("127.0.0.1", 1))
    assert next(parser).body.read() == b"{}"
    with pytest.raises(InvalidRequestLine):
        next(parser)


@pytest.mark.parametrize("version, served", [("1.0", (1, 0)), ("1.1", (1, 1)), ("1.2", (1, 1)), ("1.9", (1, 1))])
def test_a_later_http_1_minor_version_is_served_as_http_1_1(version: str, served: tuple[int, int]) -> None:
    """RFC 9110 6.2: answered in the highest version this server conforms to (gunicorn echoed `HTTP/1.2`)."""
    raw = REQUEST.replace(b"HTTP/1.1", f"HTTP/{version}".encode())
    assert [req.version for req in CheckedParser(Config(), iter([raw]), ("127.0.0.1", 1))] == [served]


@pytest.mark.parametrize("host", ["h", "localhost:8000", "10.0.0.11:8000", "[::1]:8000", "my-host.example", "a%20b",
                                  "", "h:", "h:65535", "h:0080"])
def test_a_valid_host_is_served(host: str) -> None:
    assert _requests([REQUEST.replace(b"Host: h", f"Host: {host}".encode())])[0][2] == b"{}"


@pytest.mark.parametrize("host", ["a,b", "a, b", "a b", "h/x", "h:80x", "[::1", "%zz", "h@x", "caf\xe9", "a..b",
                                  ".a:80", "a" * 64 + ".example", "h:65536", "h:99999", "[::1]:123456",
                                  pytest.param("h:" + "9" * 5000, id="h:9x5000")])
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_an_invalid_host_is_refused(host: str, version: str) -> None:
    """RFC 9112 3.2: a 400 for a Host that is no `host[:port]` (a list value, two hosts joined, was served), or whose
    port is past 65535 (RFC 9293 3.1: 16 bits; it was served)."""
    raw = REQUEST.replace(b"Host: h", f"Host: {host}".encode("latin-1"))
    raw = raw.replace(b"HTTP/1.1", f"HTTP/{version}".encode())
    with pytest.raises(InvalidHost, match="RFC 9112 3.2"):
        _requests([raw])


@pytest.mark.parametrize("host", ["[fe80::1%25eth0]:8000", "[fe80::1%eth0]", "[fe80::1%25eth0]"])
def test_an_ipv6_zone_id_in_host_is_refused(host: str) -> None:
    """Kept a 400: RFC 9110's uri-host is RFC 3986's host, whose IP-literal has no zone id; RFC 6874 (which wrote one
    into URIs as `%25`) says in 4 that an HTTP client or proxy MUST remove it before it sends a URI (the zone means
    something on the sending host alone). werkzeug's own host pattern refuses it too; nginx passes it on."""
    with pytest.raises(InvalidHost, match="RFC 9112 3.2"):
        _requests([REQUEST.replace(b"Host: h", f"Host: {host}".encode())])


@pytest.mark.parametrize("target, path", [("http://h/v1", "/v1"), ("HTTPS://h:8000/v1", "/v1"),
                                          ("http://[::1]:65535/v1", "/v1"), ("http://h", "/"), ("http://h?x", "/")])
def test_an_absolute_form_targets_valid_authority_is_served(target: str, path: str) -> None:
    """RFC 9110 4.2.3: an empty path is `/` (it was served as the empty path: a 404 naming none)."""
    assert _requests([REQUEST.replace(b"/v1/chat/completions?x=1", target.encode())])[0][1:] == (path, b"{}")


def test_options_of_an_absolute_form_target_with_no_path_asks_about_the_server() -> None:
    """RFC 9112 3.2.4: `OPTIONS http://h:8000` is the server as a whole, forwarded as `OPTIONS *` (it was `/`:
    a 404)."""
    raw = REQUEST.replace(b"POST /v1/chat/completions?x=1", b"OPTIONS http://h:8000")
    assert _requests([raw])[0][:2] == ("OPTIONS", "*")


@pytest.mark.parametrize("target", ["http:///v1", "http://:80/v1", "http://[::1]evil/v1", "http://a,b/",
                                    "http://%zz/", "http://a..b/", "http://h:80x/", "http://h:99999/v1",
                                    "http://h:65536/v1"])
def test_an_absolute_form_targets_malformed_authority_is_refused(target: str) -> None:
    """RFC 9112 3.2.2, RFC 9110 4.2.1: the authority names the host in the Host header's place; one that names none,
    or none validly, is a 400 (it was served, or a 403 on a loopback listener; a port past 65535 was served)."""
    with pytest.raises(InvalidTarget, match="must name a host and an optional port up to 65535"):
        _requests([REQUEST.replace(b"/v1/chat/completions?x=1", target.encode())])


@pytest.mark.parametrize("target, refusal", [
    ("http://user:pw@h/v1", "must not carry userinfo"), ("HTTP://user@h:8000/v1", "must not carry userinfo"),
    ("http://@/v1", "must not carry userinfo"), ("ftp://h/v1", "http or https URI"),
    ("ws://h/v1", "http or https URI"), ("file:///v1", "http or https URI")])
def test_an_absolute_form_target_with_userinfo_or_another_scheme_is_refused(target: str, refusal: str) -> None:
    """RFC 9110 4.2.4: userinfo in an http(s) URI is an error (its password is not echoed); RFC 9110 4.2 and 7.4: a
    server is the origin of http and https URIs alone. Each was served."""
    with pytest.raises(InvalidTarget, match=refusal) as refused:
        _requests([REQUEST.replace(b"/v1/chat/completions?x=1", target.encode())])
    assert "pw" not in str(refused.value)
