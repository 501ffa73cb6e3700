"""Every load and store of the Triton kernels launched inside `bounds_checked()`, run by Triton's interpreter,
checked against the extents of the tensors passed to that launch. On a GPU an address outside them reads or
writes someone else's memory silently, or faults as an illegal memory access some launches later. An address is
checked against the union of the launch's tensors, so one that strays into another argument passes unseen."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


def tensor_extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte) the tensor's elements span, whatever its strides."""
    last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Extents:
    def __init__(self) -> None:
        self.starts = self.ends = np.zeros(0, dtype=np.uint64)
        self.launches = 0
        self.accesses = 0

    def set(self, tensors: list[torch.Tensor]) -> None:
        spans = sorted(tensor_extent(t) for t in tensors)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = np.array([s for s, _ in merged], dtype=np.uint64)
        self.ends = np.array([e for _, e in merged], dtype=np.uint64)
        self.launches += 1

    def check(self, kind: str, ptrs, mask) -> None:
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64).ravel()
        self.accesses += addresses.size
        size = np.uint64(interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        span = np.searchsorted(self.starts, addresses, side="right") - 1
        inside = (span >= 0) & (addresses + size <= self.ends[np.maximum(span, 0)])
        if not inside.all():
            bad = addresses[~inside]
            nearest = self.starts[np.maximum(span[~inside], 0)]
            raise OutOfBounds(f"{bad.size} of {addresses.size} {kind} addresses lie outside the launch's tensors, "
                              f"e.g. {int(bad[0]) - int(nearest[0]):+d} bytes from the start of the nearest one below")


@contextlib.contextmanager
def bounds_checked() -> Iterator[_Extents]:
    """Inside: every interpreted launch checks each masked-in load and store address: OutOfBounds on the first bad
    one, which the interpreter re-raises wrapped in its InterpreterError. Yields the counts of launches and
    accesses checked."""
    extents = _Extents()
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        extents.set([a for a in (*args_hst, *kwargs_hst.values()) if isinstance(a, torch.Tensor)])
        return args_hst, kwargs_hst

    def load_checked(self, ptrs, mask, *args, **kwargs):
        extents.check("load", ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def store_checked(self, ptrs, value, mask, *args, **kwargs):
        extents.check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(executor, "_init_args_hst", init_args_checked)
        patch.setattr(builder, "create_masked_load", load_checked)
        patch.setattr(builder, "create_masked_store", store_checked)
        yield extents

