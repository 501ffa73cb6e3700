"""Batched sampling with per-row parameters and no host synchronisation.

Randomness is a counter-based hash of (request seed, output index, token id) rather than a
generator's stream, so a seeded request samples the same tokens whatever else shares its batch,
and the whole step stays static-shaped (capturable) with no per-row generator objects.
Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws token i with probability p_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def seed_key(seed: int) -> int:
    """A request seed (any int) -> a well-mixed 32-bit key (splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 lanes holding 32-bit values; multipliers < 2^31 keep every product below 2^63.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [B, V] determined by (key, step, token id) alone; keys/steps: [B] int64."""
    row = _mix32(keys ^ _mix32(steps & _MASK32))  # [B]
    token = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix32((row.unsqueeze(1) + token.unsqueeze(0) * 0x2545F491) & _MASK32)  # [B, V]
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(uniform)


@dataclass
class SamplingBatch:
    """Per-row sampling inputs on the device ([B] each) and host-side flags that skip work."""

    temperature: torch.Tensor  # fp32; 0 = greedy
    top_p: torch.Tensor  # fp32
    top_k: torch.Tensor  # int64; <= 0 = off
    min_p: torch.Tensor  # fp32
    keys: torch.Tensor  # int64 seed keys
    steps: torch.Tensor  # int64 output index of the token being sampled
    all_greedy: bool
    needs_filter: bool  # any row with top_p < 1, top_k > 0 or min_p > 0
    # Penalties (None when no row uses them)
    presence: torch.Tensor | None = None  # fp32 [B]
    frequency: torch.Tensor | None = None  # fp32 [B]
    repetition: torch.Tensor | None = None  # fp32 [B]
    output_counts: torch.Tensor | None = None  # fp32 [B, V]: generated-token counts
    seen_mask: torch.Tensor | None = None  # bool [B, V]: prompt or generated


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; repetition penalty (as in
    transformers and vLLM) on every token seen in the prompt or output."""
    rep = batch.repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(batch.seen_mask, penalised, logits)
    counts = batch.output_counts
    return logits - batch.frequency.unsqueeze(1) * counts - batch.presence.unsqueeze(1) * (counts > 0).float()


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p, each per row; removed tokens get -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    drop = (batch.top_k.unsqueeze(1) > 0) & (rank >= batch.top_k.unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    drop = before >= batch.top_p.unsqueeze(1)
    drop |= probs < batch.min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [B, V] fp32 -> next tokens [B] int64."""
    if batch.output_counts is not None:
        logits = apply_penalties(logits, batch)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    scaled = logits / batch.temperature.clamp(min=1e-5).unsqueeze(1)
    if batch.needs_filter:
        scaled = filter_logits(scaled, batch)
    probs = scaled.softmax(dim=-1)
    sampled = (probs / exponential_noise(batch.keys, batch.steps, logits.shape[-1])).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy, sampled)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution: chosen [B], top values [B, k], top ids [B, k]."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], tokens.new_empty(len(tokens), 0))
    return chosen, values, ids
