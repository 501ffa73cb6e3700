"""gunicorn's logger with every field of an access line escaped: control characters and the backslash as `\\xNN`.

gunicorn's `%(U)s` is the WSGI PATH_INFO, percent-decoded: `GET /v1/%0D%0AFORGED...` wrote a CR LF into the access log
and so a line of the client's choosing (CWE-117, llama.cpp's test_log_injection), and `%1B[...` a terminal escape
sequence. PATH_INFO is latin-1 text of the request's bytes, so the C1 controls (`%9B` is a CSI) are escaped too; the
backslash is, so that an escape in the log cannot be forged by a path that spells one.
"""
from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import SafeAtoms
from gunicorn.instrument.statsd import Statsd

UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")  # U+2028/9: a line break to some viewers


def escaped(text: str) -> str:
    return UNSAFE.sub(lambda match: _escape(ord(match.group())), text)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapedAtoms(SafeAtoms):
    """An atom escaped when the format reads it (~6 of ~40 atoms), then quoted as SafeAtoms quotes: escaped first, so
    gunicorn's `\\"` is not written `\\x5c"`."""

    def __init__(self, atoms: dict[str, Any]) -> None:
        dict.__init__(self, atoms)

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return escaped(value).replace('"', '\\"') if isinstance(value, str) else value


class AccessLogger(Statsd):
    """Statsd's logger (no socket without `--statsd-host`): gunicorn switches to it only while
    `logger_class` is its default, so a Logger here silently turned `--statsd-host` off. A `--logger-class` given
    drops the escaping."""

    atoms_wrapper_class = EscapedAtoms
