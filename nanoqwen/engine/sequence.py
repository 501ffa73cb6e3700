"""A request and its sequences (one per choice) as the scheduler sees them."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from nanoqwen.engine.request import PromptLogprobs, SamplingParams, TokenLogprob
from nanoqwen.engine.stream import EventStream
from nanoqwen.sampler import seed_key


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    stream: EventStream
    num_prompt_tokens: int
    sequences: list[Sequence] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # token ids that end a choice (EOS unless ignore_eos)
    # What min_tokens bans: EOS (even with ignore_eos) and stop_token_ids, as vLLM's all_stop_token_ids
    all_stop_ids: tuple[int, ...] = ()
    allowed_mask: torch.Tensor | None = None  # allowed_token_ids as a bitmask row (sampler.token_bitmask)
    started: bool = False  # first prefill scheduled (no longer queued)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at the first prefill
    prompt_logprobs: PromptLogprobs | None = None  # when asked for: filled by the prefill of choice 0

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)


class Sequence:
    def __init__(self, request: Request, index: int, prompt: list[int], seed: int, max_tokens: int) -> None:
        self.request = request
        self.index = index  # choice index
        self.token_ids = list(prompt)  # prompt + generated
        self.num_prompt_tokens = len(prompt)
        self.seed_key = seed_key(seed)  # what the sampler's noise is keyed on
        self.max_tokens = max_tokens
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full block, in order
        # new at each allocation and each trim that frees a block: with the table's length, the runner's cue
        # that the block table changed (an append only lengthens it)
        self.alloc_epoch = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last prefill
        self.num_computed_tokens = 0  # tokens whose k/v are in the cache (cached + computed so far)
        self.text = None  # nanoqwen.text.TextPipeline, set by the engine
        # (where its text starts, logprob) of tokens whose text a stop string may still cut (output.released_logprobs)
        self.held_logprobs: list[tuple[int, TokenLogprob]] = []
        self.grammar = None  # nanoqwen.engine.grammar.RowGrammar of a constrained request, set by the engine
        self.draft_ids: list[int] = []  # speculative tokens the scheduled step verifies after token_ids
        self.ngram = None  # nanoqwen.engine.ngram.NgramMatcher, made at its first proposal

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether its prefill must score prompt tokens: once per request, by its first choice,
        which therefore computes its whole prompt (no prefix-cache hits)."""
        scored = self.request.prompt_logprobs
        return self.index == 0 and scored is not None and len(scored.tokens) < self.num_prompt_tokens - 1

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next one is sampled (1 when decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
