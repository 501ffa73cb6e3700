"""What goes into the engine (sampling parameters) and what comes out (events)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: llguidance is imported where grammars are compiled
    from nanoqwen.engine.grammar import Grammar

# a temperature below it is greedy, as 0 is: a client's 1e-6 means greedy, and sampled at the sampler's floor (1e-5)
# near-tied tokens would go to the seed. vLLM instead samples any temperature under 0.01 at 0.01; SGLang: greedy
# below 1e-6
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW (0) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None = up to the context limit
    min_tokens: int = 0  # vLLM's: no EOS, stop token id or stop string ends the output before this many tokens
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # up to 4 stop strings
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's EOS ids
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20
    # the logprob of a token that ends the choice (EOS, a stop token id): legacy completions list it (OpenAI's
    # `<|endoftext|>`), chat's logprobs are its text's tokens (OpenAI's: none for the end of the turn)
    stop_token_logprob: bool = True
    prompt_logprobs: int | None = None  # k: each prompt token's logprob and the top k (vLLM's); None = off
    prompt_ranks: bool = False  # with prompt_logprobs: each prompt token's rank among the vocabulary too
    n: int = 1
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # vLLM's: the only ids that may be sampled (None: any)
    grammar: Grammar | None = None  # the output's constraint (structured outputs, forced tool calls)
    # the request's field that asked for it, as the client named it: the param of the failure when the answer cannot
    # follow it (a matcher's error mid-answer)
    grammar_field: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filters(self) -> bool:
        return self.top_p < 1 or self.top_k > 0 or self.min_p > 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob(TopLogprob):
    """A chosen token's: its own fields, then the alternatives'."""
    top_logprobs: list[TopLogprob]
    rank: int | None = None  # a prompt token's among the vocabulary (vLLM's prompt_logprobs): 1 = the best


@dataclass
class PromptLogprobs:
    first_token: str  # the prompt's first token, which nothing predicts: its logprob is null
    tokens: list[TokenLogprob]  # prompt tokens 1.., each given the ones before it


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Event:
    """One step's output for one choice of one request.

    A request's stream ends with exactly one event whose `usage` is set (after every choice
    has finished) or whose `error` is set.
    """

    index: int = 0  # choice index (0..n-1)
    text: str = ""  # content delta
    reasoning: str = ""  # reasoning (<think>) delta
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on each choice's first event, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    error: str | None = None
    error_param: str | None = None  # with `error`: the request's field at fault, the client's error; None: the server's
    admitted: bool = False  # no output: the request left the queue (sent only where asked: api.serving.Batch)

    @property
    def is_last(self) -> bool:
        return self.usage is not None or self.error is not None
