"""Differential hunt: seeded random cases through a real `gunicorn -k gevent server:app` (tiny checkpoint, CPU, fp32)
in each mode, compared with transformers' greedy tokens and log-softmax. Prints each failure and a count per mode;
exit 1 on any failure.

python profiles/differential.py [--modes default eager wide spec spec-tight int8 int4 compile torch triton] \
    [--seed 0] [--mates 0] [--cases case_lengths ...]

`--mates N`: N threads send sampled batch-mates (random prompts, n 1-2, logprobs, penalties, a JSON format, streams
hung up on) throughout each case but those that wait for an idle engine (case_concurrent, case_edges): the greedy
answers must not change with them in the batch, and each mate must be answered.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from chat_http import MODEL, cpu_env, raw_request, server_stats, sse_payloads  # noqa: E402
from checkpoints import load_hf_model, make_checkpoint  # noqa: E402
from checks import Checks  # noqa: E402
from engine_util import hf_greedy  # noqa: E402
from nanoqwen import loader  # noqa: E402
from nanoqwen.text import TokenBytes  # noqa: E402
from quant_reference import load_quantised_hf_model  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from waits import wait_for  # noqa: E402

MAX_LEN = 512
NEW = 8
TOL = 1e-4


@dataclass
class Mode:
    env: dict[str, str]
    block: int = 16
    step_tokens: int = 512
    quant: str = "none"
    spec: bool = False
    preempts: bool = False  # the KV pool is small enough that the concurrent round must preempt


MODES = {
    "default": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_MAX_STEP_TOKENS": "48"}, step_tokens=48),
    # small blocks, a tiny KV pool (preemption under the concurrent round), eager steps
    "eager": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_GRAPH": "none", "NANOQWEN_BLOCK_SIZE": "8",
                   "NANOQWEN_MAX_STEP_TOKENS": "20", "NANOQWEN_NUM_KV_BLOCKS": "72"}, block=8, step_tokens=20,
                  preempts=True),
    "spec": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_SPECULATIVE_CONFIG": json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1})},
        spec=True),
    # drafts under a tiny KV pool (preemption), small blocks and a small step budget
    "spec-tight": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_BLOCK_SIZE": "8", "NANOQWEN_MAX_STEP_TOKENS": "24",
                        "NANOQWEN_NUM_KV_BLOCKS": "72", "NANOQWEN_SPECULATIVE_CONFIG": json.dumps(
                            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2})},
                       block=8, step_tokens=24, spec=True, preempts=True),
    "int8": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_QUANT": "int8"}, quant="int8"),
    "int4": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_QUANT": "int4", "NANOQWEN_MAX_STEP_TOKENS": "40"},
                 quant="int4", step_tokens=40),
    # a batch past the fp32 C linears' 8 rows (buckets 16 stay eager), 32-token blocks, a step budget just over it
    "wide": Mode({"NANOQWEN_MAX_BATCH": "16", "NANOQWEN_BLOCK_SIZE": "32", "NANOQWEN_MAX_STEP_TOKENS": "17"},
                 block=32, step_tokens=17),
    "compile": Mode({"NANOQWEN_MAX_BATCH": "4", "NANOQWEN_GRAPH": "compile", "NANOQWEN_KERNELS": "torch"}),
    # no C kernel: torch's ops and sampler alone (graph auto: none)
    "torch": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_CPU_KERNELS": "0"}),
    # the Triton kernels in Triton's interpreter (slow: pick a few --cases)
    "triton": Mode({"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_KERNELS": "triton", "TRITON_INTERPRET": "1"}),
}


@dataclass
class Ctx(Checks):
    srv: GunicornServer
    hf: torch.nn.Module
    tok: Any
    pieces: TokenBytes
    rng: random.Random
    mode: Mode
    passed: int = 0
    failures: list[str] = field(default_factory=list)

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(100, 150000) for _ in range(n)]

    def expected(self, prompt: list[int], new: int = NEW) -> str:
        return self.tok.decode(hf_greedy(self.hf, prompt, new), skip_special_tokens=False)

    def post(self, body: dict[str, Any], path: str = "/v1/completions") -> requests.Response:
        body = {"model": MODEL, "temperature": 0, "max_tokens": NEW, "ignore_eos": True,
                "skip_special_tokens": False, **body}
        return requests.post(self.srv.url + path, json=body, timeout=600, stream=bool(body.get("stream")))

    def texts(self, body: dict[str, Any]) -> list[str]:
        r = self.post(body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    def streamed(self, body: dict[str, Any]) -> list[str]:
        client = self.srv.openai_client(timeout=600)
        body = {"model": MODEL, "temperature": 0, "max_tokens": NEW,
                "extra_body": {"ignore_eos": True, "skip_special_tokens": False}, **body}
        out: dict[int, str] = {}
        for chunk in client.completions.create(**body, stream=True):
            for c in chunk.choices:
                out[c.index] = out.get(c.index, "") + c.text
        return [out[i] for i in sorted(out)]


def reference_logprobs(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [len(ids), V]


def legacy_top(c: Ctx, row: torch.Tensor, chosen: int, top: torch.return_types.topk) -> dict[str, float]:
    """The legacy top_logprobs map the server builds from log-softmax `row` [V] and its top k: keyed by piece, the
    chosen token's entry first, then the top k by rank, a later id overwriting an earlier one that shares its piece."""
    return {c.pieces.piece(chosen): row[chosen].item()} | {
        c.pieces.piece(i): row[i].item() for i in top.indices.tolist()}


