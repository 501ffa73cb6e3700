"""OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

from typing import Any


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_name(loc: tuple[int | str, ...]) -> str:
    """A location in the request body in OpenAI's notation: `messages.[0].content`."""
    return ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc)


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


def request_too_large(message: str) -> APIError:
    """A body, or the JSON in its strings, with more values than a request needs (a 413, like the body's size)."""
    return APIError(413, f"{message} Send a large batch as several requests.", code="request_too_large")
