"""int4 weight-only linear layers on x86 CPUs (AVX2; AVX-512 VNNI, AMX), up to linear.MAX_ROWS activation rows.

A weight takes half a byte plus its group's share of a scale and an offset, so decode reads about a
quarter of bf16's bytes. The weights are never converted to floats (csrc/linear_int4.c): each activation
row is split into P int8 pieces, x ~= a1 q1 + ... + aP qP, one scale per piece and row, each piece the
previous remainder (csrc/act_quant.h), and the nibbles (0..15) multiply the pieces as vpdpbusd's unsigned
operand, exactly, in int32. Then y = sum_g s_g sum_p a_p (sum_{k in g} n_k q_pk) + o_g sum_{k in g} x_k:
the offsets take each group's fp32 activation sum. The result is within sum_k |w_k| max|x| / 254^P (plus
fp32 rounding) of the reference's (tests/test_cpu_linear_int4.py checks that bound, and that fewer pieces
break it). PIECES: fp32 rows take 4: with 3 (2^-24 of the maximum), a row with an outlier channel (one
activation 100x the rest) came out 0.6-3.5x as far from the exact product as the fp32 reference's, with 4
0.15-0.6x. bf16 rows take 2 (2^-16 of the row maximum) only where AMX-INT8 takes them (a pass of 3-16 rows: a batch of
17 or 18 ends in a pass of 1-2 rows, which takes blocks: its rows rounded unlike their mates'); else they are
int8 blocks on every ISA (csrc/act_block8.h: one scale a 64-column block, max|x| / 127, llama.cpp's Q8 style,
within 1/254 of the block's largest an element; ~1% more logit error than int4's own, profiles/RESULTS.md, lanes
int4b8 and int4bl34), `pieces` unused: with VNNI each block's int32 sum is scaled by its group's scale times its
own, and each weight meets one vpdpbusd a row where 2 pieces took 2 (hot, one thread on a Zen 5: 0.87-0.90x the
time at 1 row, 0.83-0.85x at 2, 0.60-0.70x at 4-8 rows; 5-8 rows by spans, their sums past the registers row by row).

1 or 2 rows (and more where AMX is missing): the weights are stored by span at load (csrc/int4_block.h; repack
rearranges them): 16 blocks of 64 columns with dword d of block b in int32 lane b of the span's vector d, so that
lane b collects block b, and one convert and FMA with 16 group scales serves 16 groups: in L2, one thread, 1024 x
1024 at 1 row, 28 µs against 56 for the fp32 unpack and FMAs before (which were bound by the unpacking: cvt + 5 FMAs
per 64 weights); 2 rows 34 µs (then transposed in registers, three rounds of two-source permutes a span). At 1 row
a chunk's weight rows go as two streams, its halves, a row of each in turn (a step's linears in 5 pairs at load 11-12:
0.93-1.06x the time of one, 0.93-0.98x against a fixed loop beside them; profiles/RESULTS.md, int4row). A pass
takes two weight rows (at 1 row one of each stream; at 2-4 bf16 or 1-2 fp32 rows two in turn), sharing each load of
the pieces, which bound it: 1024 x 1024 at 1 bf16 row hot 10.2 µs against 14.0 (profiles/RESULTS.md, int4b1). From 3
rows, with AMX-INT8: 16 weight rows x one block unpacked to a tile of bytes and multiplied by the pieces'
quads (tdpbusd), each group's sums scaled two groups later so the tile unit's latency overlaps, and each
activation row's 16 outputs gathered and stored at once (8 rows: 50 µs against 80 for AMX-BF16 before
and 110 for vpdpbusd; 16 rows 73 against 97). Parallel over chunks of output rows on the kernels' thread
pool (csrc/pool.h). On AVX2 without AVX-512 VNNI (Zen 3) the weights are stored interleaved (csrc/int4_block.h;
repack rearranges them at load): each row in chunks of 4 blocks whose 32-byte vectors hold in int32 lane L columns of
block L % 4 only, each 4 rows' chunks in turn (one stream for a pass of 4 rows, which the hardware prefetcher follows).
bf16 rows are taken as int8 blocks (csrc/act_block8.h, as the VNNI loop takes them), each chunk 8 vpmaddubsw (the
nibbles as u8 against the int8) added by vpaddw in int16 and one vpmaddwd by ones that leaves block b in int32 lanes b
and 4 + b, then one convert and one FMA by the 4 groups' weight x activation scales: the layer's four linears at 8
rows 0.73x the time of the int16 pieces before, at 1 row 0.65-0.72x in L3 (profiles/RESULTS.md, int4b8's "ubs-il").
The rounding costs a bf16 row up to max|x over a block| / 254 an element, against the pieces' 2^-16 of the row's
maximum (1-4% more logit error than int4's own on a model with outlier channels, int4b8; one scale a row: +43%). fp32
rows keep int16 pieces (csrc/act_quant16.h: one holds what two int8 pieces do, so fp32 takes 2, within the same bound
for groups of up to 256 columns; a longer group's chunks add in fp32, up to ~1.7e-6 of the sum more), arranged as the
nibbles widened to int16: 16 vpmaddwd a chunk, two converts and FMAs. A pass takes 4 weight rows against 1 piece row
(2 against 2), their fp32 sums in registers; from 3 piece rows one weight row against up to 8 of them, each chunk
unpacked once for all, their fp32 sums in L1, 8 weight rows' outputs stored together. Both passes take a row's chunks
with the same operations in the same order and end a row in one order (csrc's madd_ends: the pieces' scales, then the
offsets 8 groups a vector, then one tree across the lanes), so on AVX2 a row's outputs are the same bits in any batch
the kernel takes (up to 32 rows; larger calls take dequant's GEMM), as int8's and bf16's are. The AVX-512 VNNI loop is
batch-invariant by construction (each row its own sums in one order), but where AMX-INT8 takes 3+ rows, its tiles sum
in another order than the loop's 1-2 rows: not invariant there (never run here). More rows (prefill) take dequant.py's
blocked GEMM.
"""
from __future__ import annotations

