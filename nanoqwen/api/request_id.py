"""`X-Request-Id`: the client's (when it is a short plain token) or a new one, echoed on every response and kept as
a stored completion's `request_id` (OpenAI's stored completions carry the create's); the client's is also the
completion's `id`, as vLLM's, unless the completion is stored.

gunicorn's access log prints it from the response header (see access_log_format in
nanoqwen/gunicorn_conf.py), so a client's id ties its request to the log line.
"""
from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

HEADER = "X-Request-Id"
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # nothing that could forge or break a log line


def _client_request_id() -> str | None:
    given = request.headers.get(HEADER, "")
    return given if _ACCEPTED.fullmatch(given) else None


def request_id() -> str:
    """The request's id, made once a request: the header echoed and a stored completion's `request_id` agree."""
    if "request_id" not in g:
        g.request_id = _client_request_id() or uuid.uuid4().hex
    return g.request_id


def response_id(prefix: str, body_request_id: str | None, stored: bool = False) -> str:
    """A completion's `id` as vLLM forms it (serving_chat/serving_completion's `_base_request_id`): `prefix-`
    then the client's X-Request-Id, else the body's vLLM `request_id`, else a new one. A `stored` one's is always new:
    the store finds a completion by it, and a retry (its request id resent) or anyone knowing an id must not replace
    another's."""
    if stored:
        return f"{prefix}-{uuid.uuid4().hex}"
    base = _client_request_id()
    if base is None:
        base = uuid.uuid4().hex if body_request_id is None else body_request_id
    return f"{prefix}-{base}"


def install(app: Flask) -> None:
    @app.after_request
    def add_request_id(response: Response) -> Response:
        response.headers[HEADER] = request_id()
        return response
