"""`POST /v1/completions`: OpenAI's legacy text completions, on the chat path's machinery.

A batch of prompts is one engine request per prompt on one stream (serving.Batch): choice
`i * n + j` is the j-th answer to prompt i, as OpenAI numbers them. No chat template, no
reasoning split: the text is the model's, `<think>` included.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Response

from nanoqwen.api.request_id import response_id
from nanoqwen.api.responses import Choice, prompt_logprobs_json, usage_json
from nanoqwen.api.schemas import CompletionRequest, parse_completion_request
from nanoqwen.api.serving import Serving, invalid_request
from nanoqwen.api.sse import DoneFraming, RunningUsage
from nanoqwen.api.strict_json import Budget
from nanoqwen.api.structured import compiled, structured_grammar
from nanoqwen.engine import Engine
from nanoqwen.engine.request import Event, PromptLogprobs, TokenLogprob, Usage
from nanoqwen.engine.validation import PromptTooLongError, context_length_error, prompt_token_limit

Json = dict[str, Any]


def legacy_logprobs(logprobs: list[TokenLogprob], offset: int, prompt: PromptLogprobs | None = None) -> Json:
    """The legacy shape; `top_logprobs` always has the sampled token, as OpenAI's does. `offset`: where
    the first of `logprobs` starts in the text. With `prompt` (echo), the prompt's tokens come first,
    from offset 0, the first one with null logprobs (nothing predicts it), as OpenAI and vLLM send it."""
    out: Json = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def append(token: str, logprob: float | None, top: dict[str, float] | None, at: int) -> int:
        for key, value in zip(out, (token, logprob, top, at)):
            out[key].append(value)
        return at + len(token)

    if prompt is not None:
        at = append(prompt.first_token, None, None, 0)
        for lp in prompt.tokens:
            at = append(lp.token, lp.logprob, _top(lp), at)
    for lp in logprobs:
        offset = append(lp.token, lp.logprob, _top(lp), offset)
    return out


def _top(lp: TokenLogprob) -> dict[str, float]:
    return {lp.token: lp.logprob} | {t.token: t.logprob for t in lp.top_logprobs}


@dataclass
class TextCompletion(DoneFraming):
    """Both the collected `text_completion` and its stream chunks (one id, one `created`)."""

    model: str
    fingerprint: str
    echoes: list[str]  # per choice: the prompt text echoed before the answer, or ""
    want_logprobs: bool
    include_usage: bool = False
    running: RunningUsage | None = None
    want_prompt_logprobs: bool = False  # vLLM's prompt_logprobs: each choice's, as vLLM puts them
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._choices = [Choice() for _ in self.echoes]
        self._offsets = [len(echo) for echo in self.echoes]  # streamed: where the next token's text starts
        # With logprobs an echo waits for the prompt's logprobs, which come with the choice's first event.
        self._prompts: list[PromptLogprobs | None] = [None] * len(self.echoes)
        self._echo_pending = [bool(echo) and self.want_logprobs for echo in self.echoes]

    def head(self) -> Json:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _object(self, choices: list[Json]) -> Json:
        obj = self.head()
        obj["choices"] = choices
        return obj

    def _logprobs(self, index: int, logprobs: list[TokenLogprob] | None, prompt: PromptLogprobs | None) -> Json | None:
        if not self.want_logprobs:
            return None
        start = self._offsets[index]
        self._offsets[index] += sum(len(lp.token) for lp in logprobs or [])
        return legacy_logprobs(logprobs or [], start, prompt)

    def add(self, event: Event) -> None:
        self._choices[event.index].add(event)
        if event.prompt_logprobs is not None:
            self._prompts[event.index] = event.prompt_logprobs

    def build(self, usage: Usage) -> Json:
        completion = self._object([self._choice(i, c) for i, c in enumerate(self._choices)])
        completion["usage"] = usage_json(usage)
        return completion

    def _choice(self, i: int, choice: Choice) -> Json:
        prompt = self._prompts[i]
        out = {"index": i, "text": self.echoes[i] + "".join(choice.text),
               "logprobs": legacy_logprobs(choice.logprobs, len(self.echoes[i]), prompt if self.echoes[i] else None)
               if self.want_logprobs else None,
               "finish_reason": choice.finish_reason}
        if self.want_prompt_logprobs and prompt is not None:
            out["prompt_logprobs"] = prompt_logprobs_json(prompt)
        return out

    def opening(self) -> list[Json]:
        return self.with_usage([self._echo(i) for i, echo in enumerate(self.echoes)
                                if echo and not self._echo_pending[i]])

    def _echo(self, index: int) -> Json:
        """A choice's echo alone, without logprobs."""
        return self._object([{"index": index, "text": self.echoes[index], "logprobs": None, "finish_reason": None}])

    def chunks(self, event: Event) -> list[Json]:
        if event.error is not None:  # the stream fails (the server sends its error next): the echoes still waiting for
            # their prompt's logprobs (a choice not started) go out without them, as they would without logprobs asked
            pending = [i for i, waits in enumerate(self._echo_pending) if waits]
            self._echo_pending = [False] * len(self.echoes)
            return self.with_usage([self._echo(i) for i in pending])
        out = []
        i = event.index
        if self.running is not None:
            self.running.add(event)
        echo = ""
        if self._echo_pending[i] and event.prompt_logprobs is not None:  # the echo and the first token, as vLLM
            echo, self._echo_pending[i] = self.echoes[i], False
        if echo or event.text or event.logprobs or event.finish_reason:
            out.append(self._object([{"index": i, "text": echo + event.text,
                                       "logprobs": self._logprobs(i, event.logprobs, event.prompt_logprobs if echo
                                                                  else None),
                                       "finish_reason": event.finish_reason}]))
        self.with_usage(out)
        if event.usage is not None and self.include_usage:
            chunk = self._object([])
            chunk["usage"] = usage_json(event.usage)
            out.append(chunk)
        return out