import ctypes

import torch

from ops.cpu import build, dequant, graph
from ops.cpu.linear import MAX_ROWS
from ops.torch_ref.linear_int4 import BLOCK

PIECES = {torch.bfloat16: 2, torch.float32: 4}  # int8 pieces per activation row, by its dtype (bf16's: AMX's)
KERNEL = build.CKernel("cpu_linear_int4", "linear_int4.c",
                       ("linear_int4", "linear_int4_pack", "linear_int4_layout", "linear_int4_amx_tiles"))


def interleaved(lib: ctypes.CDLL | None = None) -> bool:
    """Whether a build of linear_int4.c (the kernel set's by default), and dequant.c's and embedding.c's with the
    same flags, read int4 weights interleaved (chunks of 4 blocks, rows in quads), where linear_int4 takes its AVX2
    loops, else by span (chunks of 16 blocks; csrc/int4_block.h decides)."""
    answer = torch.zeros(1, dtype=torch.int32)
    (lib or KERNEL.lib).linear_int4_layout(answer.data_ptr())
    return bool(answer.item())


def repack(weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """weight: [N, K / 2] uint8 contiguous, as quantize_int4_into writes it -> in place, in the layout a build of
    linear_int4.c (the kernel set's by default) reads: interleaved where interleaved(lib), else by span. Through
    scratch of 4 rows (the interleaved layout's quad; by span one is used; allocated here, so a failure raises):
    loading holds no second copy."""
    if weight.shape[1] % (BLOCK // 2) or not weight.is_contiguous():
        raise ValueError(f"an int4 weight of {2 * weight.shape[1]} columns ({weight.stride()} strides): repack takes "
                         f"contiguous rows of whole {BLOCK}-column blocks")
    quad = torch.empty(4, weight.shape[1], dtype=torch.uint8)
    (lib or KERNEL.lib).linear_int4_pack(weight.data_ptr(), quad.data_ptr(), weight.shape[0], 2 * weight.shape[1])


def _linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS), weight: [N, K / 2] uint8 contiguous in the kernel's layout (repack), scale,
    offset: [N, K / G] contiguous in x's dtype (bf16 or fp32), G % 64 == 0 -> [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, weight.shape[0], dtype=x.dtype)
    with build.profiled("nanoqwen::linear_int4_cpu"):
        graph.call(KERNEL.lib.linear_int4, x, weight, scale, offset, out, m, weight.shape[0], k, k // scale.shape[1],
                   int(x.dtype == torch.bfloat16), PIECES[x.dtype])
    return out


def _linear_int4_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


linear_int4_cpu = build.kernel_op("linear_int4_cpu", _linear_int4, _linear_int4_fake)


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The kernel set's linear_int4, chosen only where linear_int4.c, dequant.c and embedding.c all built (ops/cpu):
    the weights are then in their layout (repack), which the torch reference does not read, so there is no falling
    back to it here. The C kernel up to MAX_ROWS rows, dequant.py's blocked GEMM beyond."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if (rows.shape[1] // scale.shape[1]) % BLOCK:
        raise ValueError(f"int4 groups of {rows.shape[1] // scale.shape[1]} columns: the C kernels take multiples of "
                         f"{BLOCK} (nanoqwen/quant.py's GROUP_SIZE)")
    if dequant.takes(rows.shape[0]):
        out = dequant.linear_int4(rows, weight, scale, offset)
    elif rows.shape[0] <= MAX_ROWS:
        out = linear_int4_cpu(rows, weight, scale, offset)
    else:
        raise RuntimeError("int4 prefill rows need dequant.c, which did not build (ops/cpu picks the references then)")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
