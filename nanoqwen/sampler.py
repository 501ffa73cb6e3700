"""Batched sampling with per-row parameters and no host synchronisation.

Randomness is a counter-based hash of (request seed, output index, token id) rather than a
generator's stream, so a seeded request samples the same tokens whatever else shares its batch,
and the whole step stays static-shaped (capturable) with no per-row generator objects.
Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws token i with probability p_i.

What a step has to do is one of MODES, chosen on the host from the batch's parameters (no sync):
each mode is a separate capture, and a row that does not need a mode's extra work gets exactly the
result it would get in the cheaper mode, so a row's tokens never depend on its batch-mates.
On the CPU every sampled mode is one C kernel call (ops/cpu/sample.py) where it built: the same
distributions and hash, its own logs, so all CPU modes share that kernel's noise; greedy is its argmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ops.cpu import sample as cpu_sample

if TYPE_CHECKING:  # annotations only: llguidance is the grammars' import
    from llguidance import LLMatcher

_MASK32 = 0xFFFFFFFF
# argmax only | + temperature and noise, every row's top-k within TOP_K_CANDIDATES | + temperature
# and noise over the vocabulary | + top-k/top-p/min-p over the vocabulary.
MODES = ("greedy", "top_k", "sample", "filter")
# A row whose top-k is at most this samples among the logits' top candidates only (torch.topk, then
# noise for those alone): Gumbel-max over the surviving candidates is exact sampling, at a cost close
# to greedy's argmax instead of hashing the whole vocabulary.
TOP_K_CANDIDATES = 64


def seed_key(seed: int) -> int:
    """A request seed (any int) -> a well-mixed 32-bit key (splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int32 lanes: products wrap mod 2^32; right shifts are arithmetic, so the mask makes them logical.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x5BD1E995
    return x ^ ((x >> 16) & 0xFFFF)


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    """[B] ints holding 32-bit patterns (int32, or int64 in [0, 2^32)) -> int32 with those bits."""
    if values.dtype == torch.int32:
        return values
    return (((values.long() + (1 << 31)) & _MASK32) - (1 << 31)).int()


def exponential_noise(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [B, N] determined by (key, step, token id) alone. keys/steps: [B], any int dtype
    (int32 keys hold the 32-bit key's bit pattern); token_ids: [B, N] or [N] (broadcast to every row)."""
    row = _mix32(_as_int32(keys) ^ _mix32(_as_int32(steps)))  # [B]
    bits = _mix32(row.unsqueeze(1) + token_ids.int() * 0x2545F491)  # [B, N]
    # (0, 1): the top 24-bit value's midpoint rounds to 1.0 in fp32, whose zero noise would win
    # the race whatever its logit (even -inf: a token a grammar or a bias bans).
    uniform = ((((bits >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / (1 << 24))).clamp(max=1.0 - 2.0**-24)
    return -torch.log(uniform)


def _race(scaled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race argmax(p / E) in log space, argmax(logit - log E): no softmax, so the
    winner depends on each candidate's own logit and noise only, not on which others are scored."""
    return (scaled - noise.log()).argmax(dim=-1)


@dataclass
class SamplingRows:
    """Per-row sampling settings on the device, [B] each: views of the runner's static inputs."""

    temperature: torch.Tensor  # fp32; 0 = greedy
    top_p: torch.Tensor  # fp32
    top_k: torch.Tensor  # int; <= 0 = off
    min_p: torch.Tensor  # fp32
    keys: torch.Tensor  # int32 bit patterns of the 32-bit seed keys (int64 values work too)
    steps: torch.Tensor  # int; output index of the token being sampled

    def __getitem__(self, rows: slice) -> SamplingRows:
        return SamplingRows(self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows],
                            self.keys[rows], self.steps[rows])

    @property
    def filtered(self) -> torch.Tensor:  # [B] bool: rows with any of top-k, top-p, min-p
        return (self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0)

    @property
    def few_candidates(self) -> torch.Tensor:  # [B] bool: rows sampled among the top candidates only
        return (self.top_k > 0) & (self.top_k <= TOP_K_CANDIDATES)


@dataclass
class Penalties:
    """Presence/frequency/repetition penalties: every row's settings ([B] each; neutral: 0, 0, 1) and each penalised
    row's history as entries sorted by row, one per distinct token it has seen (in the prompt or generated)."""

    presence: torch.Tensor  # fp32 [B]
    frequency: torch.Tensor  # fp32 [B]
    repetition: torch.Tensor  # fp32 [B]
    rows: torch.Tensor  # int64 [N]: (row, token, output count) of each entry; a row's tokens distinct
    tokens: torch.Tensor  # int64 [N]
    counts: torch.Tensor  # fp32 [N]: how often the row generated the token (0: seen in the prompt only)


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """logits [B, V] -> a new tensor with the repetition penalty (as in transformers and vLLM) on every token seen
    in the prompt or output, then OpenAI's frequency and presence penalties on generated tokens. Only the entries'
    tokens change (an unseen token's penalties are zero), as in the CPU kernel's `penalised` (ops/cpu/csrc/sample.c),
    which does the same operations in the same order."""
    p = penalties
    values = logits[p.rows, p.tokens]  # [N]
    rep = p.repetition[p.rows]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - p.frequency[p.rows] * p.counts - p.presence[p.rows] * (p.counts > 0).float()
    return logits.index_put((p.rows, p.tokens), values)


@dataclass
class LogitAdjust:
    """What requests add to their rows' logits: `logit_bias` entries (and min_tokens' ban on stop ids, as -inf
    entries), and the allowed tokens of rows under a grammar or allowed_token_ids."""

    bias_rows: torch.Tensor  # int64 [N]: (row, token, value) of every bias entry
    bias_tokens: torch.Tensor  # int64 [N]
    bias_values: torch.Tensor  # fp32 [N]
    mask_rows: torch.Tensor  # int64 [R]: the rows under a grammar or allowed_token_ids
    bitmask: torch.Tensor  # int32 [R, ceil(V/32)]: bit t % 32 of word t // 32 set = token t allowed


_BITS = torch.arange(32, dtype=torch.int32)
_NO_IDS = torch.zeros(0, dtype=torch.int64)
_UNADJUSTED = LogitAdjust(_NO_IDS, _NO_IDS, torch.zeros(0), _NO_IDS, torch.zeros(0, 0, dtype=torch.int32))
_UNPENALISED = Penalties(torch.zeros(0), torch.zeros(0), torch.zeros(0), _NO_IDS, _NO_IDS, torch.zeros(0))


def token_bitmask(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """The LogitAdjust.bitmask row that allows `token_ids` only: int32 [ceil(vocab_size/32)]."""
    allowed = np.zeros(-(-vocab_size // 32) * 32, dtype=bool)
    allowed[np.asarray(token_ids, dtype=np.int64)] = True
    # little bit order: bit i of byte j is token 8j + i, so each little-endian int32 word w holds tokens 32w..32w+31
    return torch.from_numpy(np.packbits(allowed, bitorder="little").view("<i4").copy())


def compute_mask(matcher: LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """An llguidance matcher's allowed tokens into row `row` of bitmask (int32 [B, ceil(V/32)] on the host). What
    llguidance.torch.fill_next_token_bitmask does; importing that module runs a torch.compile decorator, which pulls
    in dynamo, inductor, sympy and triton: ~0.19 GB resident per process."""
    words = bitmask[row]  # [ceil(V/32)] int32, contiguous
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


def apply_adjust(logits: torch.Tensor, adjust: LogitAdjust) -> torch.Tensor:
    """logits [B, V] -> a new tensor with the biases added, then the disallowed tokens of masked rows at -inf."""
    logits = logits.index_put((adjust.bias_rows, adjust.bias_tokens), adjust.bias_values, accumulate=True)
    if len(adjust.mask_rows):
        bits = (adjust.bitmask.unsqueeze(-1) >> _BITS.to(logits.device)) & 1  # [R, W, 32]
        allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()  # [R, V]
        logits[adjust.mask_rows] = logits[adjust.mask_rows].masked_fill(~allowed, float("-inf"))
    return logits


def _filter_sorted(sorted_logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """sorted_logits: [B, N] descending (N: the vocabulary, or a row's top candidates when N >= its
    top-k) -> the same with the tokens that top-k, then top-p, then min-p remove set to -inf."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device).unsqueeze(0)
    top_k = rows.top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    drop = before >= rows.top_p.unsqueeze(1)
    drop |= probs < rows.min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return sorted_logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p, each per row; removed tokens get -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]; ties: the lowest id first
    return torch.full_like(logits, float("-inf")).scatter(1, order, _filter_sorted(sorted_logits, rows))


def _sample_candidates(logits: torch.Tensor, rows: SamplingRows, temperature: torch.Tensor) -> torch.Tensor:
    """Rows whose top-k is within TOP_K_CANDIDATES: filter and race their top candidates only. -> [B]"""
    values, ids = logits.topk(min(TOP_K_CANDIDATES, logits.shape[-1]), dim=-1)  # [B, K], descending
    ids, by_id = ids.sort(dim=-1)  # ties ranked the lowest id first, as filter_logits and the C kernel rank them:
    values, by_value = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)  # a cut keeps the same ids
    ids = ids.gather(1, by_value)
    scaled = _filter_sorted(values / temperature, rows)
    winner = _race(scaled, exponential_noise(rows.keys, rows.steps, ids))  # [B]
    return ids.gather(1, winner.unsqueeze(1)).squeeze(1)


def reserve(vocab_size: int, device: torch.device) -> None:
    """Allocates now (at the engine's setup) what `sample` needs for rows of vocab_size logits on `device`: on the CPU,
    the kernel's scratch (ops/cpu/sample.py), so that no step allocates it and a failure raises here."""
    if device.type == "cpu" and cpu_sample.KERNEL.ready:
        cpu_sample.reserve(vocab_size)


def sample(logits: torch.Tensor, rows: SamplingRows, mode: str, penalties: Penalties | None = None,
           adjust: LogitAdjust | None = None) -> torch.Tensor:
    """logits: [B, V] fp32 (or the model's bf16 where the CPU's greedy argmax reads them: exact, the same tokens)
    -> next tokens [B] int64. `mode` must cover every row's settings:
    "greedy" when all temperatures are 0, "top_k" when every sampled row is `few_candidates`, "filter"
    when any sampled row filters. A `few_candidates` row is sampled the same way in every mode.
    Penalties, then logit biases and grammar masks, apply before temperature and filtering: on the CPU in the C
    kernel, on a copy of each row they touch (apply_penalties and apply_adjust elsewhere)."""
    on_cpu = logits.device.type == "cpu" and cpu_sample.KERNEL.ready
    if on_cpu and mode == "greedy" and adjust is None and penalties is None:
        return cpu_sample.argmax_rows_cpu(logits if logits.dtype == torch.bfloat16 else logits.float())
    if on_cpu:  # greedy mode with adjustments too: every temperature is 0, so each row's argmax
        a, p = adjust or _UNADJUSTED, penalties or _UNPENALISED
        return cpu_sample.sample_rows_cpu(logits.float(), rows.temperature, rows.top_p, rows.top_k.int(), rows.min_p,
                                          _as_int32(rows.keys), _as_int32(rows.steps), a.bias_rows, a.bias_tokens,
                                          a.bias_values, a.mask_rows, a.bitmask, p.rows, p.tokens, p.counts,
                                          p.presence, p.frequency, p.repetition)
    if penalties is not None:
        logits = apply_penalties(logits, penalties)
    if adjust is not None:
        logits = apply_adjust(logits, adjust)
    if mode == "greedy":
        return logits.argmax(dim=-1)
    greedy = logits.argmax(dim=-1)
    temperature = rows.temperature.clamp(min=1e-5).unsqueeze(1)
    if mode == "top_k":
        sampled = _sample_candidates(logits, rows, temperature)
    else:
        scaled = logits / temperature
        if mode == "filter":
            scaled = torch.where(rows.filtered.unsqueeze(1), filter_logits(scaled, rows), scaled)
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        sampled = _race(scaled, exponential_noise(rows.keys, rows.steps, vocab))
        if mode == "filter":
            sampled = torch.where(rows.few_candidates, _sample_candidates(logits, rows, temperature), sampled)
    return torch.where(rows.temperature == 0, greedy, sampled)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution: chosen [B], top values [B, k], top ids [B, k]."""
    return top_of(logits.log_softmax(dim=-1), tokens, k)


def top_of(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_logprobs from the log-probabilities [B, V] themselves."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], tokens.new_empty(len(tokens), 0))
    return chosen, values, ids
