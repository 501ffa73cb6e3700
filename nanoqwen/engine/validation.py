"""The limits of a request and their one check: the engine refuses what breaks them, the API maps
the refusal to a 400 naming the parameter, and the request schema takes its bounds from here."""
from __future__ import annotations

from typing import Any

from nanoqwen.engine.request import SamplingParams

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_IDS_SHOWN = 5  # of the out-of-vocabulary ids an error names (a large body could hold millions)


class InvalidRequest(ValueError):
    """A request the engine refuses; `param` names the field in the API's notation."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLongError(InvalidRequest):
    """The prompt alone leaves no room in the context (raised while tokenising, before the ids exist)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(f"the prompt has {num_tokens} tokens", param="messages", code="context_length_exceeded")
        self.num_tokens = num_tokens


def prompt_token_limit(max_model_len: int, max_tokens: int | None) -> int:
    """The most prompt tokens that leave room for `max_tokens` (None: at least one) in the context: with 0 (`echo`
    scoring the prompt alone) the whole context."""
    return max_model_len - (1 if max_tokens is None else max_tokens)


def completion_limit(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """The most tokens a choice may generate: `max_tokens`, or without it the context's room after the prompt (as
    vLLM sets it)."""
    return max_tokens if max_tokens is not None else max_model_len - prompt_tokens


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int | None,
                         what: str = "messages", param: str | None = None) -> InvalidRequest:
    """`what`: what holds the prompt, in words; `param`: its request field (None: `what`, as `messages`, or
    `prompt` for completions)."""
    if max_tokens is None:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                   f"resulted in {prompt_tokens} tokens, leaving none for the completion. "
                   f"Please reduce the length of the {what}.")
    else:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} "
                   f"in the completion). Please reduce the length of the {what} or completion.")
    return InvalidRequest(message, param=param or what, code="context_length_exceeded")


def shown(ids: list[Any]) -> str:
    """`ids` (or keys) for an error message: the first MAX_IDS_SHOWN, then how many there are."""
    if len(ids) <= MAX_IDS_SHOWN:
        return str(ids)
    return f"{str(ids[:MAX_IDS_SHOWN])[:-1]}, … ({len(ids)} in all)]"


def check_allowed_token_ids(params: SamplingParams, vocab_size: int) -> None:
    allowed = params.allowed_token_ids
    if allowed is None:
        return
    if not allowed:
        raise InvalidRequest("allowed_token_ids must not be empty", param="allowed_token_ids")
    if bad := [t for t in allowed if not 0 <= t < vocab_size]:
        raise InvalidRequest(f"allowed_token_ids {shown(bad)} are not in [0, {vocab_size})", param="allowed_token_ids")
    if params.grammar is not None:  # their intersection may be empty: nothing left to sample
        raise InvalidRequest("allowed_token_ids cannot be combined with a constrained answer (response_format, a "
                             "forced tool call, a strict tool or a structured output)", param="allowed_token_ids")


def validate_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                     max_batch: int) -> None:
    """Raises InvalidRequest naming the first problem."""
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="messages")
    if bad := [t for t in prompt_ids if not 0 <= t < vocab_size]:
        raise InvalidRequest(f"prompt token ids {shown(bad)} are out of vocabulary (not in [0, {vocab_size}))",
                             param="messages")
    if params.max_tokens is not None and params.max_tokens < (0 if params.prompt_logprobs is not None else 1):
        # 0: score the prompt only (`echo` with `max_tokens: 0`)
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    if params.min_tokens < 0:
        raise InvalidRequest(f"min_tokens must be greater than or equal to 0, got {params.min_tokens}",
                             param="min_tokens")
    most = completion_limit(max_model_len, len(prompt_ids), params.max_tokens)  # vLLM's check, after its default
    if params.min_tokens > most:
        raise InvalidRequest(f"min_tokens must be less than or equal to max_tokens={most}, got {params.min_tokens}",
                             param="min_tokens")
    if len(prompt_ids) > prompt_token_limit(max_model_len, params.max_tokens):
        raise context_length_error(max_model_len, len(prompt_ids), params.max_tokens)
    if params.temperature < 0:
        raise InvalidRequest("temperature must be non-negative", param="temperature")
    if not 0 <= params.top_p <= 1:
        raise InvalidRequest("top_p must be in [0, 1]", param="top_p")
    if not 0 <= params.min_p <= 1:
        raise InvalidRequest("min_p must be in [0, 1]", param="min_p")
    if params.repetition_penalty <= 0:
        raise InvalidRequest("repetition_penalty must be positive", param="repetition_penalty")
    if not 1 <= params.n <= max_batch:
        raise InvalidRequest(f"n must be between 1 and {max_batch}", param="n")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are supported", param="stop")
    if bad := [t for t in params.logit_bias if not 0 <= t < vocab_size]:
        raise InvalidRequest(f"logit_bias token ids {shown(bad)} are not in [0, {vocab_size})", param="logit_bias")
    if bad := [t for t in params.stop_token_ids if not 0 <= t < vocab_size]:
        raise InvalidRequest(f"stop_token_ids {shown(bad)} are not in [0, {vocab_size})", param="stop_token_ids")
    if any(not -100 <= v <= 100 for v in params.logit_bias.values()):
        raise InvalidRequest("logit_bias values must be in [-100, 100]", param="logit_bias")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if params.prompt_logprobs is not None and not 0 <= params.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="prompt_logprobs")
