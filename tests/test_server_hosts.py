"""DNS rebinding (nanoqwen/api/hosts.py): a server on a loopback address answers only a Host that names this machine,
through `gunicorn -k gevent server:app`."""
from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from chat_http import cpu_env, read_all
from checkpoints import make_checkpoint
from nanoqwen.api.errors import APIError
from nanoqwen.api.hosts import HostGuard, parse_allowed_hosts
from nanoqwen.cli import build_parser, serve_command
from server_process import GunicornServer, free_port

CHAT = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
REBOUND = "evil.example"  # a page's name, re-pointed at 127.0.0.1


def _exchange(address: Any, raw: bytes, family: int = socket.AF_INET) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one raw request, sent whole and then half-closed."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address)
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        head, _, payload = read_all(sock).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def _get(path: str, host: str | None, version: str = "HTTP/1.1", headers: str = "") -> bytes:
    host_line = "" if host is None else f"Host: {host}\r\n"
    return f"GET {path} {version}\r\n{host_line}{headers}\r\n".encode()


def _assert_refused(status: int, body: dict[str, Any], host: str) -> None:
    assert status == 403, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "host_not_allowed", error
    assert repr(host) in error["message"] and "NANOQWEN_ALLOWED_HOSTS" in error["message"], error


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:{port}", True),
    ("127.0.0.1", True),
    ("[::1]:8000", True),
    ("[::ffff:127.0.0.1]:8000", True),  # IPv4-mapped IPv6
    ("10.1.2.3", True),  # an address cannot be re-pointed: the page at it is its own
    ("localhost", True),
    ("localhost:{port}", True),
    ("LOCALHOST.", True),  # uppercase, trailing dot
    ("localhost.:8000", True),
    ("app.localhost", True),
    ("printer.local", True),
    ("svc.internal", True),
    ("{hostname}", True),
    ("myllm", True),  # no dot: /etc/hosts or the LAN's names, never a public zone's
    (None, True),  # HTTP/1.0 without Host
    (REBOUND, False),
    (f"{REBOUND}:8000", False),
    ("EVIL.Example.", False),
    ("localhost.evil.example", False),
    ("127.0.0.1.evil.example", False),
    ("evil.localhost.example", False),
    ("0x7f.1", False),  # a browser reads it as 127.0.0.1 and sends that
    ("2130706433", False),  # the same, decimal
    ("0x7f000001", False),
    ("127.1", False),
], ids=lambda value: str(value))
def test_loopback_server_answers_local_hosts_only(server: GunicornServer, host: str | None, allowed: bool) -> None:
    """A Host that is not local was served: a page on a name re-pointed at 127.0.0.1 read the server's answers."""
    host = None if host is None else host.format(port=server.port, hostname=socket.gethostname())
    version = "HTTP/1.0" if host is None else "HTTP/1.1"
    status, body = _exchange(("127.0.0.1", server.port), _get("/v1/models", host, version))
    if allowed:
        assert status == 200 and body["object"] == "list", body
    else:
        _assert_refused(status, body, host)


@pytest.mark.parametrize("target, host, allowed", [
    (f"http://{REBOUND}/v1/models", "localhost", False),
    (f"http://{REBOUND}:8000/v1/models", "", False),
    ("http://localhost/v1/models", "localhost", True),
    ("http://127.0.0.1:8000/v1/models", REBOUND, True),
])
def test_an_absolute_form_targets_authority_is_the_host(server: GunicornServer, target: str, host: str,
                                                         allowed: bool) -> None:
    """RFC 9112 3.2.2: a server receiving `GET http://name/path` uses the target's authority, not the Host header;
    found by a raw-socket fuzz: a rebound name there with a local Host was served (no browser sends that form to an
    origin server: a client that does named the host it meant in the target)."""
    status, body = _exchange(("127.0.0.1", server.port), _get(target, host))
    if allowed:
        assert status == 200 and body["object"] == "list", body
    else:
        assert status == 403 and body["error"]["code"] == "host_not_allowed", body


# each with what its 400 says
REFUSED_TARGETS = {"http:///v1/models": "RFC 9112 3.2.2", "http://:80/v1/models": "RFC 9112 3.2.2",
                   f"http://[::1]{REBOUND}/v1/models": "RFC 9112 3.2.2", "http://a,b/v1/models": "RFC 9112 3.2.2",
                   "http://a..b/v1/models": "RFC 9112 3.2.2", "http://localhost:99999/v1/models": "up to 65535",
                   "http://@/v1/models": "RFC 9110 4.2.4", "http://user:pw@localhost/v1/models": "RFC 9110 4.2.4",
                   f"HTTP://user@{REBOUND}/v1/models": "RFC 9110 4.2.4", "ftp://localhost/v1/models": "http or https"}


