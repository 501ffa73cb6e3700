"""The prompt's own logprobs (what `echo` with `logprobs` and lm-eval's log-likelihoods read): the
hidden state at position p scores prompt token p + 1.

Works on any run of consecutive positions whose hidden states a step computed (a whole prefill,
or one chunk of it), in slices of SLICE positions, so the logits never exist for a whole long
prompt at once. The sequence must have computed these positions itself: prefix-cache hits skip
them, which is why the block manager does not look up a sequence that wants them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.sampler import top_of

if TYPE_CHECKING:  # annotations only: the engine package imports the runner
    from nanoqwen.engine.sequence import Sequence

SLICE = 256  # positions per slice: [256, 151936] fp32 logits are 156 MB


@dataclass
class PromptLogprobsOutput:
    """Prompt tokens start + 1 .. start + len(logprobs), each given the tokens before it."""

    start: int  # the position whose hidden state scores the first of them
    logprobs: list[float]
    top_values: list[list[float]]  # [len(logprobs), k]
    top_ids: list[list[int]]
    ranks: list[int] | None  # each token's among the vocabulary, when asked for (vLLM's prompt_logprobs)


def score_positions(model: Qwen3ForCausalLM, hidden: torch.Tensor, targets: torch.Tensor, k: int,
                    ranked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden: [T, H] of consecutive positions; targets: [T] int64, the token each one predicts.
    -> (logprob of each target [T], top-k values [T, k], top-k ids [T, k], rank of each target [T] with `ranked`,
    else [0])."""
    slices = [_scores(model.compute_logits(hidden[i : i + SLICE]), targets[i : i + SLICE], k, ranked)
              for i in range(0, len(targets), SLICE)]
    chosen, values, ids, ranks = (torch.cat(parts) for parts in zip(*slices))
    return chosen, values, ids, ranks


def _scores(logits: torch.Tensor, targets: torch.Tensor, k: int, ranked: bool) -> tuple[torch.Tensor, ...]:
    """logits: [S, V] -> score_positions' four, for S positions. A rank is vLLM's (its batched_count_greater_than):
    how many logprobs are >= the token's, 1 = the best; it reads the [S, V] logprobs once more (about as long as the
    rest of the scoring on the CPU), so only vLLM's prompt_logprobs ask for it."""
    logprobs = logits.log_softmax(dim=-1)
    chosen, values, ids = top_of(logprobs, targets, k)
    ranks = torch.count_nonzero(logprobs >= chosen.unsqueeze(1), dim=-1) if ranked else chosen.new_empty(0)
    return chosen, values, ids, ranks


def prefill_prompt_logprobs(model: Qwen3ForCausalLM, hidden: torch.Tensor, seqs: list[Sequence], starts: list[int],
                            query_lens: list[int], to_device: Callable[[torch.Tensor], torch.Tensor],
                            ) -> list[PromptLogprobsOutput | None] | None:
    """Per sequence of a packed prefill step (hidden: [sum(query_lens), H], sequence i's positions
    starts[i] .. starts[i] + query_lens[i] in turn: a whole prefill or a chunk of one), the logprobs
    of the prompt tokens those positions predict, for the sequences that want them. None when none
    does (the usual prefill: nothing is computed)."""
    if not any(seq.wants_prompt_logprobs for seq in seqs):
        return None
    out: list[PromptLogprobsOutput | None] = []
    row = 0
    for seq, start, query_len in zip(seqs, starts, query_lens):
        # the last prompt token is predicted by position P - 2; later positions score the answer
        stop = min(start + query_len, seq.num_prompt_tokens - 1)
        # positions scored before a preemption are recomputed, not scored twice
        first = max(start, len(seq.request.prompt_logprobs.tokens)) if seq.wants_prompt_logprobs else stop
        if stop <= first:
            out.append(None)
        else:
            targets = to_device(torch.tensor(seq.token_ids[first + 1 : stop + 1], dtype=torch.int64))
            params = seq.request.params
            chosen, values, ids, ranks = score_positions(model, hidden[row + first - start : row + stop - start],
                                                         targets, params.prompt_logprobs or 0, params.prompt_ranks)
            out.append(PromptLogprobsOutput(first, chosen.tolist(), values.tolist(), ids.tolist(),
                                            ranks.tolist() if params.prompt_ranks else None))
        row += query_len
    return out
