"""OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_name(loc: tuple[int | str, ...]) -> str:
    """A location in the request body in OpenAI's notation: `messages.[0].content`."""
    return ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc)


@dataclass(frozen=True)
class FieldNames:
    """What a client's request calls the fields of the chat request it amounts to: chat's own names, or another
    endpoint's (a Responses request's `input` for `messages`). Applied where an error is made, to its param and to
    the words of its message that name it, never to the message made: that may quote the client's text (a schema's
    property, a tool's name) word for word."""

    renamed: Mapping[str, str] = field(default_factory=dict)  # a chat field -> the client's

    def __call__(self, param: str) -> str:
        """`param` (chat's, `messages.[0].content`) as the client's request names it: a renamed field's whole
        path is that field (the client's has no such parts)."""
        head = param.split(".", 1)[0]
        return self.renamed.get(head, param)


CHAT_NAMES = FieldNames()


class APIError(Exception):
    """Raised anywhere while serving a request; the app turns it into an error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def generation_error(message: str, param: str | None = None) -> APIError:
    """A generation's failure (the engine's error event, or our own code broken: a stream's, or any request's in the
    app's last error handler), whose fault is decided here
    for every endpoint: its answer not streamed, a stream's error event and a Responses `response.failed`'s error. The
    client's where `param` names the request's field at fault (the grammar it asked for, which the output could no
    longer follow): a 400 with OpenAI's code for a request it cannot serve, `invalid_prompt`; else the server's: a 500
    `server_error`, the code a failed response's error gives it."""
    if param is not None:
        return APIError(400, message, param=param, code="invalid_prompt")
    return APIError(500, message, type="server_error", code="server_error")


def request_too_large(message: str) -> APIError:
    """A body, or the JSON in its strings, with more values than a request needs (a 413, like the body's size)."""
    return APIError(413, f"{message} Send a large batch as several requests.", code="request_too_large")
