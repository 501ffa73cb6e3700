"""The torch prefill attention over the paged cache: exact against an explicit mask, memory linear in the context."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import paged_inputs
from ops.torch_ref import prefill_attention as ref

HQ, HKV, D, BLOCK = 4, 2, 8, 4


def paged(seqs: list[tuple[int, int]], seed: int = 0):
    return paged_inputs.paged(seqs, HQ, HKV, D, BLOCK, seed=seed)


def explicit_mask_attention(q, full_k, full_v, seqs, scale: float) -> torch.Tensor:
    """Every new token over its whole visible context, one [new, ctx] mask per sequence, in fp64."""
    outs, start = [], 0
    for (q_len, ctx), ks, vs in zip(seqs, full_k, full_v):
        qs = q[start : start + q_len].double().transpose(0, 1)  # [Hq, n, D]
        ks = ks.double().transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        vs = vs.double().transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        visible = torch.arange(ctx - q_len, ctx)[:, None] >= torch.arange(ctx)[None, :]
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += q_len
    return torch.cat(outs).float()


def test_cached_prefixes_short_and_long_match_an_explicit_mask(monkeypatch):
    monkeypatch.setattr(ref, "MASK_ROWS", 4)  # several masked chunks, the last one partial
    seqs = [(5, 5), (7, 12), (3, 40), (10, 50), (1, 9)]  # none cached | short prefix (padded) | long (masked)
    args, full_k, full_v = paged(seqs)
    out = ref.prefill_attention_torch(*args)
    expected = explicit_mask_attention(args[0], full_k, full_v, seqs, args[-1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_attention_call_is_new_by_context_sized(monkeypatch):
    """The O(n²) memory of a prefix hit came from one [new, context] mask: every mask now has at most
    MASK_ROWS rows, and a short prefix runs the causal kernel with no mask at all."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask.numel()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    long_new, short_new = (3000, 3032), (2500, 12500)  # 32 cached tokens | 10,000 cached tokens
    for q_len, ctx in (long_new, short_new):
        calls.clear()
        args, _, _ = paged([(q_len, ctx)])
        ref.prefill_attention_torch(*args)
        masks = [numel for _, _, numel in calls if numel is not None]
        if (q_len, ctx) == long_new:
            assert calls == [(ctx, ctx, None)]
        else:
            assert len(masks) == -(-q_len // ref.MASK_ROWS) and max(masks) <= ref.MASK_ROWS * ctx