@pytest.mark.parametrize("target", REFUSED_TARGETS)
def test_a_refused_absolute_form_target_is_a_400(server: GunicornServer, target: str) -> None:
    """RFC 9112 3.2.2, RFC 9110 4.2.1: an absolute-form target that names no host, or none validly (a port past
    65535), is a 400 on every listener: it was a 403 on a loopback one (here) and served on any other
    (test_each_listener_by_its_address); one carrying userinfo (RFC 9110 4.2.4: an error), or of a scheme other than
    http and https (RFC 9110 4.2, 7.4), was served, the password not echoed now."""
    status, body = _exchange(("127.0.0.1", server.port), _get(target, "localhost"))
    assert status == 400 and REFUSED_TARGETS[target] in body["error"]["message"], body
    assert "pw" not in body["error"]["message"] and body["error"]["type"] == "invalid_request_error", body


@pytest.mark.parametrize("target", ["http://localhost", "http://localhost?x=1", "HTTP://127.0.0.1:8000"])
def test_an_absolute_form_targets_empty_path_is_the_root(server: GunicornServer, target: str) -> None:
    """RFC 9110 4.2.3 (RFC 9112 3.2.2's absolute-form, `GET http://h`): an empty path is `/`; it was a 404
    "Unknown endpoint: GET " (nothing named)."""
    assert _exchange(("127.0.0.1", server.port), _get(target, "localhost")) == \
        _exchange(("127.0.0.1", server.port), _get("/", "localhost"))


@pytest.mark.parametrize("path", ["/health", "/metrics", "/stats", "/openapi.json", "/nowhere", "//v1//models"])
def test_every_path_is_refused(server: GunicornServer, path: str) -> None:
    """Health and statistics too (they name the model and what it serves); a probe from this machine names it, and
    one from elsewhere (Kubernetes': the pod's address) reaches a listener on another address, not checked."""
    _assert_refused(*_exchange(("127.0.0.1", server.port), _get(path, REBOUND)), REBOUND)


@pytest.fixture(scope="module")
def rebound(server: GunicornServer) -> openai.OpenAI:
    """The openai client of a page whose name was re-pointed at the server."""
    return server.openai_client().with_options(default_headers={"Host": f"{REBOUND}:{server.port}"})


def test_openai_client_on_a_rebound_name_is_refused(rebound: openai.OpenAI, server: GunicornServer) -> None:
    host = f"{REBOUND}:{server.port}"
    with pytest.raises(openai.PermissionDeniedError) as chat:
        rebound.chat.completions.create(**CHAT)
    with pytest.raises(openai.PermissionDeniedError) as stream:
        rebound.chat.completions.create(**CHAT, stream=True)
    with pytest.raises(openai.PermissionDeniedError) as models:
        rebound.models.list()
    for refused in (chat, stream, models):
        _assert_refused(403, refused.value.response.json(), host)


def test_openai_client_on_local_names_is_served(server: GunicornServer) -> None:
    for base in (f"http://localhost:{server.port}/v1", f"http://127.0.0.1:{server.port}/v1"):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
        assert [chunk for chunk in client.chat.completions.create(**CHAT, stream=True)]


