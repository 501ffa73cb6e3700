"""The CPU weights in transparent huge pages.

A decode step streams every weight once. In 4 KB pages that is a TLB miss every 4 KB, and the hardware
prefetcher stops at each page boundary; in 2 MB pages neither happens: the C linear kernels ran a
0.6B step's int8 linears in 57 ms instead of 84 (profiles/RESULTS.md, "CPU linears: huge pages, AMX
from 2 rows, int4 on the pool").
Linux gives huge pages to a region advised MADV_HUGEPAGE when it is first touched (transparent_hugepage
`madvise` mode, the common default; `always` gives them anyway), so the buffer is advised before the
weights are written into it. Elsewhere (no madvise, `never`) it is an ordinary buffer.
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a Unix libc
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An untouched CPU buffer of `nbytes` uint8 starting on a huge page and advised MADV_HUGEPAGE."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)  # large: glibc maps it fresh, no page touched yet
    start = -raw.data_ptr() % HUGE_PAGE
    madvise = _madvise()
    if madvise is not None:
        madvise(raw.data_ptr() + start, size, MADV_HUGEPAGE)  # a refusal (old kernel, `never`) leaves 4 KB pages
    return raw[start:start + nbytes]


def move_into_huge_pages(module: nn.Module) -> None:
    """Rebinds every parameter of `module` (on the CPU, not yet written) to a slice of one huge-page buffer;
    parameters shared between modules stay shared."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    buffer = huge_page_buffer(total)
    for p, offset in zip(params, offsets, strict=True):
        p.data = buffer[offset:offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