def top_err(got: dict[str, float] | None, want: dict[str, float], kth: float) -> float:
    """The worst difference of two top_logprobs maps; inf when their keys differ, but for ids tied (within TOL) with
    the k-th largest logprob `kth`, which a batch's rounding may rank either way (the tiny checkpoint has ties)."""
    if got is None or len(got) != len(want):
        return float("inf")
    swapped = [got[k] for k in got.keys() - want.keys()] + [want[k] for k in want.keys() - got.keys()]
    if any(abs(v - kth) > TOL for v in swapped):
        return float("inf")
    return max(abs(got[k] - v) for k, v in want.items() if k in got)


def echo_errors(c: Ctx, lp: dict[str, Any], toks: list[int], k: int) -> tuple[float, list[int]]:
    """Legacy echo logprobs of `toks` against transformers: the worst error and the bad positions (negative: the
    top_logprobs map's keys or values). A missing or extra position is position 0."""
    ref = reference_logprobs(c.hf, toks)
    if len(lp["token_logprobs"]) != len(toks) or len(lp["top_logprobs"]) != len(toks) or \
            lp["token_logprobs"][0] is not None or lp["top_logprobs"][0] is not None:
        return float("inf"), [0]
    worst, bad = 0.0, []
    for i in range(1, len(toks)):
        err = abs(lp["token_logprobs"][i] - ref[i - 1, toks[i]].item())
        top = ref[i - 1].topk(k)
        terr = top_err(lp["top_logprobs"][i], legacy_top(c, ref[i - 1], toks[i], top),
                       top.values[-1].item() if k else 0.0)
        bad += [i] * (err > TOL) + [-i] * (terr > TOL)
        worst = max(worst, err, terr)
    return worst, bad


def boundaries(m: Mode) -> list[int]:
    b, s = m.block, m.step_tokens
    lens = {1, 2, b - 1, b, b + 1, 2 * b - 1, 2 * b, 2 * b + 1, s - 1, s, s + 1, 2 * s, 2 * s + 1, 255, 256, 257,
            MAX_LEN - NEW - 1, MAX_LEN - NEW}
    return sorted(n for n in lens if 1 <= n <= MAX_LEN - NEW)


def case_lengths(c: Ctx) -> None:
    for n in boundaries(c.mode):
        p = c.ids(n)
        got = c.texts({"prompt": p})
        c.check(got == [c.expected(p)], f"length {n}")
    # one over the context: a 400
    p = c.ids(MAX_LEN - NEW + 1)
    r = c.post({"prompt": p})
    c.check(r.status_code == 400 and "error" in r.json(), f"length over: {r.status_code} {r.text[:200]}")
    # max_tokens = 1 and a batch of all boundary lengths at once, streamed
    lens = boundaries(c.mode)[:8]
    ps = [c.ids(n) for n in lens]
    c.check(c.texts({"prompt": ps, "max_tokens": 1}) == [c.expected(p, 1) for p in ps], "max_tokens 1 batch")
    c.check(c.streamed({"prompt": ps}) == [c.expected(p) for p in ps], f"streamed batch {lens}")


