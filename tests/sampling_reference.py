"""The distribution a sampled token is drawn from, written out from the definitions (not nanoqwen's code), in float64:
vLLM's repetition penalty (on every token seen in the prompt or output: a positive logit divided by it, a negative one
multiplied), OpenAI's frequency and presence penalties (on generated tokens), the request's `logit_bias` added, the
temperature, then transformers' warpers in their order: top-k, top-p (a token stays while the mass ranked above it is
below top_p; the best always stays), min-p (a token stays while its probability is at least min_p times the best's).
And a chi-square test of drawn tokens against it."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# How close a filter's cut may come to a tie or a threshold before the reference refuses the case: the server's fp32
# sums may fall on the other side there, which no sampled-distribution test should hinge on.
MARGIN = 1e-4


@dataclass
class Params:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def body(self) -> dict:
        """The request fields that ask for these settings (every one set: nothing left to generation defaults)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty,
                "logit_bias": {str(t): b for t, b in self.logit_bias.items()}}


def probabilities(logits: np.ndarray, params: Params, prompt: Sequence[int], output: Sequence[int]) -> np.ndarray:
    """logits [V] (the model's raw scores for the next token) -> its probabilities [V] float64 under `params`, given
    the prompt's and the output's tokens so far."""
    x = logits.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    r = params.repetition_penalty
    x[seen] = np.where(x[seen] > 0, x[seen] / r, x[seen] * r)
    for token, count in Counter(output).items():
        x[token] -= params.frequency_penalty * count + params.presence_penalty
    for token, bias in params.logit_bias.items():
        x[token] += bias
    x /= params.temperature
    order = np.lexsort((np.arange(len(x)), -x))  # descending, ties by id
    kept = order[:params.top_k] if params.top_k > 0 else order
    probs = _softmax(x[kept])
    if params.top_p < 1:
        before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])  # ascending
        n = max(1, int(np.sum(before < params.top_p)))
        _assert_clear(before, n, params.top_p, "top_p")
        kept, probs = kept[:n], probs[:n] / probs[:n].sum()
    if params.min_p > 0:
        ratio = probs / probs[0]  # descending
        n = int(np.sum(ratio >= params.min_p))
        _assert_clear(-ratio, n, -params.min_p, "min_p")
        kept, probs = kept[:n], probs[:n] / probs[:n].sum()
    out = np.zeros(len(x))
    out[kept] = probs
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _assert_clear(values: np.ndarray, n: int, threshold: float, name: str) -> None:
    """values ascending, the first n kept (below the threshold): the last kept and the first dropped clear of it."""
    gaps = [threshold - values[n - 1] if n > 1 else np.inf, values[n] - threshold if n < len(values) else np.inf]
    assert min(gaps) > MARGIN, f"{name} {abs(threshold)} cuts within {min(gaps):.2g} of a token: pick another case"


def chi2_critical(df: int, z: float) -> float:
    """The chi-square quantile whose upper tail is the standard normal's above z (z = 5.2: p = 1e-7), by Wilson and
    Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@dataclass
class Verdict:
    chi2: float
    df: int
    critical: float
    outside: Counter  # outcomes drawn that have probability 0
    table: list[tuple[Hashable, int, float]]  # (bin, observed, expected)

    @property
    def ok(self) -> bool:
        return not self.outside and self.chi2 < self.critical

    def __str__(self) -> str:
        rows = ", ".join(f"{b!r}: {o} vs {e:.1f}" for b, o, e in self.table)
        outside = dict(self.outside)
        return f"chi2 {self.chi2:.1f} (df {self.df}, critical {self.critical:.1f}); outside {outside}; {rows}"


def chi_square(draws: Sequence[Hashable], expected: Mapping[Hashable, float], z: float = 5.2) -> Verdict:
    """Pearson's test of `draws` against the outcome probabilities `expected` (summing to 1; an outcome missing has
    probability 0): each outcome expected at least 5 times a bin of its own, the others pooled (into the smallest
    bin when they are expected fewer than 5 times together). A draw of probability 0 fails the verdict by itself."""
    total = len(draws)
    counts = Counter(draws)
    outside = Counter({o: c for o, c in counts.items() if expected.get(o, 0.0) <= 0})
    big = {o for o, p in expected.items() if p * total >= 5}
    assert big, "too few draws for any bin"
    bins: dict[Hashable, tuple[int, float]] = {o: (counts[o], expected[o] * total) for o in big}
    rest_seen = sum(c for o, c in counts.items() if o not in big and o not in outside)
    rest_expected = total - sum(e for _, e in bins.values())
    if rest_expected >= 5:
        bins["rest"] = (rest_seen, rest_expected)
    else:
        smallest = min(bins, key=lambda o: bins[o][1])
        seen, exp = bins[smallest]
        bins[smallest] = (seen + rest_seen, exp + rest_expected)
    chi2 = sum((o - e) ** 2 / e for o, e in bins.values())
    df = max(1, len(bins) - 1)
    return Verdict(chi2, df, chi2_critical(df, z), outside, [(b, o, e) for b, (o, e) in bins.items()])
