"""The CPU weights in one huge-page buffer (nanoqwen/hugepages.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nanoqwen.hugepages import HUGE_PAGE, huge_page_buffer, move_into_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_parameters_move_into_one_aligned_buffer_and_stay_shared():
    model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 300, bias=False), nn.Linear(64, 7))
    model[1].weight = model[0].weight  # tied, as the LM head and the embedding
    model[2].to(torch.bfloat16)
    shapes = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
    move_into_huge_pages(model)
    params = list(model.parameters())
    assert model[1].weight is model[0].weight and len(params) == 3
    assert {name: (p.shape, p.dtype) for name, p in model.named_parameters()} == shapes
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert params[0].data_ptr() % HUGE_PAGE == 0
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params)
    assert all(start % 4096 == 0 for start, _ in spans)  # page starts, not just ALIGN's: fails if ALIGN regresses
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    with torch.no_grad():  # each parameter is writable on its own
        for i, p in enumerate(params):
            p.fill_(i)
    assert all(torch.all(p == i) for i, p in enumerate(params))


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` in this process."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_the_buffer_is_backed_by_huge_pages_once_written():
    buffer = huge_page_buffer(3 * HUGE_PAGE)
    buffer.fill_(1)
    assert _huge_kb(buffer.data_ptr()) >= HUGE_PAGE // 1024
