"""vLLM's `POST /tokenize` and `POST /detokenize`: a prompt or chat messages → token ids, and back.

lm-eval-harness and agents use them to count and cut prompts; the ids are exactly those a
completion or chat request with the same input gets. The templating and the tokenizer run in the
server's native threads, never on the event loop.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from nanoqwen.api.errors import APIError
from nanoqwen.api.schemas import ChatPrompt, Strict, validate_body
from nanoqwen.api.serving import Serving, invalid_request
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine import Engine
from nanoqwen.engine.validation import InvalidRequest


class TokenizePromptRequest(Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatPrompt):
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class TokenizeService:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def tokenize(self, body: Any, budget: Budget) -> dict[str, Any]:
        req = self.serving.validate(parse_tokenize_request, body, budget)
        self.serving.check_serving(req.model)
        ids = self.serving.off_loop(*self._job(req))
        strs = self.serving.off_loop(len(ids), self.serving.engine.tokenizer.convert_ids_to_tokens, ids) \
            if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.serving.info["max_model_len"], "tokens": ids,
                "token_strs": strs}

    def _job(self, req: TokenizePromptRequest | TokenizeChatRequest) -> tuple[Any, ...]:
        engine = self.serving.engine
        if isinstance(req, TokenizePromptRequest):
            return len(req.prompt), _encode_text, engine, req.prompt, req.add_special_tokens
        return req.template_chars(), _encode_messages, engine.encode_messages, req

    def detokenize(self, body: Any, budget: Budget) -> dict[str, Any]:
        req = self.serving.validate(partial(validate_body, DetokenizeRequest), body, budget)
        self.serving.check_serving(req.model)
        engine = self.serving.engine
        return {"prompt": self.serving.off_loop(len(req.tokens), _decode, engine.tokenizer,
                                                engine.model_config.vocab_size, req.tokens)}


def _decode(tokenizer: Any, vocab: int, ids: list[int]) -> str:
    """The ids' text, each checked against the model's vocabulary first, in the thread that decodes them. An id the
    tokenizer lacks (Qwen3's embedding has 151,936 rows, its tokenizer 151,669 ids) decodes to nothing, as vLLM's
    /detokenize (the tokenizer's decode)."""
    _check_vocabulary(vocab, ids)
    return tokenizer.decode(ids)


def _check_vocabulary(vocab: int, ids: list[int]) -> None:
    """A 400 naming the first id past the model's vocabulary (a prompt's bound): a loop over 60,000 ids is
    milliseconds, run off the event loop (_decode)."""
    if (bad := next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)) is not None:
        raise APIError(400, f"Invalid value for 'tokens.[{bad}]': token ids must be in [0, {vocab})",
                       param=f"tokens.[{bad}]")


def parse_tokenize_request(body: Any, budget: Budget) -> TokenizePromptRequest | TokenizeChatRequest:
    """A prompt's form, or the messages' (chat's size is worked out as it validates: off the loop for a large body)."""
    chat_form = isinstance(body, dict) and "messages" in body
    req = validate_body(TokenizeChatRequest if chat_form else TokenizePromptRequest, body, budget)
    if isinstance(req, TokenizeChatRequest):
        req.check_ending()
    return req


def _encode_text(engine: Engine, prompt: str, add_special_tokens: bool) -> list[int]:
    return engine.encode_texts([prompt], add_special_tokens)[0]


def _encode_messages(encode: Any, req: TokenizeChatRequest) -> list[int]:
    try:
        return req.encoded(encode, None)
    except InvalidRequest as exc:  # raised in the worker, where the greenlet's mapping cannot see it
        raise invalid_request(exc) from None