def test_refused_before_the_body_and_before_cors(server: GunicornServer) -> None:
    """The 403 comes before the body is read (no `100 Continue`: the client never sends it) and before a preflight's
    answer."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {REBOUND}\r\nContent-Type: application/json\r\n"
            f"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"100 Continue" not in answer, answer
    preflight = _get("/v1/chat/completions", REBOUND, headers="Origin: http://evil.example\r\n"
                     "Access-Control-Request-Method: POST\r\n").replace(b"GET", b"OPTIONS", 1)
    _assert_refused(*_exchange(("127.0.0.1", server.port), preflight), REBOUND)


ALLOWED = "api.example.com,.proxy.example"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GunicornServer, int, str]]:
    """A server with NANOQWEN_ALLOWED_HOSTS and an API key, listening on 127.0.0.1, [::1] and a unix socket; with
    `--preload` (the app made in the master, its worker names the listeners after the fork)."""
    ipv6_port = free_port()
    unix_path = tempfile.mktemp(prefix="nanoqwen-hosts-", suffix=".sock")
    env = cpu_env(make_checkpoint(), NANOQWEN_ALLOWED_HOSTS=ALLOWED, NANOQWEN_API_KEY="secret")
    args = ["--preload", "-b", f"[::1]:{ipv6_port}", "-b", f"unix:{unix_path}"]
    try:
        with GunicornServer(env, tmp_path_factory.mktemp("hosts") / "gunicorn.log", args=args) as srv:
            yield srv, ipv6_port, unix_path
    finally:
        Path(unix_path).unlink(missing_ok=True)


AUTH = "Authorization: Bearer secret\r\n"


@pytest.mark.parametrize("host, allowed", [
    ("api.example.com", True),
    ("API.example.com.:443", True),
    ("www.api.example.com", False),  # an exact name: not the names under it
    ("proxy.example", True),  # a .suffix: the name and those under it
    ("a.b.proxy.example", True),
    ("evilproxy.example", False),
    ("proxy.example.evil", False),
    ("localhost", True),
    (REBOUND, False),
])
def test_allowed_hosts_setting(proxied: tuple[GunicornServer, int, str], host: str, allowed: bool) -> None:
    srv, _, _ = proxied
    status, body = _exchange(("127.0.0.1", srv.port), _get("/v1/models", host, headers=AUTH))
    if allowed:
        assert status == 200, body
    else:
        _assert_refused(status, body, host)


def test_refused_before_the_api_key(proxied: tuple[GunicornServer, int, str]) -> None:
    srv, _, _ = proxied
    _assert_refused(*_exchange(("127.0.0.1", srv.port), _get("/v1/models", REBOUND)), REBOUND)


def test_each_listener_by_its_address(proxied: tuple[GunicornServer, int, str]) -> None:
    """[::1] is a loopback listener too; a unix socket is not checked (no browser connects to one: a proxy in front
    decides which names it serves)."""
    srv, ipv6_port, unix_path = proxied
    ipv6 = ("::1", ipv6_port)
    _assert_refused(*_exchange(ipv6, _get("/v1/models", REBOUND, headers=AUTH), socket.AF_INET6), REBOUND)
    assert _exchange(ipv6, _get("/v1/models", f"[::1]:{ipv6_port}", headers=AUTH), socket.AF_INET6)[0] == 200
    status, body = _exchange(unix_path, _get("/v1/models", REBOUND, headers=AUTH), socket.AF_UNIX)
    assert status == 200 and body["object"] == "list", body
    for target, refusal in REFUSED_TARGETS.items():
        for address, family in ((unix_path, socket.AF_UNIX), (ipv6, socket.AF_INET6)):
            status, body = _exchange(address, _get(target, "localhost", headers=AUTH), family)
            assert status == 400 and refusal in body["error"]["message"], (target, body)


@pytest.mark.parametrize("server_name, checked", [
    ("127.0.0.1", True),
    ("0.0.0.0", False),  # the wildcard listener, whichever address the connection reached: reachable from elsewhere
    ("10.0.0.5", False),
    ("::1", True),
    ("::ffff:127.0.0.1", True),
    ("::", False),  # a dual-stack wildcard
    ("localhost", False),  # the app in process (Flask's test client); a unix socket's Host name
])
def test_the_listener_is_gunicorns_server_name(server_name: str, checked: bool) -> None:
    """gunicorn's SERVER_NAME is its listener's address (`-b 127.0.0.1:8000 -b 0.0.0.0:9000 -b [::1]:8001
    -b [::ffff:127.0.0.1]:8002 -b [::]:8003`; 0.0.0.0 is not bound here: it would open the test server to the
    network); for a unix socket, the Host's name."""
    environ = {"SERVER_NAME": server_name, "HTTP_HOST": REBOUND}
    guard = HostGuard(())
    if checked:
        with pytest.raises(APIError) as refused:
            guard.check(environ)
        assert refused.value.status == 403
    else:
        guard.check(environ)
    guard.check({**environ, "HTTP_HOST": "localhost"})


def test_any_host() -> None:
    """`*` turns the check off."""
    environ = {"SERVER_NAME": "127.0.0.1", "HTTP_HOST": REBOUND}
    HostGuard(parse_allowed_hosts(" * ")).check(environ)
    with pytest.raises(APIError):
        HostGuard(()).check(environ)


@pytest.mark.parametrize("raw, entries", [
    (None, ()),
    ("", ()),
    (" API.Example.com. , .Proxy.example,*", ("api.example.com", ".proxy.example", "*")),
    ("a,,b", ("a", "b")),
])
def test_allowed_hosts_forms(raw: str | None, entries: tuple[str, ...]) -> None:
    assert parse_allowed_hosts(raw) == entries


@pytest.mark.parametrize("raw", ["http://api.example.com", "api.example.com:443", "*.example.com", "a b", "[::1]"])
def test_allowed_hosts_refuses_what_is_no_name(raw: str) -> None:
    with pytest.raises(ValueError, match="NANOQWEN_ALLOWED_HOSTS"):
        parse_allowed_hosts(raw)


def test_serve_option_sets_the_variable() -> None:
    args = build_parser().parse_args(["serve", "--allowed-hosts", "api.example.com,.example.org"])
    assert serve_command(args)[1]["NANOQWEN_ALLOWED_HOSTS"] == "api.example.com,.example.org"