def case_prefix(c: Ctx) -> None:
    b = c.mode.block
    base = c.ids(3 * b + 5)
    c.check(c.texts({"prompt": base}) == [c.expected(base)], "prefix base")
    for k in (b - 1, b, b + 1, 2 * b, 3 * b, len(base)):
        p = base[:k] + c.ids(c.rng.randrange(1, 2 * b))
        c.check(c.texts({"prompt": p}) == [c.expected(p)], f"prefix share {k}")
    # the base itself, now fully cached, and a prefix of it ending on a block boundary
    for p in (base, base[:2 * b]):
        c.check(c.texts({"prompt": p}) == [c.expected(p)], f"cached whole {len(p)}")
    # the same prompt twice in one batch, and n > 1 greedy
    p = c.ids(2 * b + 3)
    e = c.expected(p)
    c.check(c.texts({"prompt": [p, p]}) == [e, e], "same prompt twice in a batch")
    c.check(c.texts({"prompt": p, "n": 3}) == [e] * 3, "n=3 greedy")
    c.check(c.streamed({"prompt": [p, base], "n": 2}) == [e, e, c.expected(base), c.expected(base)], "n=2 streamed")


def case_logprobs(c: Ctx) -> None:
    for n in (1, c.mode.block, min(c.mode.step_tokens + 3, MAX_LEN - NEW), 256, 257, MAX_LEN - NEW):  # 256: a slice
        p = c.ids(n)
        r = c.post({"prompt": p, "logprobs": 5, "echo": True}).json()
        ch = r["choices"][0]
        gen = hf_greedy(c.hf, p, NEW)
        toks = p + gen
        worst, bad = echo_errors(c, ch["logprobs"], toks, 5)
        c.check(worst < TOL and ch["text"] == c.tok.decode(toks, skip_special_tokens=False),
                f"echo logprobs n={n} worst={worst:.2e} bad positions {len(bad)}: {bad[:4]}..{bad[-2:]}")
    # stop string across a token boundary, stop id, min_tokens
    p = c.ids(37)
    gen = hf_greedy(c.hf, p, 16)
    text = c.tok.decode(gen, skip_special_tokens=False)
    for k in range(2, 12):
        head = c.tok.decode(gen[:k], skip_special_tokens=False)
        nxt = c.tok.decode(gen[:k + 1], skip_special_tokens=False)
        if not text.startswith(nxt) or "\ufffd" in nxt or len(nxt) == len(head):
            continue
        stop = head[-1] + nxt[len(head)]
        if text.find(stop) != len(head) - 1:
            continue
        for stream in (False, True):
            body = {"prompt": p, "max_tokens": 16, "stop": [stop]}
            got = c.streamed(body) if stream else c.texts(body)
            c.check(got == [text[:text.index(stop)]], f"stop string {stop!r} stream={stream}")
        break
    # stop id with min_tokens beyond its first occurrence
    j = next((j for j in range(1, 10) if gen[j] not in gen[:j]), None)
    if j is not None:
        tid = gen[j]
        out = c.hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=tid,
                            min_new_tokens=j + 2, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        ref_gen = out[0, len(p):].tolist()
        if ref_gen[-1] == tid:
            ref_gen = ref_gen[:-1]
        exp = c.tok.decode(ref_gen, skip_special_tokens=False)
        got = c.texts({"prompt": p, "max_tokens": 16, "stop_token_ids": [tid], "min_tokens": j + 2})
        c.check(got == [exp], f"min_tokens {j + 2} stop id")


# Rounds of case_concurrent at most where the pool is meant to run dry: one preempted 1-4 times (exact7fix), so a round
# without any is possible; another round follows until one preempts.
PREEMPTION_ROUNDS = 3


def case_concurrent(c: Ctx) -> None:
    before = server_stats(c.srv)["preemptions"]
    for round_ in range(PREEMPTION_ROUNDS if c.mode.preempts else 1):
        concurrent_round(c)
        preempted = server_stats(c.srv)["preemptions"] - before
        print(f"concurrent round {round_ + 1}: {preempted} preemptions so far", flush=True)
        if preempted:
            break
    if c.mode.preempts:
        c.check(preempted > 0, f"{PREEMPTION_ROUNDS} concurrent rounds preempted: {preempted}")


