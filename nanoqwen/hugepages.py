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

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
# Each tensor starts on a 4 KB page, not just a cache line: with 64-byte starts most bf16 matrices began
# mid-page, and the AVX2 kernel, which streams two rows at once (2 KB each at K 1024), read a decode step's bf16
# linears 12-16% slower than from a page-aligned copy of the same bytes (int8, one row at a time, alike either way;
# profiles/RESULTS.md, "stream"). A tensor costs under 4 KB of padding.
ALIGN = 4096


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An untouched CPU buffer of `nbytes` uint8 starting on a huge page and advised MADV_HUGEPAGE. Mapped
    afresh: memory from the allocator may be a heap block whose pages an earlier use already made."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: Python's default for anonymous maps is shared, which the kernel backs by shmem, not anonymous THP
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; a refusal (transparent huge pages `never`) leaves 4 KB pages
        region.madvise(mmap.MADV_HUGEPAGE, start, size)
    return raw[start:start + nbytes]  # the mapping is unmapped when the last tensor on it goes


def move_into_huge_pages(module: nn.Module) -> None:
    """Rebinds every parameter of `module` (on the CPU, not yet written) to a slice of one huge-page buffer;
    parameters shared between modules stay shared."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    if not params:  # a model on a GPU
        return
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    buffer = huge_page_buffer(total)
    for p, offset in zip(params, offsets, strict=True):
        p.data = buffer[offset:offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
