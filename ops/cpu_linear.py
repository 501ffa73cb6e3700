"""bf16 linear layers on x86 CPUs without native bf16 matrix units (AVX2, no AVX-512-BF16/AMX).

There torch's bf16 GEMM converts element by element and reaches ~1 GB/s with more than one row;
decode is a matrix-vector product bounded by reading the weights, so this kernel streams each
bf16 weight row once, widens it to fp32 in registers (a 16-bit shift) and FMAs it against up
to 32 activation rows held in cache, parallel over output rows in torch's own OpenMP pool.
It is compiled with the system C compiler on first use and cached; without a compiler, or on
another CPU, `linear` falls back to torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("nanoqwen")

MAX_ROWS = 32  # beyond this, activations are no longer a "vector": widen weights and use fp32 GEMM

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 widen(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* y[m, n] = sum_k x[m, k] * w[n, k];  x: [M, K] bf16, w: [N, K] bf16, y: [M, N] bf16; K % 8 == 0 */
void linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K) {
    float *xf = (float *)aligned_alloc(32, (size_t)M * K * sizeof(float) + 32);
    for (long i = 0; i < (long)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += 4) {
        const int rows = N - n < 4 ? N - n : 4;
        const uint16_t *w0 = w + (long)n * K;
        const uint16_t *w1 = rows > 1 ? w0 + K : w0;
        const uint16_t *w2 = rows > 2 ? w0 + 2L * K : w0;
        const uint16_t *w3 = rows > 3 ? w0 + 3L * K : w0;
        for (int m = 0; m < M; m += 2) {
            const int two = m + 1 < M;
            const float *x0 = xf + (long)m * K;
            const float *x1 = two ? x0 + K : x0;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int k = 0; k < K; k += 8) {
                __m256 v0 = _mm256_load_ps(x0 + k), v1 = _mm256_load_ps(x1 + k);
                __m256 b0 = widen(w0 + k), b1 = widen(w1 + k), b2 = widen(w2 + k), b3 = widen(w3 + k);
                a00 = _mm256_fmadd_ps(v0, b0, a00); a01 = _mm256_fmadd_ps(v0, b1, a01);
                a02 = _mm256_fmadd_ps(v0, b2, a02); a03 = _mm256_fmadd_ps(v0, b3, a03);
                a10 = _mm256_fmadd_ps(v1, b0, a10); a11 = _mm256_fmadd_ps(v1, b1, a11);
                a12 = _mm256_fmadd_ps(v1, b2, a12); a13 = _mm256_fmadd_ps(v1, b3, a13);
            }
            float out0[4] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03)};
            float out1[4] = {hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
            for (int r = 0; r < rows; r++) {
                y[(long)m * N + n + r] = f32_to_bf16(out0[r]);
                if (two) y[(long)(m + 1) * N + n + r] = f32_to_bf16(out1[r]);
            }
        }
    }
    free(xf);
}
"""


def _cache_dir() -> Path:
    root = os.environ.get("NANOQWEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoqwen")
    return Path(root)


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run (logged once)."""
    if os.environ.get("NANOQWEN_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: bf16 CPU matmuls use torch's slower kernels")
        return None
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256((_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_linear-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "cpu_linear.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / path.name
            result = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("could not compile the bf16 CPU kernel (%s): using torch", result.stderr.strip()[:500])
                return None
            os.replace(out, path)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(path))  # links libgomp.so.1: the runtime torch already loaded, one thread pool
    lib.linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    lib.linear_bf16.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def linear_bf16_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16 (M <= MAX_ROWS), weight: [N, K] bf16 contiguous -> [M, N] bf16."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    _library().linear_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0], x.shape[1])
    return out


@cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions that oneDNN uses (AVX-512-BF16, AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, with the fast paths for bf16 on CPUs lacking native bf16 GEMM."""
    if x.device.type != "cpu" or weight.dtype != torch.bfloat16 or torch.compiler.is_compiling() or native_bf16():
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= MAX_ROWS and x.shape[-1] % 8 == 0 and weight.is_contiguous() and available():
        out = linear_bf16_cpu(rows, weight)
    else:  # prefill-sized: widen the weights once and let the fp32 GEMM run at full speed
        out = F.linear(rows.float(), weight.float()).to(torch.bfloat16)
    return out.view(*x.shape[:-1], weight.shape[0])
