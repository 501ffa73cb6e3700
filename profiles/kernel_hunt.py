"""Differential hunt on the C kernels under one cpu_isa cap a run: seeded random shapes (odd N, K and group tails, 1-32
rows, head dims 16-128, GQA groups, block sizes, contexts past decode_attention's split, sampling filters and
penalties) against fp64 products of the same operands or the torch references (ops/torch_ref, nanoqwen.sampler's torch
path). Prints each failure and a count per kernel; exit 1 on any failure.

python profiles/kernel_hunt.py [--isa auto|avx2|avx512] [--seed 0] [--cases 30]

Bounds (loose enough for every loop's order of sums, tight enough for a wrong row, column, tail or block): linears'
fp32 sums 2^-18 of sum |x w| (bf16 outputs also 2^-8 of |y|); int8/int4 activation pieces or blocks their own
worst case (1/254 of a row's, or a 64-column block's, largest |x| per |w|); attention's outputs 2e-5 (fp32) or 2e-2
(bf16) off the fp64 softmax; dequant and embeddings to the bit; sampling the torch sampler's token (on distinct
logits no filter cut or race is within rounding here, as tests/test_cpu_sample.py's)."""
from __future__ import annotations

import argparse
import ctypes
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from nanoqwen.choices import CPU_ISAS  # noqa: E402
from nanoqwen.sampler import Penalties, sample  # noqa: E402
from ops import cpu  # noqa: E402
from ops.cpu import attention as cpu_attention  # noqa: E402
from ops.cpu import dequant as cpu_dequant  # noqa: E402
from ops.cpu import embedding as cpu_embedding  # noqa: E402
from ops.cpu import graph  # noqa: E402
from ops.cpu import linear as cpu_linear  # noqa: E402
from ops.cpu import linear_int4 as cpu_int4  # noqa: E402
from ops.cpu import linear_int8 as cpu_int8  # noqa: E402
from ops.cpu import sample as cpu_sample  # noqa: E402
from ops.torch_ref.embedding import embedding_int4_torch  # noqa: E402
from ops.torch_ref.linear_int4 import dequantize_int4  # noqa: E402
from sampler_util import rows  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def exceeds(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> str | None:
    """Why out is not within bound of exact (all [M, N]), or None."""
    out = out.double()
    if not out.isfinite().all():
        return f"{(~out.isfinite()).sum().item()} non-finite outputs"
    over = (out - exact).abs() / bound
    if (over > 1).any():
        m, n = divmod(over.argmax().item(), over.shape[1])
        return f"{(over > 1).sum().item()} outputs over the bound, worst {over.max().item():.3g}x at [{m}, {n}]"
    return None


def float_bound(x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bound = 2**-18 * (x.abs() @ w.abs().T) + 1e-30
    return bound + 2**-8 * exact.abs() if dtype == torch.bfloat16 else bound


def shape(r: random.Random, group: int = 32) -> tuple[int, int, int]:
    return r.randint(1, 32), r.choice([1, 3, r.randint(1, 700)]), group * r.randint(1, 100)


def case_linear(r: random.Random, dtype: torch.dtype) -> str | None:
    m, n, k = shape(r)
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T
    return exceeds(cpu_linear.linear_cpu(x, w), exact, float_bound(xd, wd, exact, dtype))


def case_int8(r: random.Random, dtype: torch.dtype) -> str | None:
    m, n, k = shape(r)
    x = torch.randn(m, k)
    x[:, r.randrange(k)] *= r.choice([1, 30])  # an outlier column: the pieces' scale follows it
    x, w, scale = x.to(dtype), torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 50).to(dtype)
    xd, wd, sd = x.double(), w.double(), scale.double()
    exact = (xd @ wd.T) * sd
    pieces = xd.abs().amax(1, keepdim=True) / 254 * (wd.abs().sum(1) * sd.abs())
    bound = pieces + float_bound(xd, wd * sd[:, None], exact, dtype)
    return exceeds(cpu_int8.linear_int8_cpu(x, w, scale), exact, bound)


def case_int4(r: random.Random, dtype: torch.dtype) -> str | None:
    g = r.choice([64, 128, 192])
    m, n, k = shape(r, g)
    x = torch.randn(m, k)
    x[:, r.randrange(k)] *= r.choice([1, 30])
    x = x.to(dtype)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale, offset = (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)
    xd, wd = x.double(), dequantize_int4(w, scale, offset).double()
    exact = xd @ wd.T
    largest = xd.abs().view(m, k // 64, 64).amax(2)  # int8 blocks of 64 columns (AVX2, bf16), within a row's pieces
    blocks = (largest / 254) @ wd.abs().view(n, k // 64, 64).sum(2).T
    loaded = w.clone()
    cpu_int4.repack(loaded)
    bound = blocks + float_bound(xd, wd, exact, dtype)
    return exceeds(cpu_int4.linear_int4_cpu(x, loaded, scale, offset), exact, bound)


def case_dequant(r: random.Random, dtype: torch.dtype) -> str | None:
    g = r.choice([64, 128, 192])
    n, k = r.randint(1, 300), g * r.randint(1, 20)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale, offset = (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)
    loaded, n0 = w.clone(), 4 * r.randint(0, (n - 1) // 4)  # from a quad's start, as prefill's blocks
    cpu_int4.repack(loaded)
    out = torch.empty(n - n0, k, dtype=dtype)
    graph.call(cpu_dequant.KERNEL.lib.dequant_int4, loaded[n0:], scale[n0:], offset[n0:], out, n - n0, k, g,
                   int(dtype == torch.bfloat16))
    expected = dequantize_int4(w[n0:], scale[n0:], offset[n0:]).to(dtype)
    ids = torch.randint(0, n, (r.randint(1, 9),))
    embedded = cpu_embedding.embedding_int4_cpu(ids, loaded, scale, offset)
    if not torch.equal(out, expected):
        return f"dequant_int4 rows {n0}-{n} of {n} x {k}, G {g}: {(out != expected).sum().item()} values differ"
    if not torch.equal(embedded, embedding_int4_torch(ids, w, scale, offset)):
        return f"embedding_int4 of {n} x {k}, G {g}: differs"
    return None


def case_attention(r: random.Random, dtype: torch.dtype) -> str | None:
    d, bs, hkv = r.choice([16, 32, 64, 128]), r.choice([8, 16, 32]), r.randint(1, 4)
    hq = hkv * r.choice([1, 2, 3, 4, 7, 8, 16])
    lens = [r.choice([0, 1, r.randint(1, 64), r.randint(100, 5000)]) for _ in range(r.randint(1, 6))]
    width = max(1, *(-(-n // bs) for n in lens))
    k_cache = torch.randn(1 + len(lens) * width, bs, hkv, d).to(dtype)
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(dtype)
    tables = (torch.randperm(len(lens) * width) + 1).view(len(lens), width).int()
    q = (2 * torch.randn(len(lens), hq, d)).to(dtype)
    ctx, scale = torch.tensor(lens, dtype=torch.int32), d**-0.5
    out = cpu_attention.decode_attention_cpu(q, k_cache, v_cache, tables, ctx, scale).double()
    expected = []
    for b, n in enumerate(lens):
        slots = (tables[b].long()[:, None] * bs + torch.arange(bs)).flatten()[:n]
        k, v = (c.view(-1, hkv, d)[slots].double() for c in (k_cache, v_cache))
        weights = torch.softmax(torch.einsum("hgd,nhd->hgn", q[b].view(hkv, -1, d).double(), k) * scale, dim=-1)
        expected.append(torch.einsum("hgn,nhd->hgd", weights, v).reshape(hq, d))
    bound = torch.full((len(lens) * hq, d), 2e-5 if dtype == torch.float32 else 2e-2, dtype=torch.float64)
    why = exceeds(out.view(-1, d), torch.stack(expected).view(-1, d), bound + 1e-2 * torch.stack(expected).abs().view(
        -1, d) * (dtype == torch.bfloat16))
    return why and f"D {d}, block {bs}, Hq {hq}, Hkv {hkv}, lens {lens}: {why}"


def case_sample(r: random.Random, _: torch.dtype) -> str | None:
    b, vocab = r.randint(1, 12), r.choice([37, 4000, r.randint(100, 40000)])
    logits = torch.randn(b, vocab) * r.choice([1.0, 3.0, 10.0])
    settings = rows(b, r.randint(0, 100), seeds=[r.randrange(2**31) for _ in range(b)],
                    temperature=[r.choice([0.0, 0.3, 0.7, 1.0, 1.7]) for _ in range(b)],
                    top_p=[r.choice([1.0, 0.95, 0.5, 0.05]) for _ in range(b)],
                    top_k=[r.choice([0, 1, 20, 300]) for _ in range(b)],
                    min_p=[r.choice([0.0, 0.02, 0.2]) for _ in range(b)])
    entries = [(row, token, float(r.randint(0, 4))) for row in range(b) if r.random() < 0.5
               for token in r.sample(range(vocab), r.randint(1, min(vocab, 60)))]
    penalties = None if not entries else Penalties(
        *(torch.tensor([r.choice(values) for _ in range(b)]) for values in ([0.0, 0.5, -1.0, 2.0], [0.0, 0.3, -0.5],
                                                                              [1.0, 1.3, 0.7, 2.0])),
        *(torch.tensor(column, dtype=dtype) for column, dtype in zip(zip(*entries), (torch.int64, torch.int64,
                                                                                     torch.float32))))
    cpu_sample.KERNEL.ready = True  # sample's own switch between the C kernel and the torch sampler
    ours = sample(logits, settings, "filter", penalties)
    cpu_sample.KERNEL.ready = False
    theirs = sample(logits, settings, "filter", penalties)
    cpu_sample.KERNEL.ready = True
    return None if torch.equal(ours, theirs) else f"{b} x {vocab}: rows {(ours != theirs).nonzero().flatten().tolist()}"


CASES: dict[str, Callable[[random.Random, torch.dtype], str | None]] = {
    "linear": case_linear, "linear_int8": case_int8, "linear_int4": case_int4, "dequant/embedding_int4": case_dequant,
    "decode_attention": case_attention, "sample": case_sample,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", default="auto", choices=CPU_ISAS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=30, help="cases per kernel and dtype")
    args = parser.parse_args()
    for kernel in cpu.C_KERNELS:
        assert kernel.build(isa=args.isa), kernel.error
    avx512 = ctypes.c_int(-1)
    cpu_attention.KERNEL.lib.decode_attention_avx512(128, 1, ctypes.byref(avx512))
    print(f"isa={args.isa} seed={args.seed}: int4 interleaved {cpu_int4.interleaved()}, decode attention's AVX-512 "
          f"loops at D 128 bf16 {bool(avx512.value)}")
    failures = 0
    for name, case in CASES.items():
        failed = 0
        for dtype in DTYPES if name != "sample" else DTYPES[:1]:
            for i in range(args.cases):
                r = random.Random(f"{args.seed}:{name}:{dtype}:{i}")
                torch.manual_seed(r.randrange(2**31))
                why = case(r, dtype)
                if why is not None:
                    failed += 1
                    print(f"FAIL {name} {dtype} case {i}: {why}")
        print(f"{name}: {failed} failed")
        failures += failed
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
