"""bf16 linear layers on x86 CPUs without native bf16 matrix units (AVX2, no AVX-512-BF16/AMX).

There torch's bf16 GEMM converts element by element and reaches ~1 GB/s with more than one row;
decode is a matrix-vector product bounded by reading the weights, so this kernel streams each
bf16 weight row once, widens it to fp32 in registers (a 16-bit shift) and FMAs it against up
to 32 activation rows held in cache, parallel over output rows in torch's own OpenMP pool.
Built by ops/cpu_build.py; where it cannot be, `linear` falls back to torch.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from ops import cpu_build

MAX_ROWS = 32  # beyond this, activations are no longer a "vector": widen weights and use fp32 GEMM

_SOURCE = r"""
/* dot products of one bf16 weight row with one or two fp32 activation rows; K % 32 == 0 */
static inline void row_dot2(const uint16_t *r, const float *x0, const float *x1, int K, float *o0, float *o1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int k = 0; k < K; k += 32) {
        __m256 w0 = widen(r + k), w1 = widen(r + k + 8), w2 = widen(r + k + 16), w3 = widen(r + k + 24);
        a0 = _mm256_fmadd_ps(_mm256_load_ps(x0 + k), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_load_ps(x0 + k + 8), w1, a1);
        a2 = _mm256_fmadd_ps(_mm256_load_ps(x0 + k + 16), w2, a2);
        a3 = _mm256_fmadd_ps(_mm256_load_ps(x0 + k + 24), w3, a3);
        if (x1) {
            b0 = _mm256_fmadd_ps(_mm256_load_ps(x1 + k), w0, b0);
            b1 = _mm256_fmadd_ps(_mm256_load_ps(x1 + k + 8), w1, b1);
            b2 = _mm256_fmadd_ps(_mm256_load_ps(x1 + k + 16), w2, b2);
            b3 = _mm256_fmadd_ps(_mm256_load_ps(x1 + k + 24), w3, b3);
        }
    }
    *o0 = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    if (x1) *o1 = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
}

/* y[m, n] = sum_k x[m, k] * w[n, k];  x: [M, K] bf16, w: [N, K] bf16, y: [M, N] bf16; K % 32 == 0.
   One weight row at a time keeps each thread's reads one sequential stream (what the hardware
   prefetcher follows best); the row stays in L1 while every activation row uses it. */
void linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K) {
    float *xf = (float *)aligned_alloc(32, (size_t)M * K * sizeof(float));
    for (long i = 0; i < (long)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t *r = w + (long)n * K;
        for (int m = 0; m < M; m += 2) {
            float o0, o1;
            const int two = m + 1 < M;
            row_dot2(r, xf + (long)m * K, two ? xf + (long)(m + 1) * K : 0, K, &o0, &o1);
            y[(long)m * N + n] = f32_to_bf16(o0);
            if (two) y[(long)(m + 1) * N + n] = f32_to_bf16(o1);
        }
    }
    free(xf);
}
"""


@cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("cpu_linear", _SOURCE)
    if lib is not None:
        lib.linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        lib.linear_bf16.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def linear_bf16_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16 (M <= MAX_ROWS, K % 32 == 0), weight: [N, K] bf16 contiguous -> [M, N] bf16."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    with cpu_build.profiled("nanoqwen::linear_bf16_cpu"):
        _library().linear_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0], x.shape[1])
    return out


# The same kernel as an opaque op for torch.compile (the dispatcher costs tens of µs in eager).
linear_bf16_cpu_op = torch.library.custom_op("nanoqwen::linear_bf16_cpu", linear_bf16_cpu, mutates_args=())


@linear_bf16_cpu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


# Whether this CPU has bf16 matrix instructions that oneDNN uses (AVX-512-BF16, AMX): then torch's
# own bf16 GEMM is fast and this kernel is not needed.
NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
_use_kernel = False  # set by prepare(); a plain global so torch.compile can read it


def prepare() -> None:
    """Builds the kernel if this CPU needs it; call before compiling a model that uses `linear`."""
    global _use_kernel
    _use_kernel = not NATIVE_BF16 and available()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, with the fast paths for bf16 on CPUs lacking native bf16 GEMM."""
    if weight.dtype != torch.bfloat16 or NATIVE_BF16 or weight.device.type != "cpu":
        return F.linear(x, weight)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if _use_kernel and rows.shape[0] <= MAX_ROWS and rows.shape[1] % 32 == 0 and weight.is_contiguous():
        out = (linear_bf16_cpu_op if torch.compiler.is_compiling() else linear_bf16_cpu)(rows, weight)
    elif rows.shape[0] > 1:  # widen the weights once and let the fp32 GEMM run at full speed
        out = F.linear(rows.float(), weight.float()).to(torch.bfloat16)
    else:  # torch's own bf16 matrix-vector product is reasonable
        out = F.linear(rows, weight)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
