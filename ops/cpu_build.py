"""Compiles a kernel's C source with the system compiler on first use and loads it with ctypes.

The CPU kernels (AVX2 + FMA, OpenMP) need no torch headers, so building one takes about a second.
The shared object is cached by a hash of its source; without a compiler, on another CPU, or with
NANOQWEN_CPU_KERNELS=0, `load` returns None and callers fall back to torch.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("nanoqwen")

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]

# Helpers every kernel source may use.
PRELUDE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 widen(const uint16_t *p) {  /* 8 bf16 -> 8 fp32: a 16-bit shift */
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
"""


def profiled(name: str):
    """A profiler range around a kernel call, free when no profiler is running."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _compile(compiler: str, text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / path.with_suffix(".c").name
        src.write_text(text)
        out = Path(tmp) / path.name
        result = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, compiler, stderr=result.stderr)
        os.replace(out, path)  # atomic: concurrent processes never load a half-written file


def cache_dir() -> Path:
    root = os.environ.get("NANOQWEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoqwen")
    return Path(root)


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled library for `source`, or None where it cannot run (logged)."""
    if os.environ.get("NANOQWEN_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s falls back to torch", name)
        return None
    text = PRELUDE + source
    digest = hashlib.sha256((text + " ".join(FLAGS)).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.so"
    try:
        if not path.exists():
            _compile(compiler, text, path)
        # libgomp.so.1 resolves to the OpenMP runtime torch already loaded: one shared thread pool.
        return ctypes.CDLL(str(path))
    except Exception as exc:  # a kernel that cannot be built must never stop the model from loading
        log.warning("could not build %s (%s): using torch", name, (getattr(exc, "stderr", None) or repr(exc))[:500])
        return None


class CKernel:
    """The functions of one C source, built at most once. `ready` is a plain attribute, so code
    that torch.compile traces can branch on it."""

    def __init__(self, name: str, source: str, signatures: dict[str, list]) -> None:
        self.name = name
        self.source = source
        self.signatures = signatures  # function name -> ctypes argument types
        self.lib: ctypes.CDLL | None = None
        self.ready = False
        self._tried = False

    def build(self) -> bool:
        """Compiles (or loads from the cache) on the first call; whether the kernel can run."""
        if not self._tried:
            self._tried = True
            self.lib = load(self.name, self.source)
            if self.lib is not None:
                for function, argtypes in self.signatures.items():
                    getattr(self.lib, function).argtypes = argtypes
                    getattr(self.lib, function).restype = None
            self.ready = self.lib is not None
        return self.ready