def concurrent_round(c: Ctx) -> None:
    """12 concurrent mixed requests, 3 of them hung up mid-way; the others' answers checked, then the engine drained."""
    # where the pool is meant to run dry, only long prompts: a mix of short ones left some rounds unpreempted
    choices = [100, 120, 150] if c.mode.preempts else [1, 5, 17, 33, 64, 100, 150]
    lens = [c.rng.choice(choices) for _ in range(12)]
    prompts = [c.ids(n) for n in lens]
    results: dict[int, Any] = {}
    cancelled = set(range(0, 12, 4))

    def one(i: int) -> None:
        p = prompts[i]
        body = {"model": MODEL, "prompt": p, "temperature": 0, "max_tokens": 48, "ignore_eos": True,
                "skip_special_tokens": False, "stream": i % 2 == 1 or i in cancelled}
        try:
            if i in cancelled:
                with requests.post(c.srv.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
                    for n, _ in enumerate(r.iter_lines()):
                        if n >= 6:
                            break  # hang up mid-way
                results[i] = None
                return
            if body["stream"]:
                text = ""
                with requests.post(c.srv.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
                    for payload in sse_payloads(r):
                        if payload != "[DONE]":
                            text += "".join(ch["text"] for ch in json.loads(payload)["choices"])
                results[i] = text
            else:
                results[i] = requests.post(c.srv.url + "/v1/completions", json=body, timeout=600).json()[
                    "choices"][0]["text"]
        except Exception as exc:  # noqa: BLE001
            results[i] = f"EXC {exc!r}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(12):
        if i in cancelled:
            continue
        c.check(results[i] == c.expected(prompts[i], 48), f"concurrent {i} len={lens[i]}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = requests.get(c.srv.url + "/stats", timeout=30).json()
        if s["active_requests"] == s["queue_length"] == 0:
            break
        time.sleep(0.2)
    s = requests.get(c.srv.url + "/stats", timeout=30).json()
    print("stats after concurrent:", {k: s.get(k) for k in ("preemptions", "kv_cache_usage", "active_requests")})
    c.check(s["active_requests"] == s["queue_length"] == 0, "drained after concurrent")


def case_shared_inflight(c: Ctx) -> None:
    """Prompts sharing a long prefix sent at once (the first still prefilling when the others arrive, chunked across
    steps where the step budget is small), some identical, streamed and not."""
    base = c.ids(5 * c.mode.block + 3)
    prompts = [base, base, base[:-3], *(base + c.ids(k) for k in (1, 2, 5, 9)), base[:2 * c.mode.block]]
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 12}
        results[i] = c.streamed(body) if i % 2 else c.texts(body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        c.check(results.get(i) == [c.expected(p, 12)], f"shared in flight {i} len={len(p)}")


def case_spec(c: Ctx) -> None:
    # repetitive prompts: the n-gram drafts find matches
    for n in (3, 7, 16):
        unit = c.ids(n)
        p = unit * 6 + unit[: n // 2]
        c.check(c.texts({"prompt": p, "max_tokens": 24}) == [c.expected(p, 24)], f"spec repetitive {n}")
        gen = hf_greedy(c.hf, p, 24)
        for cut in (1, 2, 3, 5):  # max_tokens inside an accepted run
            c.check(c.texts({"prompt": p, "max_tokens": cut}) == [c.expected(p, cut)], f"spec max_tokens {cut}")
        j = next((j for j in range(2, 20) if gen[j] not in gen[:j]), None)
        if j is not None:  # a stop id inside an accepted run
            c.check(c.texts({"prompt": p, "max_tokens": 24, "stop_token_ids": [gen[j]]}) == [
                c.tok.decode(gen[:j], skip_special_tokens=False)], f"spec stop id at {j}")
        ps = [p, c.ids(9), unit * 3]
        c.check(c.streamed({"prompt": ps, "max_tokens": 24}) == [c.expected(q, 24) for q in ps], f"spec batch {n}")


def case_chat(c: Ctx) -> None:
    """Chat completions (the template's tokens) with logprobs and top_logprobs, streamed and not: NEW entries, each
    one's token the greedy id's piece and its logprob, and its 3 top entries' pieces (in rank order) and logprobs,
    against transformers' log-softmax after the greedy tokens."""
    for words in (1, 40, 150):
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": " ".join(c.tok.decode([t]) for t in c.ids(words))}]
        text = c.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = c.tok.encode(text, add_special_tokens=False)
        if len(ids) > MAX_LEN - NEW:
            continue
        gen = hf_greedy(c.hf, ids, NEW)
        ref = reference_logprobs(c.hf, ids + gen)[len(ids) - 1:-1]  # [NEW, V]
        want = [(c.pieces.piece(t), ref[i, t].item()) for i, t in enumerate(gen)]
        want_top = [[(c.pieces.piece(j), ref[i, j].item()) for j in ref[i].topk(3).indices.tolist()]
                    for i in range(NEW)]
        body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": NEW, "ignore_eos": True,
                "logprobs": True, "top_logprobs": 3, "chat_template_kwargs": {"enable_thinking": False}}
        for stream in (False, True):
            _, entries = chat_answer(c, {**body, "stream": stream})
            got = [(e["token"], e["logprob"]) for e in entries]
            got_top = [[(t["token"], t["logprob"]) for t in e["top_logprobs"]] for e in entries]
            ok = len(got) == len(got_top) == NEW and all(
                len(g) == len(w) and all(gp == wp and abs(gv - wv) < TOL for (gp, gv), (wp, wv) in zip(g, w))
                for g, w in zip([got, *got_top], [want, *want_top]))
            c.check(ok, f"chat logprobs words={words} prompt={len(ids)} stream={stream}: {got} vs {want}")


def biased_greedy(hf: torch.nn.Module, prompt: list[int], new: int, bias: dict[int, float],
                  allowed: list[int] | None) -> list[int]:
    """transformers' logits, `bias` added and ids outside `allowed` masked, argmax at each step."""
    ids = list(prompt)
    for _ in range(new):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        for t, b in bias.items():
            logits[t] += b
        if allowed is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[allowed] = 0
            logits += mask
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def echo_logprobs_ok(c: Ctx, choice: dict[str, Any], toks: list[int], k: int) -> bool:
    return echo_errors(c, choice["logprobs"], toks, k)[0] < TOL


def case_edges(c: Ctx) -> None:
    b = c.mode.block
    # prompt logprobs of a prompt whose prefix is cached (blocks hit: their positions scored all the same)
    base = c.ids(3 * b + 3)
    c.texts({"prompt": base})
    for k in (b, 2 * b + 1, len(base)):
        p = base[:k] + c.ids(5)
        r = c.post({"prompt": p, "echo": True, "logprobs": 0}).json()
        c.check(echo_logprobs_ok(c, r["choices"][0], p + hf_greedy(c.hf, p, NEW), 0), f"echo on cached prefix {k}")
    # the same prompt twice in one batch with echo, n=2
    p = c.ids(2 * b)
    r = c.post({"prompt": [p, p], "echo": True, "logprobs": 1, "n": 2}).json()
    toks = p + hf_greedy(c.hf, p, NEW)
    c.check(len(r["choices"]) == 4 and all(echo_logprobs_ok(c, ch, toks, 1) for ch in r["choices"]), "echo twice n=2")
    # vLLM's prompt_logprobs field on a cached prompt: keyed by id, the prompt token's entry (its rank among all ids)
    # and the top 2 (ranks 1, 2)
    r = c.post({"prompt": p, "prompt_logprobs": 2}).json()
    ref = reference_logprobs(c.hf, p)
    got = r["choices"][0].get("prompt_logprobs")
    ok, what = got is not None and len(got) == len(p) and got[0] is None, ""
    for i in range(1, len(p) * ok):
        row = ref[i - 1]
        v = row[p[i]].item()  # deep in the distribution many ids lie within TOL of it: any rank among them will do
        want = {p[i]: (v, int((row > v + TOL).sum()) + 1, int((row >= v - TOL).sum()))} | {
            t: (row[t].item(), rank, rank) for rank, t in enumerate(row.topk(2).indices.tolist(), 1)}
        ok = got[i].keys() == {str(t) for t in want} and all(
            abs(got[i][str(t)]["logprob"] - v) < TOL and lo <= got[i][str(t)]["rank"] <= hi
            for t, (v, lo, hi) in want.items())
        if not ok:
            what = f" at {i}: {got[i]} vs {want}"
            break
    c.check(ok, f"prompt_logprobs on a cached prompt{what}")
    # echo scoring a prompt of exactly the context (max_tokens 0: lm-eval's full window); one token more is a 400
    p = c.ids(MAX_LEN)
    r = c.post({"prompt": p, "echo": True, "logprobs": 2, "max_tokens": 0})
    ok = r.status_code == 200 and echo_logprobs_ok(c, r.json()["choices"][0], p, 2)
    c.check(ok, f"echo max_tokens 0 at the context: {r.status_code} {r.text[:200]}")
    r = c.post({"prompt": c.ids(MAX_LEN + 1), "echo": True, "logprobs": 2, "max_tokens": 0})
    c.check(r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded",
            f"echo max_tokens 0 past the context: {r.status_code} {r.text[:200]}")
    # no max_tokens: up to the context's end
    p = c.ids(MAX_LEN - 11)
    r = c.post({"prompt": p, "max_tokens": None}).json()
    c.check(r["choices"][0]["text"] == c.expected(p, 11) and r["usage"]["completion_tokens"] == 11,
            f"no max_tokens: {r['usage']}")
    # logit_bias and allowed_token_ids
    p = c.ids(9)
    gen = hf_greedy(c.hf, p, NEW)
    bias = {gen[1]: -100.0, gen[3]: -5.0, 777: 30.0}
    want = c.tok.decode(biased_greedy(c.hf, p, NEW, bias, None), skip_special_tokens=False)
    got = c.texts({"prompt": p, "logit_bias": {str(k): v for k, v in bias.items()}})
    c.check(got == [want], "logit_bias")
    allowed = sorted(set(gen[2:6] + c.ids(20)))
    want = c.tok.decode(biased_greedy(c.hf, p, NEW, {}, allowed), skip_special_tokens=False)
    c.check(c.texts({"prompt": p, "allowed_token_ids": allowed}) == [want], "allowed_token_ids")
    # a long prompt streamed, nothing read, hung up once /stats shows it running, then the same prompt served whole
    # (its blocks must not be half-written). The abort is asserted; where it fell (mid-prefill when the step budget
    # chunks the prompt finely, else the first decode steps) only printed
    p = c.ids(400)
    body = {"model": MODEL, "prompt": p, "temperature": 0, "max_tokens": MAX_LEN - 400, "ignore_eos": True,
            "skip_special_tokens": False, "stream": True}
    before = server_stats(c.srv)
    with socket.create_connection(("127.0.0.1", c.srv.port)) as sock:
        sock.sendall(raw_request(body, "/v1/completions"))
        wait_for(lambda: server_stats(c.srv)["active_requests"] > 0, timeout=30, poll=0.005)
    wait_for(lambda: server_stats(c.srv)["requests_aborted"] > before["requests_aborted"], timeout=30)
    after = server_stats(c.srv)
    print("hang-up aborted after", after["engine_tokens_generated"] - before["engine_tokens_generated"],
          "tokens (0: mid-prefill)", flush=True)
    c.check(c.texts({"prompt": p}) == [c.expected(p)], "after a hang-up while running")


STOP_NEW = 24


def listed_through(c: Ctx, gen: list[int], content: str) -> int:
    """How many of `gen`'s tokens a stop string's answer `content` lists: each whose bytes begin inside it (the last
    may run on into the stop string; one that only spelled the text cut away is not listed)."""
    limit, start, k = len(content.encode()), 0, 0
    while k < len(gen) and start < limit:
        start += len(c.pieces.bytes(gen[k]))
        k += 1
    return k


def chat_answer(c: Ctx, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A chat answer's content and its logprobs' entries, collected or streamed as `body` asks."""
    r = requests.post(c.srv.url + "/v1/chat/completions", json=body, timeout=600, stream=body["stream"])
    assert r.status_code == 200, r.text
    if not body["stream"]:
        ch = r.json()["choices"][0]
        return ch["message"]["content"] or "", (ch["logprobs"] or {}).get("content") or []
    content, entries = "", []
    for payload in sse_payloads(r):
        for ch in [] if payload == "[DONE]" else json.loads(payload).get("choices", []):
            content += ch["delta"].get("content") or ""
            entries += (ch.get("logprobs") or {}).get("content") or []
    return content, entries


def stop_entries(c: Ctx, body: dict[str, Any]) -> tuple[str, list[tuple[bytes, float, list[tuple[int, ...]]]]]:
    """A chat answer's content and its logprobs' (bytes, logprob, top ids' bytes) entries, collected or streamed."""
    content, entries = chat_answer(c, body)
    return content, [(bytes(e["bytes"]), e["logprob"], [tuple(t["bytes"]) for t in e["top_logprobs"]])
                     for e in entries]


def case_stop_logprobs(c: Ctx) -> None:
    """Stop strings with logprobs: a stop string that begins inside a token, spans tokens, or is the answer's first
    characters; the listed tokens' bytes are the greedy answer's first k tokens, those whose text begins in the
    content (joined they spell it, the last perhaps running on into the stop string), with transformers' logprobs;
    streamed equal to collected; legacy lists as many, streamed equal to collected."""
    for words in (3, 30):
        messages = [{"role": "user", "content": " ".join(c.tok.decode([t]) for t in c.ids(words))}]
        text = c.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = c.tok.encode(text, add_special_tokens=False)
        gen = hf_greedy(c.hf, ids, STOP_NEW)
        ref = reference_logprobs(c.hf, ids + gen)[len(ids) - 1:-1]  # [STOP_NEW, V]
        full = c.tok.decode(gen, skip_special_tokens=False)
        starts = sorted(c.rng.sample(range(len(full) - 1), min(6, len(full) - 1)) + [0])
        for at in starts:
            stop = full[at:at + c.rng.randrange(1, 4)]
            cut = full.find(stop)
            if "\ufffd" in full[:cut + len(stop)] or not stop.strip():
                continue
            content = full[:cut]
            k = listed_through(c, gen, content)
            want = [(c.pieces.bytes(t), ref[i, t].item()) for i, t in enumerate(gen[:k])]
            body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": STOP_NEW,
                    "ignore_eos": True, "skip_special_tokens": False, "logprobs": True, "top_logprobs": 2,
                    "stop": [stop], "chat_template_kwargs": {"enable_thinking": False}}
            got = {stream: stop_entries(c, {**body, "stream": stream}) for stream in (False, True)}
            for stream, (answer, entries) in got.items():
                ok = answer == content and len(entries) == k and all(
                    b == wb and abs(v - wv) < TOL for (b, v, _), (wb, wv) in zip(entries, want))
                c.check(ok, f"stop logprobs {stop!r} at {cut} stream={stream}: {answer!r} vs {content!r}, "
                            f"{[(b, round(v, 4)) for b, v, _ in entries]} vs {[(b, round(v, 4)) for b, v in want]}")
            (whole, listed), (streamed_text, streamed) = got[False], got[True]
            c.check(whole == streamed_text and len(listed) == len(streamed) and all(
                b == sb and abs(v - sv) < TOL and t == ts for (b, v, t), (sb, sv, ts) in zip(listed, streamed)),
                f"stop logprobs {stop!r} streamed = collected: {listed} vs {streamed}")
            legacy = {"prompt": ids, "max_tokens": STOP_NEW, "logprobs": 1, "stop": [stop]}
            whole = c.post(legacy).json()["choices"][0]
            streamed = {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []}
            with c.post({**legacy, "stream": True}) as r:
                for payload in sse_payloads(r):
                    for ch in [] if payload == "[DONE]" else json.loads(payload)["choices"]:
                        streamed["text"] += ch["text"]
                        for key in ("tokens", "token_logprobs", "text_offset"):
                            streamed[key] += (ch["logprobs"] or {}).get(key) or []
            lp = whole["logprobs"]
            # logprobs within TOL: batch-mates change a step's rows and so its rounding
            c.check(whole["text"] == content and len(lp["tokens"]) == k and streamed["text"] == whole["text"] and all(
                streamed[key] == lp[key] for key in ("tokens", "text_offset")) and len(
                streamed["token_logprobs"]) == k and all(abs(a - b) < TOL for a, b in zip(
                    streamed["token_logprobs"], lp["token_logprobs"])),
                f"legacy stop logprobs {stop!r}: {whole['text']!r} {lp['tokens']} {lp['token_logprobs']} vs "
                f"streamed {streamed}")


CASES: list[Callable[[Ctx], None]] = [case_lengths, case_prefix, case_logprobs, case_chat, case_stop_logprobs,
                                      case_edges, case_concurrent, case_shared_inflight, case_spec]


# cases that wait for the engine to be idle, or for a request of theirs to be the one running: no batch-mates then
ALONE = ("case_concurrent", "case_edges")


def mate(c: Ctx, rng: random.Random, stop: threading.Event) -> None:
    """Sampled requests, one after another until `stop`: each must be answered (a 200, a stream to its end); one in 5
    streamed and hung up on after a few events."""
    while not stop.is_set():
        body = {"model": MODEL, "prompt": [rng.randrange(100, 150000) for _ in range(rng.randrange(1, 150))],
                "max_tokens": rng.randrange(1, 40), "temperature": 1.0, "seed": rng.randrange(1 << 30),
                "n": rng.choice([1, 1, 2]), "logprobs": rng.choice([None, 2]),
                "presence_penalty": rng.choice([0.0, 0.5]), "stream": rng.random() < 0.3}
        path = "/v1/completions"
        if rng.random() < 0.2:
            body = {**{k: body[k] for k in ("model", "max_tokens", "temperature", "seed", "n", "stream")},
                    "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}
            path = "/v1/chat/completions"
        hang_up = body["stream"] and rng.random() < 0.2
        try:
            with requests.post(c.srv.url + path, json=body, stream=body["stream"], timeout=600) as r:
                ok, what = r.status_code == 200, f"{r.status_code}"
                if ok and body["stream"]:
                    last = [p for _, p in zip(range(3 if hang_up else 1 << 30), sse_payloads(r))][-1:]
                    ok, what = hang_up or last == ["[DONE]"], f"ended {last}"
                elif not ok:
                    what += f" {r.text[:300]}"
        except requests.RequestException as exc:
            ok, what = False, repr(exc)
        c.check(ok, f"batch-mate {path} {json.dumps(body)[:200]}: {what}")


def run_case(c: Ctx, case: Callable[[Ctx], None], mates: int) -> None:
    """`case`, with `mates` batch-mates sending meanwhile unless it is ALONE."""
    stop = threading.Event()
    threads = [threading.Thread(target=mate, args=(c, random.Random(c.rng.random()), stop))
               for _ in range(0 if case.__name__ in ALONE else mates)]
    for t in threads:
        t.start()
    try:
        case(c)
    except Exception as exc:  # noqa: BLE001
        c.check(False, f"{case.__name__} raised {exc!r}")
    finally:
        stop.set()
        for t in threads:
            t.join()


def run_mode(name: str, seed: int, log_dir: Path, mates: int = 0, cases: list[str] | None = None) -> Ctx:
    mode = MODES[name]
    ckpt = make_checkpoint()
    hf = load_quantised_hf_model(ckpt, mode.quant) if mode.quant != "none" else load_hf_model(ckpt)
    env = cpu_env(ckpt, NANOQWEN_MAX_MODEL_LEN=str(MAX_LEN), **mode.env)
    with GunicornServer(env, log_dir / f"{name}.log") as srv:
        tok = loader.load_tokenizer(ckpt)
        ctx = Ctx(srv, hf, tok, TokenBytes(tok), random.Random(seed), mode)
        for case in CASES:
            if case is case_spec and not mode.spec or cases and case.__name__ not in cases:
                continue
            t0 = time.monotonic()
            run_case(ctx, case, mates)
            print(f"{name} {case.__name__}: {time.monotonic() - t0:.0f}s", flush=True)
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mates", type=int, default=0)
    parser.add_argument("--cases", nargs="+", choices=[case.__name__ for case in CASES], help="default: all")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="differential-"))
    failed = 0
    for name in args.modes:
        ctx = run_mode(name, args.seed, log_dir, args.mates, args.cases)
        print(f"== {name}: {ctx.passed} passed, {len(ctx.failures)} failed", flush=True)
        failed += len(ctx.failures)
    print("logs:", log_dir)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
