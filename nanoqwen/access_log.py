"""gunicorn's logger with every field of an access line escaped: control characters and the backslash as `\\xNN`.

gunicorn's `%(U)s` is the WSGI PATH_INFO, percent-decoded: `GET /v1/%0D%0AFORGED...` wrote a CR LF into the access log
and so a line of the client's choosing (CWE-117, llama.cpp's test_log_injection), and `%1B[...` a terminal escape
sequence. PATH_INFO is latin-1 text of the request's bytes, so the C1 controls (`%9B` is a CSI) are escaped too; the
backslash is, so that an escape in the log cannot be forged by a path that spells one.
"""
from __future__ import annotations

import re
from typing import Any

from gunicorn.glogging import Logger

UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escaped(text: str) -> str:
    return UNSAFE.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class AccessLogger(Logger):
    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict[str, Any]:
        return {key: escaped(value) if isinstance(value, str) else value
                for key, value in super().atoms(resp, req, environ, request_time).items()}
