"""Builders for OpenAI's `chat.completion` and `chat.completion.chunk` objects from engine events."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nanoqwen.engine.request import Event, TokenLogprob, Usage

Json = dict[str, Any]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def fingerprint(info: dict[str, Any]) -> str:
    """`system_fingerprint`: changes whenever the model or the execution mode does."""
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()
    return f"fp_{digest[:10]}"


def logprobs_json(logprobs: list[TokenLogprob]) -> Json:
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in lp.top_logprobs]}
        for lp in logprobs
    ]}


def usage_json(usage: Usage) -> Json:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _with_reasoning(obj: Json, reasoning: str) -> Json:
    # Both names: `reasoning_content` (DeepSeek/vLLM) and `reasoning` (the newer one).
    if reasoning:
        obj["reasoning_content"] = reasoning
        obj["reasoning"] = reasoning
    return obj


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class CompletionBuilder:
    """Accumulates a whole request's events into one `chat.completion`."""

    model: str
    fingerprint: str
    n: int
    want_logprobs: bool
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._choices = [_Choice() for _ in range(self.n)]

    def add(self, event: Event) -> None:
        choice = self._choices[event.index]
        choice.text.append(event.text)
        choice.reasoning.append(event.reasoning)
        if event.logprobs:
            choice.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason

    def build(self, usage: Usage) -> Json:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": i,
                    "message": _with_reasoning(
                        {"role": "assistant", "content": "".join(c.text), "refusal": None}, "".join(c.reasoning)),
                    "logprobs": logprobs_json(c.logprobs) if self.want_logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(self._choices)
            ],
            "usage": usage_json(usage),
        }


@dataclass
class ChunkBuilder:
    """The `chat.completion.chunk` objects of one stream: one id and one `created` throughout."""

    model: str
    fingerprint: str
    include_usage: bool
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[Json]) -> Json:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:  # OpenAI sends `usage: null` on every chunk but the last
            chunk["usage"] = None
        return chunk

    def role(self, index: int) -> Json:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta(self, event: Event) -> Json | None:
        """The content/reasoning chunk of an event, or None when it carries nothing to send."""
        if not (event.text or event.reasoning or event.logprobs):
            return None
        delta = _with_reasoning({"content": event.text} if event.text else {}, event.reasoning)
        return self._chunk([{"index": event.index, "delta": delta,
                             "logprobs": logprobs_json(event.logprobs) if event.logprobs else None,
                             "finish_reason": None}])

    def finish(self, index: int, reason: str) -> Json:
        return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: Usage) -> Json:
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage)
        return chunk
