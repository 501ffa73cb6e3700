"""int4 weight-only linear layers on x86 CPUs (AVX2; AVX-512 VNNI, AMX), up to linear.MAX_ROWS activation rows.

A weight takes half a byte plus its group's share of a scale and an offset, so decode reads about a
quarter of bf16's bytes. The weights are never converted to floats (csrc/linear_int4.c): each activation
row is split into P int8 pieces, x ~= a1 q1 + ... + aP qP, one scale per piece and row, each piece the
previous remainder (csrc/act_quant.h), and the nibbles (0..15) multiply the pieces as vpdpbusd's unsigned
operand, exactly, in int32. Then y = sum_g s_g sum_p a_p (sum_{k in g} n_k q_pk) + o_g sum_{k in g} x_k:
the offsets take each group's fp32 activation sum. The result is within sum_k |w_k| max|x| / 254^P (plus
fp32 rounding) of the reference's (tests/test_cpu_linear_int4.py checks that bound, and that fewer pieces
break it). PIECES: bf16 rows take 2 (2^-16 of the row maximum, noise beside bf16's own 2^-9 rounding;
1 row of 1024 x 1024 in 27 µs against 25 with one piece); fp32 rows 4: with 3 (2^-24 of the maximum), a
row with an outlier channel (one activation 100x the rest) came out 0.6-3.5x as far from the exact
product as the fp32 reference's, with 4 0.15-0.6x.

1 or 2 rows (and more where AMX is missing): 16 blocks of 64 columns are transposed in registers (three rounds
of two-source permutes) so that int32 lane b collects block b, and one convert and FMA with 16 group
scales serves 16 groups: in L2, one thread, 1024 x 1024 at 1 row, 28 µs against 56 for the fp32 unpack
and FMAs before (which were bound by the unpacking: cvt + 5 FMAs per 64 weights); 2 rows 34 µs. At 1 row a chunk's
weight rows go as two streams, its halves, a row of each in turn (a step's linears in 5 pairs at load 11-12:
0.93-1.06x the time of one, 0.93-0.98x against a fixed loop beside them; profiles/RESULTS.md, int4row). From 3
rows, with AMX-INT8: 16 weight rows x one block unpacked to a tile of bytes and multiplied by the pieces'
quads (tdpbusd), each group's sums scaled two groups later so the tile unit's latency overlaps, and each
activation row's 16 outputs gathered and stored at once (8 rows: 50 µs against 80 for AMX-BF16 before
and 110 for vpdpbusd; 16 rows 73 against 97). Parallel over chunks of output rows on the kernels' thread
pool (csrc/pool.h). On AVX2 without AVX-512 VNNI (Zen 3) the pieces are int16 (csrc/act_quant16.h, as
linear_int8.py's: one holds what two int8 pieces do, so bf16 takes 1 and fp32 2, within the same bounds), and
vpmaddwd multiplies them by the nibbles of a block's 16 words shifted and masked to int16 (nibble j of word i is
column 16j + i: no shuffles), the pieces staged block by block; a pass takes 4 weight rows against 1 piece row
(2 against 2), so that at one activation row four independent FMA chains scale the groups and the rows' ends (lane
sums, offsets) are shared: one thread, 512 x 1024 hot in L2 on a 2-core Zen 3, 1 row 16.5 µs against 30 a weight
row at a time; from 3 piece rows, 1 weight row against up to 8 of them, each block unpacked once for all, their fp32
sums in L1 and every row's lanes summed at once: 8 bf16 rows 86-90 µs against 130 in two passes of 4
(profiles/RESULTS.md, int4b8); 8 weight rows' outputs stored together (the scalar ends were ~20% of that pass):
79-86 µs (int4ends); where the pieces outgrow L1 (8 bf16 rows from K 2048), those 8 weight rows take 8 groups each
in turn, so that the groups' pieces are read from L1 8 times, not from L2 (hot K 3072 0.78x the time, int4b). Both
passes end a row in one order (csrc's madd_ends: the pieces' scales, then the offsets 8 groups a vector, then one
tree across the lanes), and their int32 sums and group scaling are the same, so on AVX2 a row's outputs are the same
bits in any batch the kernel takes (up to 32 rows; larger calls take dequant's GEMM), as int8's and bf16's are
(before, an fp32 row's last bits moved with its batch-mates). The AVX-512 VNNI loop is batch-invariant by
construction (each row its own sums in one order), but where AMX-INT8 takes 3+ rows, its tiles sum in another
order than the loop's 1-2 rows: not invariant there (never run here). On AVX2 the weights are stored in quads
(csrc/int4_block.h; repack rearranges them at load), so that a pass of 4 rows reads one stream from DRAM, which the
hardware prefetcher follows, not 4 interleaved ones. More rows (prefill) take dequant.py's blocked GEMM.
"""
from __future__ import annotations

import ctypes

import torch

from ops.cpu import build, dequant, graph
from ops.cpu.linear import MAX_ROWS
from ops.torch_ref.linear_int4 import BLOCK

PIECES = {torch.bfloat16: 2, torch.float32: 4}  # int8 pieces per activation row, by its dtype
KERNEL = build.CKernel("cpu_linear_int4", "linear_int4.c", ("linear_int4", "linear_int4_pack", "linear_int4_layout"))


def quads(lib: ctypes.CDLL | None = None) -> bool:
    """Whether a build of linear_int4.c (the kernel set's by default), and dequant.c's and embedding.c's with the
    same flags, read int4 weights in quads: each 4 rows block by block, where linear_int4 takes its AVX2 loops
    (csrc/int4_block.h decides)."""
    answer = torch.zeros(1, dtype=torch.int32)
    (lib or KERNEL.lib).linear_int4_layout(answer.data_ptr())
    return bool(answer.item())


def repack(weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """weight: [N, K / 2] uint8 contiguous, as quantize_int4_into writes it -> in place, in the layout a build of
    linear_int4.c (the kernel set's by default) reads: quads where quads(lib), else unchanged. Through 4 rows of
    scratch (allocated here, so a failure raises): loading holds no second copy."""
    if weight.shape[1] % (BLOCK // 2) or not weight.is_contiguous():
        raise ValueError(f"an int4 weight of {2 * weight.shape[1]} columns ({weight.stride()} strides): repack takes "
                         f"contiguous rows of whole {BLOCK}-column blocks")
    if quads(lib):
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
    if dequant.takes(rows.shape[0], int4=True):
        out = dequant.linear_int4(rows, weight, scale, offset)
    elif rows.shape[0] <= MAX_ROWS:
        out = linear_int4_cpu(rows, weight, scale, offset)
    else:
        raise RuntimeError("int4 prefill rows need dequant.c, which did not build (ops/cpu picks the references then)")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
