"""`POST /v1/chat/completions`: validate, template and tokenize off the loop, submit, stream or collect."""
from __future__ import annotations

import json
from typing import Any

from flask import Response

from nanoqwen.api.errors import APIError
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder, ToolParsing
from nanoqwen.api.schemas import ChatCompletionRequest, parse_chat_request
from nanoqwen.api.serving import Serving
from nanoqwen.engine.engine import PromptTooLongError


def template_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """A cheap measure of a chat prompt's size."""
    chars = sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages)
    return chars + (len(json.dumps(tools)) if tools else 0)


def context_error(limit: int, prompt_tokens: int, max_tokens: int | None, what: str = "messages") -> APIError:
    if max_tokens is None:
        message = (f"This model's maximum context length is {limit} tokens. However, your {what} "
                   f"resulted in {prompt_tokens} tokens, leaving none for the completion. "
                   f"Please reduce the length of the {what}.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} "
                   f"in the completion). Please reduce the length of the {what} or completion.")
    return APIError(400, message, param=what, code="context_length_exceeded")


class ChatService:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def handle(self, body: Any, environ: dict[str, Any]) -> Response | dict[str, Any]:
        serving = self.serving
        trace = serving.stats.begin()
        req = parse_chat_request(body)
        serving.check_serving(req.model)
        params = req.sampling_params(serving.engine.sampling_defaults)
        batch = serving.submit([self._encode(req, params.max_tokens)], params, req.split_reasoning)
        tools = ToolParsing(req.shows_tools, req.max_tool_calls)
        model, fp = serving.config.served_model_name, serving.fingerprint
        stream = ChunkBuilder(model, fp, req.include_usage, tools, params.n) if req.stream else None
        return serving.respond(batch, stream, CompletionBuilder(model, fp, params.n, bool(req.logprobs), tools),
                               trace, environ)

    def _encode(self, req: ChatCompletionRequest, max_tokens: int | None) -> list[int]:
        serving = self.serving
        longest = serving.info["max_model_len"] - (max_tokens or 1)
        messages, tools = req.template_messages(), req.template_tools()
        try:
            return serving.off_loop(template_chars(messages, tools), serving.engine.encode_messages, messages,
                                    req.template_kwargs(), longest, tools)
        except PromptTooLongError as exc:
            raise context_error(serving.info["max_model_len"], exc.num_tokens, max_tokens) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
