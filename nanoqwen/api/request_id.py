"""`X-Request-Id`: the client's (when it is a short plain token) or a new one, echoed on every response.

gunicorn's access log prints it from the response header (see access_log_format in
nanoqwen/gunicorn_conf.py), so a client's id ties its request to the log line.
"""
from __future__ import annotations

import re
import uuid

from flask import Flask, Response, request

HEADER = "X-Request-Id"
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # nothing that could forge or break a log line


def request_id() -> str:
    given = request.headers.get(HEADER, "")
    return given if _ACCEPTED.fullmatch(given) else uuid.uuid4().hex


def install(app: Flask) -> None:
    @app.after_request
    def add_request_id(response: Response) -> Response:
        response.headers[HEADER] = request_id()
        return response
