"""Decode-sized linears at Qwen3-0.6B shapes on one CUDA GPU: cuBLAS bf16 against the Triton GEMV (bf16, int8,
int4; ops/triton/gemv.py) and, at 8 rows, the tiled tl.dot int8/int4 kernels it replaced there. bench_kernels.py
runs these rows after its own (`--only linear`: these alone); each row: time per call, weight-read GB/s and
fraction of the HBM peak, the speedup over cuBLAS bf16 at the same rows, and the relative error against fp64.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (layer, K, N): the fused projections of one decoder layer, and the LM head
SHAPES = (("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024),
          ("lm_head", 1024, 151936))
ROWS = (1, 8)
GROUP = 64  # int4 columns per (scale, offset), nanoqwen/quant.py
ROTATION_BYTES, MAX_COPIES = 256 << 20, 64  # weight copies rotated through, so small layers miss L2 (60 MB on an H200)


@dataclass
class LinearRow:
    layer: str
    shape: str
    rows: int
    impl: str
    us: float
    gbps: float  # weight, scale and activation bytes read + output written, per second
    peak_fraction: float
    vs_cublas: float  # cuBLAS bf16's time / this one's
    rel_err: float  # against the fp64 product with the dequantised weights
    ok: bool


@dataclass
class Impl:
    name: str
    make: Callable[[torch.Tensor, torch.Generator], tuple]  # (bf16 weight, generator) -> the op's weight args
    run: Callable  # (x, *weight args) -> [rows, N]
    dequant: Callable[..., torch.Tensor]  # weight args -> [N, K] fp64
    bytes_per_weight: float


def impls(rows: int) -> list[Impl]:
    from ops.torch_ref.linear_int4 import dequantize_int4
    from ops.triton.gemv import FLOAT, gemv
    from ops.triton.linear_int4 import linear_int4_tiled, linear_int4_triton
    from ops.triton.linear_int8 import linear_int8_tiled, linear_int8_triton

    def bf16(w: torch.Tensor, g: torch.Generator) -> tuple:
        return (w,)

    def int8(w: torch.Tensor, g: torch.Generator) -> tuple:
        n, k = w.shape
        return (torch.randint(-127, 128, (n, k), generator=g, device=w.device, dtype=torch.int8),
                (torch.rand(n, generator=g, device=w.device) / 64).to(w.dtype))

    def int4(w: torch.Tensor, g: torch.Generator) -> tuple:
        n, k = w.shape
        scale = (torch.rand(n, k // GROUP, generator=g, device=w.device) / 64).to(w.dtype)
        return (torch.randint(0, 256, (n, k // 2), generator=g, device=w.device, dtype=torch.uint8), scale,
                (-8 * scale).to(w.dtype))

    def float_deq(w: torch.Tensor) -> torch.Tensor:
        return w.double()

    def int8_deq(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return w.double() * s.double()[:, None]

    def int4_deq(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(w, s, o).double()

    int4_bytes = 0.5 + 2 * 2 / GROUP  # nibbles, then a bf16 scale and offset per group
    found = [
        Impl("cublas bf16", bf16, F.linear, float_deq, 2),
        Impl("gemv bf16", bf16, lambda x, w: gemv(x, w, FLOAT), float_deq, 2),
        Impl("gemv int8", int8, linear_int8_triton, int8_deq, 1),
        Impl("gemv int4", int4, linear_int4_triton, int4_deq, int4_bytes),
    ]
    if rows > 1:  # where the tiled kernels served before: the crossover
        found += [Impl("tl.dot int8", int8, linear_int8_tiled, int8_deq, 1),
                  Impl("tl.dot int4", int4, linear_int4_tiled, int4_deq, int4_bytes)]
    return found


def measure_linears(peak_gbps: float, time_us: Callable[[Callable, list[tuple], bool], float], eager: bool,
                    rel_tol: float, shapes: tuple[tuple[str, int, int], ...] = SHAPES,
                    device: str = "cuda") -> list[LinearRow]:
    """`time_us`: bench_kernels' timer (a call on each copy of the arguments in turn); `rel_tol`: its bound on the
    relative error. `shapes` and `device`: the tests' small run on the CPU under the interpreter."""
    out: list[LinearRow] = []
    for layer, k, n in shapes:
        for rows in ROWS:
            cublas_us = None
            for impl in impls(rows):
                g = torch.Generator(device=device).manual_seed(0)
                nbytes = int(n * k * impl.bytes_per_weight + n * 2) + 2 * rows * (k + n)
                copies_wanted = -(-ROTATION_BYTES // nbytes)
                copies = []
                for _ in range(max(1, min(copies_wanted, MAX_COPIES))):
                    w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k**0.5
                    x = torch.randn(rows, k, generator=g, device=device, dtype=torch.bfloat16)
                    copies.append((x, *impl.make(w, g)))
                del w
                x, *weights = copies[0]
                reference = x.double() @ impl.dequant(*weights).T
                err = float((impl.run(x, *weights).double() - reference).norm() / reference.norm())
                us = time_us(impl.run, copies, eager)
                del copies
                if device == "cuda":
                    torch.cuda.empty_cache()
                cublas_us = cublas_us or us
                gbps = nbytes / us / 1e3
                out.append(LinearRow(layer, f"{k}->{n}", rows, impl.name, round(us, 2), round(gbps, 1),
                                     round(gbps / peak_gbps, 3), round(cublas_us / us, 2), err, err <= rel_tol))
                r = out[-1]
                print(f"linear {r.layer:8} {r.shape:12} M={r.rows}  {r.impl:12} {r.us:8.1f} µs  {r.gbps:6.0f} GB/s "
                      f"{100 * r.peak_fraction:5.1f}% of peak  {r.vs_cublas:5.2f}x cuBLAS  rel err {r.rel_err:.2e} "
                      f"{'ok' if r.ok else 'FAIL'}", flush=True)
    return out


def linear_markdown(rows: list[LinearRow]) -> str:
    lines = ["| layer | K->N | M | kernel | µs | GB/s | of HBM peak | vs cuBLAS bf16 | rel err | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.shape} | {r.rows} | {r.impl} | {r.us:.1f} | {r.gbps:.0f} | "
                     f"{100 * r.peak_fraction:.1f}% | {r.vs_cublas:.2f}x | {r.rel_err:.2e} | "
                     f"{'ok' if r.ok else 'FAIL'} |")
    return "\n".join(lines) + "\n"
