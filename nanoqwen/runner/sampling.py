"""The sampler's side of a step: each row's settings staged into the static inputs, the sampler
mode the batch needs, the requests' logit biases and token masks, and the step's output (tokens,
logprobs) brought to the host (penalties: nanoqwen/runner/penalties.py). The sampling itself is nanoqwen/sampler.py."""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher

from nanoqwen.config import resolve_threads
from nanoqwen.runner.mask_thread import MaskThread
from nanoqwen.runner.prompt_logprobs import PromptLogprobsOutput
from nanoqwen.sampler import TOP_K_CANDIDATES, LogitAdjust, SamplingRows, compute_mask, top_logprobs

if TYPE_CHECKING:  # annotations only: the engine package imports the runner
    from nanoqwen.engine.request import SamplingParams
    from nanoqwen.engine.sequence import Sequence


@dataclass
class StepOutput:
    tokens: list[int]  # one per sequence
    logprobs: list[float] | None = None  # chosen token's logprob, when any sequence asked
    top_values: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None
    prompt_logprobs: list[PromptLogprobsOutput | None] | None = None  # per row; set when a row scored its prompt
    grammar_failed: list[Sequence] | tuple[()] = ()  # whose grammar's matcher erred (LogitAdjuster.failed)


def sampling_mode(params: list[SamplingParams]) -> str:
    """The cheapest of sampler.MODES that serves every row."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return "greedy"
    if all(0 < p.top_k <= TOP_K_CANDIDATES for p in sampled):
        return "top_k"
    return "filter" if any(p.filters for p in sampled) else "sample"


def sampled_positions(seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """Each sequence once per position it samples at (its token, then each draft), and each position's output
    index: the one it would have had without drafts."""
    rows = [seq for seq in seqs for _ in range(1 + len(seq.draft_ids))]
    steps = [seq.num_output_tokens + i for seq in seqs for i in range(1 + len(seq.draft_ids))]
    return rows, steps


def stage_sampling(h: SamplingRows, seqs: list[Sequence], bucket: int, vocab_size: int,
                   steps: list[int] | None = None) -> tuple[str, bool]:
    """Writes each row's sampling settings into the host staging `h` (numpy views); padded lanes are greedy.
    `steps`: each row's output index, when not its sequence's next (a verified draft's position).
    -> (the sampler mode that serves every row, whether any row is penalised)."""
    n = len(seqs)
    params = [seq.request.params for seq in seqs]
    h.temperature[:n] = [0.0 if p.greedy else p.temperature for p in params]
    h.top_p[:n] = [p.top_p for p in params]
    h.top_k[:n] = [min(p.top_k, vocab_size) for p in params]
    h.min_p[:n] = [p.min_p for p in params]
    h.keys[:n] = [seq.seed_key for seq in seqs]
    h.steps[:n] = steps if steps is not None else [seq.num_output_tokens for seq in seqs]
    h.temperature[n:bucket] = 0.0
    h.top_p[n:bucket] = 1.0
    h.top_k[n:bucket] = 0
    h.min_p[n:bucket] = 0.0
    return sampling_mode(params), any(p.penalized for p in params)


class LogitAdjuster:
    """Each step's logit biases and token masks: a grammar's allowed tokens (each constrained row's matcher brought up
    to date with the tokens sampled since its last step, then its bitmask row filled: on the mask thread, while the
    forward runs), allowed_token_ids, and the ban on the stop ids (min_tokens', a promised answer's thought)."""

    def __init__(self, rows: int, vocab_size: int, to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """rows: the most sequences a step samples (a drafting sequence's positions share its row)."""
        self.to_device = to_device
        self.host_bitmask = torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)
        self._words = self.host_bitmask.numpy().view(np.uint32)  # the same memory, unsigned: plain bit operations
        # id(logit_bias) -> (logit_bias, its tokens int64 [N], its values fp32 [N]) of the last step's rows: a
        # request's dict (which the entry keeps alive) converted once, not each step (30k entries: 12-27 ms)
        self._biases: dict[int, tuple[dict[int, float], np.ndarray, np.ndarray]] = {}
        self._thread = MaskThread()
        weakref.finalize(self, self._thread.close).atexit = False  # at exit the thread just stops
        self._seqs: list[Sequence] = []  # the rows of the step started (none: it needs no adjusting)
        self._later = False  # its masks are filled at build(): no row has a grammar
        self._slots: list[int] = []  # each row's bitmask slot, -1 where it may sample any token
        # The started step's sequences whose grammar's matcher erred (RowGrammar.fill_end), read once it is built: a
        # list of the step's own, which a failed step's job, still running, cannot fill
        self.failed: list[Sequence] | tuple[()] = ()

    @staticmethod
    def wanted(seqs: list[Sequence]) -> bool:
        """Whether any row has a logit bias, a grammar (active or not yet), allowed ids or min_tokens to reach."""
        return any(logits_adjusted(seq) for seq in seqs)

    def start(self, seqs: list[Sequence]) -> bool:
        """Whether the step's rows need adjusting (wanted); if so begins their masks before the forward: on the mask
        thread where a row has a grammar (its matcher's sync and mask may take milliseconds: profiles/RESULTS.md,
        fuel8), else at build(), after the launch (allowed_token_ids' masks are copies). The engine thread leaves the
        rows' grammars to that thread until build()."""
        self._seqs = seqs if self.wanted(seqs) else []
        self._later = not any(seq.grammar is not None for seq in self._seqs)
        self.failed = [] if self._seqs and not self._later else ()  # a step with no grammar allocates nothing
        if self._seqs and not self._later:
            self._thread.start(functools.partial(self._fill_masks, seqs, self.failed))
        return bool(self._seqs)

    def build(self) -> LogitAdjust | None:
        """The started step's adjustments, its masks joined; None when no row has a logit bias, a mask or a ban
        (the step then needs nothing)."""
        if self._later:
            self._thread.start(functools.partial(self._fill_masks, self._seqs, self.failed), here=True)
        self._thread.wait()
        seqs, row_slots = self._seqs, self._slots
        entries: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, tokens, values) of each row's bias entries
        biases: dict[int, tuple[dict[int, float], np.ndarray, np.ndarray]] = {}
        mask_rows = [row for row, slot in enumerate(row_slots) if slot >= 0]
        mask_slots = [row_slots[row] for row in mask_rows]
        slots = max(mask_slots, default=-1) + 1
        for row, seq in enumerate(seqs):
            params = seq.request.params
            banned: tuple[int, ...] = ()  # a sequence whose stop ids are banned never drafts: its first row only
            if not row or seq is not seqs[row - 1]:
                banned = banned_stops(seq)  # after the sync: a grammar's thought may have ended
                if banned and row_slots[row] >= 0:
                    self._ban(row_slots[row], banned)
            if params.logit_bias:
                key = id(params.logit_bias)
                biases[key] = (biases.get(key) or self._biases.get(key)  # n choices share one request's dict
                               or (params.logit_bias, *_bias_arrays(params.logit_bias)))
                entries.append((row, *biases[key][1:]))
            if banned and row_slots[row] < 0:  # after the bias: -inf whatever a bias added
                entries.append((row, *_ban_arrays(banned)))
        self._biases = biases
        if not entries and not mask_rows:
            return None

        def ids(values: list[int] | np.ndarray) -> torch.Tensor:
            return self.to_device(torch.as_tensor(np.asarray(values, dtype=np.int64)))

        rows = np.concatenate([np.full(len(tokens), row, dtype=np.int64) for row, tokens, _ in entries] or [[]])
        tokens = np.concatenate([tokens for _, tokens, _ in entries] or [[]])
        values = np.concatenate([values for _, _, values in entries] or [[]]).astype(np.float32, copy=False)
        bitmask = self.to_device(self.host_bitmask[:slots])
        if len(mask_rows) > slots:  # drafting rows: each position gets its sequence's mask
            bitmask = bitmask[ids(mask_slots)]
        return LogitAdjust(ids(rows), ids(tokens), self.to_device(torch.from_numpy(values)), ids(mask_rows), bitmask)

    def _fill_masks(self, seqs: list[Sequence], failed: list[Sequence] | tuple[()]) -> None:
        """The masks of a step's rows: each sequence's in the next free bitmask slot (a drafting sequence's
        positions share it), each row's slot in _slots, and in `failed` each sequence whose matcher erred. The
        matchers' masks are computed together."""
        row_slots: list[int] = []
        slots = 0
        grammars: list[tuple[Sequence, int]] = []  # (sequence, slot) of each masked row under a grammar
        pending: list[tuple[LLMatcher, int]] = []  # (matcher, slot) of each mask still to compute
        with torch.inference_mode():  # a thread's own mode, as on the engine thread: host_bitmask is an inference one
            for row, seq in enumerate(seqs):
                if row and seq is seqs[row - 1]:
                    row_slots.append(row_slots[-1])
                    continue
                grammar = seq.grammar
                if grammar is not None:
                    grammar.sync(seq.token_ids, seq.num_prompt_tokens)
                if grammar is not None and grammar.active:
                    grammars.append((seq, slots))
                    if grammar.fill_start(self.host_bitmask, slots):
                        pending.append((grammar.matcher, slots))
                elif seq.request.allowed_mask is not None:  # never with a grammar (validation refuses the pair)
                    self.host_bitmask[slots] = seq.request.allowed_mask
                else:  # may sample any token
                    row_slots.append(-1)
                    continue
                row_slots.append(slots)
                slots += 1
            self._compute_masks(pending)
            if grammars:
                failed.extend(seq for seq, slot in grammars if seq.grammar.fill_end(self.host_bitmask, slot))
        self._slots = row_slots

    def _compute_masks(self, pending: list[tuple[LLMatcher, int]]) -> None:
        """Each matcher's mask into its bitmask slot; several at once on llguidance's thread pool where there is one
        (_executor; it drops the GIL: 0.1-1 ms a JSON row, tens of ms a costly regex's), else one after another."""
        words = self.host_bitmask.shape[1]
        executor = _executor() if len(pending) > 1 else None
        if executor is not None:
            executor.unsafe_compute_mask_ptr(pending, self.host_bitmask.data_ptr(), words * 4,
                                             self.host_bitmask.shape[0])
            return
        for matcher, slot in pending:
            compute_mask(matcher, self.host_bitmask, slot)

    def _ban(self, slot: int, token_ids: tuple[int, ...]) -> None:
        """Clears `token_ids` from bitmask row `slot` unless they are all it allows: a grammar that can
        only end (or an allowed_token_ids of stop ids only) ends the choice before min_tokens."""
        words = self._words[slot]
        saved = [(t // 32, words[t // 32]) for t in token_ids]
        for t in token_ids:
            words[t // 32] &= ~np.uint32(1 << (t % 32))
        if not words.any():
            for word, value in saved:
                words[word] = value


def _bias_arrays(bias: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """A logit_bias as its tokens (int64 [N]) and values (fp32 [N])."""
    return np.fromiter(bias.keys(), np.int64, len(bias)), np.fromiter(bias.values(), np.float32, len(bias))


@functools.cache
def _executor() -> LLExecutor | None:
    """llguidance's thread pool for masks computed together, one for the process, made at the first step with two:
    80% of the CPUs this process may run on (llguidance's default share), at most 32. None under 2 threads (1-2
    CPUs): a pool of one computes the masks one after another, as the mask thread does itself, plus a handoff
    (profiles/RESULTS.md, mask9fix)."""
    threads = min(32, resolve_threads(0) * 4 // 5)
    return LLExecutor(num_threads=threads) if threads >= 2 else None


@functools.lru_cache(maxsize=64)
def _ban_arrays(token_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A ban's bias entries (ids int64, -inf fp32), made once per set of ids, not each step of a long thought; read
    only (build concatenates them)."""
    return np.array(token_ids, dtype=np.int64), np.full(len(token_ids), -np.inf, dtype=np.float32)


def banned_stops(seq: Sequence) -> tuple[int, ...]:
    """The sequence's stop ids banned this step: all of them until min_tokens; inside the free thought of a choice
    that promised a call or JSON (RowGrammar.bans_stops) all but the thought's end, `</think>`, should
    stop_token_ids hold it (the thought would have no end but length)."""
    if seq.num_output_tokens < seq.request.params.min_tokens:
        return seq.request.all_stop_ids
    if seq.grammar is not None and seq.grammar.bans_stops:
        return tuple(t for t in seq.request.all_stop_ids if t != seq.grammar.start_after)
    return ()


def logits_adjusted(seq: Sequence) -> bool:
    params = seq.request.params
    return bool(params.logit_bias) or seq.grammar is not None or params.allowed_token_ids is not None \
        or seq.num_output_tokens < params.min_tokens


def _logprobs_params(seqs: list[Sequence]) -> list[SamplingParams]:
    return [s.request.params for s in seqs if s.request.params.logprobs]


def wants_logprobs(seqs: list[Sequence]) -> bool:
    """Whether step_output reads the step's logits: a step where none does may leave them unwritten."""
    return bool(_logprobs_params(seqs))


def step_output(seqs: list[Sequence], logits: torch.Tensor | None, tokens: torch.Tensor) -> StepOutput:
    """The step's one host sync: the tokens, with logprobs when any row asked for them (logits None: none did)."""
    want = _logprobs_params(seqs)
    if not want:
        return StepOutput(tokens=tokens.tolist())
    k = max(p.top_logprobs for p in want)
    chosen, values, ids = top_logprobs(logits, tokens, k)
    return StepOutput(
        tokens=tokens.tolist(), logprobs=chosen.tolist(), top_values=values.tolist(), top_ids=ids.tolist()
    )