class CompletionService:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def handle(self, body: Any, budget: Budget, environ: dict[str, Any]) -> Response | Json:
        serving = self.serving
        trace = serving.stats.begin()
        req = serving.validate(parse_completion_request, body, budget)
        serving.check_serving(req.model)
        params = req.sampling_params(serving.engine.sampling_defaults)
        compiled(structured_grammar, serving, req, params)
        prompts = self._encode(req, params.max_tokens)
        echoes = [""] * len(prompts)
        if req.echo:
            echoes = req.prompts if isinstance(req.prompts[0], str) else self._decode(prompts)
        batch = serving.submit(prompts, params, split_reasoning=False, prompt_param="prompt")
        running = RunningUsage(sum(map(len, prompts))) if req.continuous_usage else None
        builder = TextCompletion(serving.config.served_model_name, serving.fingerprint,
                                 [echo for echo in echoes for _ in range(params.n)], req.logprobs is not None,
                                 req.include_usage, running, req.wants_prompt_logprobs,
                                 id=response_id("cmpl", req.request_id))
        return serving.respond(batch, builder if req.stream else None, builder, trace, environ)

    def _encode(self, req: CompletionRequest, max_tokens: int | None) -> list[list[int]]:
        serving = self.serving
        prompts = req.prompts
        limit = serving.info["max_model_len"]
        if isinstance(prompts[0], str):
            return serving.off_loop(sum(map(len, prompts)), _encoded, serving.engine, prompts, limit, max_tokens)
        for ids in prompts:
            if len(ids) > prompt_token_limit(limit, max_tokens):
                raise invalid_request(context_length_error(limit, len(ids), max_tokens, "prompt"))
        return prompts

    def _decode(self, prompts: list[list[int]]) -> list[str]:
        return self.serving.off_loop(sum(map(len, prompts)), _echoes, self.serving.engine.tokenizer, prompts)


def _encoded(engine: Engine, texts: list[str], limit: int, max_tokens: int | None) -> list[list[int]]:
    """The prompts' ids (an offload thread's work); a 400 naming `prompt` for the first too long for the context."""
    try:
        return engine.encode_texts(texts, max_tokens=prompt_token_limit(limit, max_tokens))
    except PromptTooLongError as exc:  # raised in the worker, where the greenlet's mapping cannot see it
        raise invalid_request(context_length_error(limit, exc.num_tokens, max_tokens, "prompt")) from None


def _echoes(tokenizer: Any, prompts: list[list[int]]) -> list[str]:
    """Token-id prompts' texts (an offload thread's work): an id past the vocabulary is the engine's 400, not an echo
    to write."""
    vocab = len(tokenizer)
    return tokenizer.batch_decode([[t for t in ids if 0 <= t < vocab] for ids in prompts])
