"""DNS rebinding: a server listening on a loopback address answers only a Host that names this machine.

A web page whose name its owner re-points at 127.0.0.1 once it has loaded is same-origin with a loopback server as far
as the browser knows: its script may POST JSON there and read the answer. Only the Host header, the page's name,
tells. So on a loopback listener a request whose Host is not local is refused (403), on every path, before its body
is read and before the API key or CORS answer (as Ollama's allowedHostsMiddleware; Jupyter's check_host and Django's
ALLOWED_HOSTS likewise). Local: no Host (HTTP/1.0; a browser always sends one), an IP address (a rebinding needs a
name: a page at an address is that address's own), `localhost` and names under `.localhost`, `.local` and
`.internal`, the machine's host name, and any name without a dot (no public DNS zone answers one: /etc/hosts, the
search domains or the LAN's multicast names do, as for `.local`: a LAN host that answers those lookups can rebind
them, as it can `.local`; --api-key closes that too), unless it ends in a number (a browser reads
`2130706433` or `0x7f.1` as an address and sends it as `127.0.0.1`). NANOQWEN_ALLOWED_HOSTS adds names, for a proxy
on this machine that passes its clients' Host (nginx's `$host`).

A listener on any other address (0.0.0.0, a LAN address) is not checked: it is reachable from elsewhere anyway, and
an orchestrator's probes name the pod's address. Nor is a unix socket: no browser connects to one, and whatever
forwards to it (a proxy) decides which names it serves. A request's listener is gunicorn's SERVER_NAME, which it
sets from the listener's address, with nanoqwen's worker or gevent's alone. The Host's syntax (`host[:port]`,
one header) is request_line.CheckedRequest's: a malformed one is a 400 before this check. A target in absolute-form
(`GET http://name/path`) names the host in the Host header's place (RFC 9112 3.2.2); a malformed authority there
(or userinfo, or a scheme other than http and https) is that 400 too.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from typing import Any

from nanoqwen.api.errors import APIError
from nanoqwen.request_line import absolute_target

ANY_HOST = "*"
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")  # WHATWG URL's "ends in a number": parsed as an IPv4 address


def parse_allowed_hosts(raw: str | None) -> tuple[str, ...]:
    """NANOQWEN_ALLOWED_HOSTS: comma-separated names, each exact or `.suffix` (that name and every name under it), or
    `*` (no check); lowercased, a trailing dot dropped. ValueError naming an entry that is none of these."""
    entries = tuple(entry.strip().lower().removesuffix(".") for entry in (raw or "").split(",") if entry.strip())
    for entry in entries:
        if entry != ANY_HOST and not NAME.fullmatch(entry.removeprefix(".")):
            raise ValueError(f"NANOQWEN_ALLOWED_HOSTS: {entry!r} is not a host name (no scheme or port), a "
                             f".suffix or {ANY_HOST}")
    return entries


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:  # a name, or a unix socket's path
        return None


def _is_loopback(text: str) -> bool:
    address = _address(text)
    return address is not None and (getattr(address, "ipv4_mapped", None) or address).is_loopback


class HostGuard:
    """Refuses, on a loopback listener, a Host that is not local (the module's docstring)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = allowed
        self._hostname = socket.gethostname().lower().removesuffix(".")

    def allows(self, host: str) -> bool:
        """Whether `host`, a Host header's value, may reach a loopback listener."""
        host = host.lower()
        if host.startswith("["):
            return _address(host[1:].partition("]")[0]) is not None
        name = host.partition(":")[0].removesuffix(".")
        if not name or _address(name) is not None:
            return True
        if not NAME.fullmatch(name) or NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
            return False
        return ("." not in name or name.endswith(LOCAL_SUFFIXES) or name == self._hostname
                or any(name == entry or (entry.startswith(".") and (name == entry[1:] or name.endswith(entry)))
                       for entry in self._allowed))

    def check(self, environ: Mapping[str, Any]) -> None:
        """Raises the 403 for a request that came through a loopback listener with a Host that is not local. The
        listener is gunicorn's SERVER_NAME: its address (`0.0.0.0` or `::` for a wildcard's, whatever the connection's
        own); for a unix socket gunicorn takes the Host's name, and an address there is allowed anyway."""
        if ANY_HOST in self._allowed or not _is_loopback(environ.get("SERVER_NAME", "")):
            return
        absolute = absolute_target(environ.get("RAW_URI", ""))
        host = environ.get("HTTP_HOST", "") if absolute is None else absolute.authority
        # without nanoqwen's worker (its CheckedRequest answers a refused target 400) still no host: refused
        if (absolute is not None and absolute.refusal is not None) or not self.allows(host):
            raise APIError(403, f"The Host {host!r} does not name this machine: a server on a loopback address answers "
                                "only local names (a web page's name re-pointed at it would read its answers: DNS "
                                "rebinding). A proxy on this machine that passes its clients' Host names them in "
                                "NANOQWEN_ALLOWED_HOSTS.", code="host_not_allowed")
