"""Sampled tokens through a real `gunicorn -k gevent server:app` follow the distribution the request asks for, as
tests/sampling_reference.py writes it out from transformers' fp32 logits: temperature over the whole vocabulary, top-k,
top-p, min-p, their combination, logit_bias, the repetition penalty on prompt tokens, and presence/frequency penalties
on a two-token answer (the joint distribution of the pair). Each case draws 256 choices (8 seeded requests of n = 32,
in flight together) and passes a chi-square test at a false-alarm rate of 1e-6 (seven cases: under 1e-5 together); the
seeds are fixed, so the verdict is too. Every chosen token's logprob is transformers' raw log-softmax (the model's
distribution, before penalties, biases and temperature: README, as vLLM's default raw_logprobs)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
import torch

from chat_http import MODEL
from checkpoints import VOCAB_SIZE, make_checkpoint
from engine_util import shared_tokenizer
from nanoqwen.text import TokenBytes
from sampling_reference import Params, chi_square, probabilities
from server_process import GunicornServer

PROMPT = [9707, 1879, 11, 358, 1000, 1001, 1079]  # 1000 and 1001 in it: the repetition case penalises them
REQUESTS, N = 8, 32
Z = 4.75  # the chi-square test's false-alarm rate: p = 1e-6
# raw against processed logprobs differ by far more; token-exact logprobs (1e-4) are profiles/differential.py's. One
# first token of ~3,500 checked was 1.2e-4 off once (exact8 in profiles/RESULTS.md); of ~130,000 since, none past
# 2.7e-6 (lp8): a failure lists each logprob off with its top_logprobs, to tell which of the row's values moved.
TOL = 1e-3
TOP = 3  # top_logprobs asked: by them a logprob off says whether its row's normaliser moved (all alike) or one logit
FIRST_TOKENS = 4  # a two-token case's likeliest first tokens, whose second token's distribution is computed

CASES = {
    # the whole vocabulary at a temperature, a few tokens lifted above the other ~151,900 (pooled into one bin)
    "temperature": (Params(0.7, logit_bias={1002: 6.5, 1003: 7.0, 1004: 7.5, 1005: 8.0, 1001: 5.5}), 1),
    "top_k": (Params(1.3, top_k=6, logit_bias={1002: 5.0, 1003: 4.0, 1004: 4.5}), 1),
    # the head above the whole tail's mass, so that the nucleus ends inside it
    "top_p": (Params(0.8, top_p=0.75, logit_bias={1002: 14.0, 1003: 13.2, 1004: 13.6, 1005: 12.8}), 1),
    "min_p+top_p+top_k": (Params(1.0, top_p=0.9, top_k=8, min_p=0.12,
                                 logit_bias={1002: 9.0, 1003: 6.4, 1004: 7.0, 1005: 7.5}), 1),
    # 1000 and 1001 are prompt tokens: divided by the penalty (positive logits), then lifted by their bias
    "repetition": (Params(0.9, repetition_penalty=1.6, logit_bias={1000: 9.0, 1001: 9.5, 1002: 8.0, 1003: 6.5}), 1),
    # no penalty or bias: the second token is sampled after the replayed decode step, as a plain decode row is
    "top_k, two tokens": (Params(1.5, top_k=3), 2),
    # the second token's distribution depends on the first (its frequency and presence penalties)
    "penalties, two tokens": (Params(0.8, presence_penalty=0.6, frequency_penalty=1.1, repetition_penalty=1.2,
                                     logit_bias={1002: 9.0, 1003: 9.4, 1004: 9.8}), 2),
}


@dataclass
class Pieces:
    """Each token id's piece, as the legacy logprobs' `tokens` name it (a few ids share one: U+FFFD bytes)."""

    names: list[str]  # the distinct pieces
    of: np.ndarray  # int64 [V]: each id's index into names
    unique: dict[str, int]  # piece -> its id, for the pieces of one id

    def probabilities(self, probs: np.ndarray) -> dict[str, float]:
        """probs [V] by id -> the probability of each piece."""
        mass = np.bincount(self.of, weights=probs, minlength=len(self.names))
        return {self.names[i]: mass[i] for i in np.flatnonzero(mass)}


@pytest.fixture(scope="module")
def pieces() -> Pieces:
    tokens = TokenBytes(shared_tokenizer(make_checkpoint()))
    ids = [tokens.piece(t) for t in range(VOCAB_SIZE)]
    index: dict[str, int] = {}
    of = np.array([index.setdefault(piece, len(index)) for piece in ids])
    counts = np.bincount(of)
    return Pieces(list(index), of, {piece: t for t, piece in enumerate(ids) if counts[of[t]] == 1})


def model_logits(hf: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].double().numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def draw(server: GunicornServer, params: Params, max_tokens: int) -> list[dict[str, Any]]:
    """REQUESTS × N choices' legacy logprobs (tokens, token_logprobs), seeds 1000.. (each choice its own noise)."""
    def one(seed: int) -> list[dict[str, Any]]:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "n": N, "seed": seed, "logprobs": TOP,
                "ignore_eos": True, "skip_special_tokens": False, **params.body()}
        response = requests.post(server.url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return [choice["logprobs"] for choice in response.json()["choices"]]

    with ThreadPoolExecutor(4) as pool:  # in flight together: batched beside one another
        return [c for choices in pool.map(one, range(1000, 1000 + REQUESTS)) for c in choices]


def tops_off(tops: dict[str, float], raw: np.ndarray, pieces: Pieces) -> dict[str, float]:
    """Each top piece's logprob less transformers' (pieces of one id)."""
    return {piece: float(value - raw[pieces.unique[piece]]) for piece, value in tops.items() if piece in pieces.unique}


@pytest.mark.parametrize("case", CASES)
def test_sampled_tokens_follow_the_requested_distribution(server: GunicornServer, hf: torch.nn.Module,
                                                          pieces: Pieces, case: str) -> None:
    params, max_tokens = CASES[case]
    first = model_logits(hf, PROMPT)
    p1 = probabilities(first, params, PROMPT, [])
    # the raw log-softmax after each prefix of the answer whose tokens were computed (pieces of one id checked)
    raw = {(): log_softmax(first)}
    if max_tokens == 1:
        expected: dict[Any, float] = pieces.probabilities(p1)
    else:  # pairs after each of the likeliest first tokens; any other first token's pairs pooled
        expected = {}
        for t in np.argsort(-p1)[:FIRST_TOKENS].tolist():
            logits = model_logits(hf, [*PROMPT, t])
            first_piece = pieces.names[pieces.of[t]]
            raw[(first_piece,)] = log_softmax(logits)
            for piece, p in pieces.probabilities(probabilities(logits, params, PROMPT, [t])).items():
                expected[first_piece, piece] = p1[t] * p
        expected["other", "*"] = 1 - sum(expected.values())
    outcomes, checked, off = [], 0, []
    for choice in draw(server, params, max_tokens):
        answer = choice["tokens"]
        assert len(answer) == max_tokens
        for i, (piece, logprob) in enumerate(zip(answer, choice["token_logprobs"])):
            before = tuple(answer[:i])
            token = pieces.unique.get(piece)
            if before in raw and token is not None:
                checked += 1
                if abs(logprob - raw[before][token]) >= TOL:
                    off.append((answer, i, logprob, float(raw[before][token]), tops_off(choice["top_logprobs"][i],
                                                                                 raw[before], pieces)))
        outcome = answer[0] if max_tokens == 1 else tuple(answer)
        if max_tokens > 1 and outcome not in expected and (answer[0],) not in raw:
            outcome = ("other", "*")
        outcomes.append(outcome)
    # all of them: one choice's row, or every row of the case (then transformers' reference itself)
    assert not off, f"{case}: {len(off)} of {checked} logprobs off (answer, position, ours, transformers', " \
                    f"the top pieces' ours - transformers'): {off[:4]}"
    verdict = chi_square(outcomes, expected, Z)
    print(case, verdict)
    assert verdict.ok, f"{case}: {verdict}"
