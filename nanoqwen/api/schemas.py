"""Request schema of `POST /v1/chat/completions` (OpenAI's fields plus vLLM's extensions).

Unknown fields are ignored. Validation failures become 400 `invalid_request_error` naming the
offending `param` in OpenAI's notation (`messages.[0].role`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nanoqwen.api.errors import APIError
from nanoqwen.engine.request import SamplingParams

MAX_STOP_STRINGS = 4


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            return value
        raise ValueError("content must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})")

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role '{self.role}'")
        return self

    def to_template(self) -> dict[str, str]:
        """The `{"role", "content": str}` form the chat template takes."""
        if isinstance(self.content, list):
            text = "".join(part["text"] for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: str


class ChatCompletionRequest(_Lenient):
    model: str | None = None  # None = the served model
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1, le=128)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(stops)}")
        return value

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def split_reasoning(self) -> bool:
        """False when thinking is switched off: the template closed the think block already."""
        return (self.chat_template_kwargs or {}).get("enable_thinking", True) is not False

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        defaults = SamplingParams()

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            min_p=pick(self.min_p, defaults.min_p),
            presence_penalty=pick(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, defaults.frequency_penalty),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            seed=self.seed,
            max_tokens=pick(self.max_completion_tokens, self.max_tokens),
            ignore_eos=bool(self.ignore_eos),
            stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids or []),
            logprobs=bool(self.logprobs),
            top_logprobs=pick(self.top_logprobs, 0),
            n=pick(self.n, 1),
            skip_special_tokens=pick(self.skip_special_tokens, True),
        )


def _param_name(loc: tuple[int | str, ...]) -> str:
    return ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc)


def _check_combinations(req: ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "logprobs must be true when top_logprobs is set", param="top_logprobs")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format type '{req.response_format.type}' is not supported; "
                            "only 'text' is", param="response_format")


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises APIError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param_name(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"Invalid value for '{param}': {message}" if param else message,
                       param=param or None) from None
    _check_combinations(req)
    return req
