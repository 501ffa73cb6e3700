"""The Triton kernels against their torch references at Qwen3-0.6B shapes, bf16, on one CUDA GPU.

    python profiles/bench_kernels.py [--out DIR] [--peak-gbps GBPS] [--eager] [--only linear]

Prints time per call, achieved bandwidth (useful bytes read + written / time) and its fraction of
the HBM bandwidth measured first by a device-to-device copy of 2 GiB (or --peak-gbps). Each kernel's
output is compared with the torch reference run in fp64 on the same inputs: the relative error
(‖out − ref‖ / ‖ref‖) of the Triton kernel must stay within REL_TOL (the bf16 torch reference's own
is printed for scale), else the script exits 1 after writing its results. Calls are timed inside a CUDA graph, as the
server's decode steps run, unless --eager. Consecutive calls read different input copies (up to
256 MiB of them) so that large cases measure HBM, not L2. Then the decode-sized linears of
bench_linear.py (cuBLAS bf16 against the Triton GEMV in bf16, int8 and int4; --only linear: those
alone). With --out, writes kernels.json and kernels.md there.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, EPS = 1024, 3072, 16, 8, 128, 16, 1e-6
TOKENS = (1, 8, 64, 512, 4096)  # decode batches and prefill chunks
BATCHES, CONTEXTS = (1, 8, 64), (512, 4096)
ROTATION_BYTES, MAX_COPIES = 256 << 20, 64
DEVICE, DTYPE = "cuda", torch.bfloat16
BF16 = 2
# bf16 keeps 8 bits of mantissa: ~3e-3 per rounding, a few roundings per output (0.5-0.7% measured
# under the CPU interpreter at small shapes; the bf16 torch reference: 0.2-0.35%); a wrong kernel is ~1.
REL_TOL = 2e-2
COPY_BYTES = 2 << 30


@dataclass
class Bench:
    kernel: str
    shape: str
    nbytes: int  # useful bytes read + written per call
    make_args: Callable[[int], tuple]  # seed -> one fresh set of inputs
    run: Callable[[Callable, tuple], torch.Tensor]  # (impl, args) -> what to compare


@dataclass
class Row:
    kernel: str
    shape: str
    triton_us: float
    torch_us: float
    speedup: float
    triton_gbps: float
    peak_fraction: float
    triton_rel_err: float  # against the fp64 reference
    torch_rel_err: float  # the bf16 torch reference's own, for scale
    ok: bool


def rms_norm_bench(tokens: int) -> Bench:
    def make_args(seed: int) -> tuple:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        x, residual = (torch.randn(tokens, HIDDEN, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(2))
        return x, torch.randn(HIDDEN, generator=g, device=DEVICE, dtype=DTYPE), EPS, residual

    return Bench(
        "rms_norm+residual", f"N={tokens} H={HIDDEN}", (4 * tokens + 1) * HIDDEN * BF16,
        make_args, lambda impl, args: impl(*args)[0],
    )


def silu_mul_bench(tokens: int) -> Bench:
    def make_args(seed: int) -> tuple:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        return (torch.randn(tokens, 2 * INTER, generator=g, device=DEVICE, dtype=DTYPE),)

    return Bench("silu_mul", f"N={tokens} I={INTER}", 3 * tokens * INTER * BF16, make_args,
                 lambda impl, args: impl(*args))


def rope_bench(tokens: int, cos_sin: torch.Tensor) -> Bench:
    def make_args(seed: int) -> tuple:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        qkv = torch.randn(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        num_blocks = tokens // BLOCK_SIZE + 2
        k_cache, v_cache = (
            torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2)
        )
        positions = torch.randint(0, 4096, (tokens,), generator=g, device=DEVICE, dtype=torch.int32)  # as the runner
        slots = torch.arange(BLOCK_SIZE, BLOCK_SIZE + tokens, device=DEVICE, dtype=torch.int32)
        weights = (torch.randn(HEAD_DIM, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(2))
        return (
            q.view(tokens, Q_HEADS, HEAD_DIM), k.view(tokens, KV_HEADS, HEAD_DIM), v.view(tokens, KV_HEADS, HEAD_DIM),
            *weights, EPS, cos_sin, positions, k_cache, v_cache, slots,
        )

    def run(impl: Callable, args: tuple) -> torch.Tensor:
        impl(*args)
        return torch.cat((args[0].flatten(), args[1].flatten(), args[8].flatten()))

    q_k = (Q_HEADS + KV_HEADS) * HEAD_DIM * BF16
    kv = KV_HEADS * HEAD_DIM * BF16
    per_token = 2 * q_k + kv + 2 * kv + HEAD_DIM * 4 + 16  # q/k in+out, v in, cache k/v out, cos|sin, indices
    return Bench("qk_norm_rope_store", f"N={tokens} Hq={Q_HEADS} Hkv={KV_HEADS}", tokens * per_token, make_args, run)


def decode_bench(batch: int, context: int) -> Bench:
    blocks_per_seq = context // BLOCK_SIZE

    def make_args(seed: int) -> tuple:
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        num_blocks = 1 + batch * blocks_per_seq
        k_cache, v_cache = (
            torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g, device=DEVICE, dtype=DTYPE)
            for _ in range(2)
        )
        # Shuffled pages, as a long-running server's block tables are.
        block_tables = (1 + torch.randperm(num_blocks - 1, generator=g, device=DEVICE)).view(batch, blocks_per_seq)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=g, device=DEVICE, dtype=DTYPE)
        context_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
        return q, k_cache, v_cache, block_tables.int(), context_lens, HEAD_DIM**-0.5

    cache_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * BF16
    return Bench(
        "decode_attention", f"B={batch} ctx={context}", cache_bytes + 2 * batch * Q_HEADS * HEAD_DIM * BF16,
        make_args, lambda impl, args: impl(*args),
    )


def time_us(impl: Callable, copies: list[tuple], eager: bool) -> float:
    import triton.testing

    calls = itertools.count()

    def step() -> None:
        impl(*copies[next(calls) % len(copies)])

    # do_bench_cudagraph calls `step` on a new stream that does not wait for this one, where the copies are
    # still being written: unsynchronized, B=64 ctx=4096 read a block table not yet written and faulted (an
    # illegal memory access in the first gpu_first run, gone under CUDA_LAUNCH_BLOCKING=1).
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(step) if eager else triton.testing.do_bench_cudagraph(step)
    return ms * 1e3


def copy_bandwidth_gbps() -> float:
    """HBM bandwidth as a device-to-device copy sees it: bytes read + written per second."""
    import triton.testing

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(functools.partial(dst.copy_, src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / ms / 1e6


def fp64(args: tuple) -> tuple:
    return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def measure(bench: Bench, impls: dict[str, Callable], peak_gbps: float, eager: bool) -> Row:
    reference = bench.run(impls["torch"], fp64(bench.make_args(0)))
    triton_err, torch_err = (rel_err(bench.run(impls[name], bench.make_args(0)), reference)
                             for name in ("triton", "torch"))
    ok = triton_err <= REL_TOL
    copies_wanted = -(-ROTATION_BYTES // bench.nbytes)
    copies = [bench.make_args(seed) for seed in range(max(1, min(copies_wanted, MAX_COPIES)))]
    triton_us, torch_us = (time_us(impls[name], copies, eager) for name in ("triton", "torch"))
    del copies
    torch.cuda.empty_cache()
    gbps = bench.nbytes / triton_us / 1e3
    return Row(
        bench.kernel, bench.shape, round(triton_us, 2), round(torch_us, 2), round(torch_us / triton_us, 2),
        round(gbps, 1), round(gbps / peak_gbps, 3), triton_err, torch_err, ok,
    )


def markdown(rows: list[Row], header: str) -> str:
    columns = ["kernel", "shape", "triton µs", "torch µs", "speedup", "triton GB/s", "of HBM peak",
               "triton rel err", "torch bf16 rel err", "ok"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.kernel, r.shape, f"{r.triton_us:.1f}", f"{r.torch_us:.1f}", f"{r.speedup:.2f}x",
                 f"{r.triton_gbps:.0f}", f"{100 * r.peak_fraction:.1f}%", f"{r.triton_rel_err:.2e}",
                 f"{r.torch_rel_err:.2e}", "ok" if r.ok else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write kernels.json and kernels.md into this directory")
    parser.add_argument("--peak-gbps", type=float, help="HBM bandwidth to compare against (GB/s; default: measured)")
    parser.add_argument("--eager", action="store_true", help="time eager launches instead of CUDA-graph replays")
    parser.add_argument("--only", choices=("linear",), help="run only these rows (bench_linear.py's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profiles/bench_kernels.py benchmarks CUDA kernels, and torch sees no CUDA GPU here.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("profiles/bench_kernels.py needs triton (pip install triton).")

    from bench_linear import linear_markdown, measure_linears
    from ops.torch_ref.activation import silu_mul_torch
    from ops.torch_ref.decode_attention import decode_attention_torch
    from ops.torch_ref.rms_norm import rms_norm_torch
    from ops.torch_ref.rope import qk_norm_rope_store_torch
    from ops.triton.activation import silu_mul_triton
    from ops.triton.decode_attention import decode_attention_triton
    from ops.triton.rms_norm import rms_norm_triton
    from ops.triton.rope import qk_norm_rope_store_triton

    cos_sin = rope_table()
    norm = dict(triton=rms_norm_triton, torch=rms_norm_torch)
    rope = dict(triton=qk_norm_rope_store_triton, torch=qk_norm_rope_store_torch)
    decode = dict(triton=decode_attention_triton, torch=decode_attention_torch)
    benches = [
        *((rms_norm_bench(n), norm) for n in TOKENS),
        *((silu_mul_bench(n), dict(triton=silu_mul_triton, torch=silu_mul_torch)) for n in TOKENS),
        *((rope_bench(n, cos_sin), rope) for n in TOKENS),
        *((decode_bench(b, c), decode) for c in CONTEXTS for b in BATCHES),
    ] if args.only is None else []
    gpu = torch.cuda.get_device_name()
    mode = "eager" if args.eager else "CUDA graph"
    measured = args.peak_gbps is None
    peak = copy_bandwidth_gbps() if measured else args.peak_gbps
    header = (f"Qwen3-0.6B shapes, bf16, {gpu}, {mode} timing; HBM peak {peak:.0f} GB/s "
              f"({'measured by a 2 GiB device copy' if measured else 'given'})")
    print(header)
    rows = []
    for bench, impls in benches:
        rows.append(measure(bench, impls, peak, args.eager))
        r = rows[-1]
        print(f"{r.kernel:20} {r.shape:28} triton {r.triton_us:9.1f} µs  torch {r.torch_us:9.1f} µs  "
              f"{r.speedup:6.2f}x  {r.triton_gbps:7.0f} GB/s  {100 * r.peak_fraction:5.1f}% of peak  "
              f"rel err {r.triton_rel_err:.2e} (torch bf16 {r.torch_rel_err:.2e}) {'ok' if r.ok else 'FAIL'}",
              flush=True)
    linear_rows = measure_linears(peak, time_us, args.eager, REL_TOL)
    table = markdown(rows, header) + "\n" + linear_markdown(linear_rows)
    print()
    print(table)
    for r in rows:
        if r.kernel == "decode_attention" and r.shape.endswith("ctx=4096"):
            print(f"decode attention at 4k context, {r.shape}: {100 * r.peak_fraction:.1f}% of HBM peak")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(
            json.dumps(dict(device=gpu, timing=mode, peak_gbps=peak, peak_measured=measured,
                            rows=[asdict(r) for r in rows], linear_rows=[asdict(r) for r in linear_rows]),
                       indent=2) + "\n"
        )
        (args.out / "kernels.md").write_text(table)
        print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'}")
    failed = [f"{r.kernel} {r.shape}" for r in rows if not r.ok]
    failed += [f"linear {r.layer} M={r.rows} {r.impl}" for r in linear_rows if not r.ok]
    if failed:
        sys.exit(f"relative error against the fp64 reference over {REL_TOL}: {', '.join(failed)}")


def rope_table() -> torch.Tensor:
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(40960, device=DEVICE).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, D] fp32


if __name__ == "__main__":
    main()
