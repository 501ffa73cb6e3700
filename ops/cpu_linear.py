"""Decode-sized linear layers on x86 CPUs (AVX2): bf16 or fp32 weights, up to 32 activation rows.

Decode is a matrix-vector product bounded by reading the weights. Without native bf16 matrix units
(no AVX-512-BF16/AMX) torch's bf16 GEMM converts element by element and reaches ~1 GB/s with more
than one row, and its fp32 GEMV leaves bandwidth unused; this kernel streams each weight row once
(bf16 widened to fp32 in registers by a shift or a mask) and FMAs it against every activation row held
in cache, parallel over output rows in torch's own OpenMP pool.
Built by ops/cpu_build.py; where it cannot be, `linear` falls back to torch.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ops import cpu_build

MAX_ROWS = 32  # beyond this, activations are no longer a "vector": widen weights and use fp32 GEMM

_SOURCE = r"""
/* Dot products of one weight row with one or two fp32 activation rows; K % 32 == 0. Always inlined
   with a constant `bf16`, so each dtype gets its own branch-free loop. A bf16 row is read 16 values
   (32 bytes) at a time and widened without shuffles: `v << 16` holds the even-indexed values as
   fp32 and `v & 0xffff0000` the odd-indexed ones, so the activations are pre-split to match
   (evens then odds in each group of 16, see `split_even_odd`). */
static inline __attribute__((always_inline)) void row_dot2(const void *r, const float *x0, const float *x1, int K,
                                                           float *o0, float *o1, int bf16) {
    const __m256i odd_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int k = 0; k < K; k += 32) {
        __m256 w0, w1, w2, w3;
        /* A few rows ahead of the loads: the hardware prefetcher alone left a quarter of the
           memory bandwidth unused (measured 18.4 -> 24.1 GB/s at batch 1 on a 2-core Xeon). */
        __builtin_prefetch((const char *)r + (bf16 ? 2 : 4) * k + 4096);
        if (bf16) {
            __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)r + k));
            __m256i u = _mm256_loadu_si256((const __m256i *)((const uint16_t *)r + k + 16));
            w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            w1 = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
            w2 = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
            w3 = _mm256_castsi256_ps(_mm256_and_si256(u, odd_mask));
        } else {
            const float *f = (const float *)r + k;
            w0 = _mm256_loadu_ps(f), w1 = _mm256_loadu_ps(f + 8), w2 = _mm256_loadu_ps(f + 16), w3 = _mm256_loadu_ps(f + 24);
        }
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), w1, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 16), w2, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 24), w3, a3);
        if (x1) {
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), w0, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 8), w1, b1);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 16), w2, b2);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 24), w3, b3);
        }
    }
    *o0 = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    if (x1) *o1 = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
}

/* bf16 activations -> fp32, each group of 16 reordered as its 8 even-indexed then 8 odd-indexed values. */
static void split_even_odd(const uint16_t *x, float *out, long n) {
    for (long g = 0; g < n; g += 16)
        for (int j = 0; j < 8; j++) {
            out[g + j] = bf16_to_f32(x[g + 2 * j]);
            out[g + 8 + j] = bf16_to_f32(x[g + 2 * j + 1]);
        }
}

/* y[m, n] = sum_k x[m, k] * w[n, k];  x: [M, K], w: [N, K], y: [M, N], all bf16 or all fp32; K % 32 == 0.
   One weight row at a time keeps each thread's reads one sequential stream (what the hardware
   prefetcher follows best); the row stays in L1 while every activation row uses it. */
void linear(const void *x, const void *w, void *y, int M, int N, int K, int bf16) {
    float *split = 0;
    const float *xf = (const float *)x;
    if (bf16) {
        split = (float *)malloc((size_t)M * K * sizeof(float));
        split_even_odd((const uint16_t *)x, split, (long)M * K);
        xf = split;
    }
    const size_t row_bytes = (size_t)K * (bf16 ? 2 : 4);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const void *r = (const char *)w + n * row_bytes;
        for (int m = 0; m < M; m += 2) {
            float o0, o1;
            const float *x1 = m + 1 < M ? xf + (long)(m + 1) * K : 0;
            if (bf16) row_dot2(r, xf + (long)m * K, x1, K, &o0, &o1, 1);
            else row_dot2(r, xf + (long)m * K, x1, K, &o0, &o1, 0);
            const long at = (long)m * N + n;
            if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(o0); else ((float *)y)[at] = o0;
            if (x1) {
                if (bf16) ((uint16_t *)y)[at + N] = f32_to_bf16(o1); else ((float *)y)[at + N] = o1;
            }
        }
    }
    free(split);
}
"""


KERNEL = cpu_build.CKernel("cpu_linear", _SOURCE, {"linear": [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4})


def linear_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, K % 32 == 0), weight: [N, K] contiguous, both bf16 or both fp32 -> [M, N]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    with cpu_build.profiled("nanoqwen::linear_cpu"):
        KERNEL.lib.linear(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0], x.shape[1],
                          int(x.dtype == torch.bfloat16))
    return out


# The same kernel as an opaque op for torch.compile (the dispatcher costs tens of µs in eager).
linear_cpu_op = torch.library.custom_op("nanoqwen::linear_cpu", linear_cpu, mutates_args=())


@linear_cpu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


# Whether this CPU has bf16 matrix instructions that oneDNN uses (AVX-512-BF16, AMX). Such CPUs run
# torch's own GEMMs with AVX-512, which win from a few rows on; below that this kernel still reads the
# weights faster. Measured on a 2-core AVX-512-BF16 Xeon, a Qwen3-0.6B pass of linears at 1 / 4 / 8 rows:
# bf16 50 / 70 / 136 ms against oneDNN's 76 / 96 / 129; fp32 at 4 / 8 / 16 rows 134 / 186 / 373 ms
# against MKL's 155 / 220 / 198. So there the kernel keeps only the rows up to these limits.
NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
NATIVE_BF16_MAX_ROWS = {torch.bfloat16: 6, torch.float32: 8}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, with the CPU decode fast path (bf16 or fp32 weights, up to MAX_ROWS rows)."""
    bf16 = weight.dtype == torch.bfloat16
    if weight.device.type != "cpu" or not (bf16 or weight.dtype == torch.float32):
        return F.linear(x, weight)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    max_rows = NATIVE_BF16_MAX_ROWS[weight.dtype] if NATIVE_BF16 else MAX_ROWS
    if KERNEL.ready and rows.shape[0] <= max_rows and rows.shape[1] % 32 == 0 and weight.is_contiguous():
        out = (linear_cpu_op if torch.compiler.is_compiling() else linear_cpu)(rows, weight)
    elif bf16 and rows.shape[0] > 1 and not NATIVE_BF16:  # widen the weights once: the fp32 GEMM runs at full speed
        out = F.linear(rows.float(), weight.float()).to(torch.bfloat16)
    else:
        out = F.linear(rows, weight)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
