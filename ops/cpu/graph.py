"""CPU graphs: the C kernel calls of a decode step, recorded once and replayed (NANOQWEN_GRAPH=cpugraph).

Every CPU kernel wrapper calls its C function through `call`, with tensors as arguments. While a
`capture()` is active, `call` also records the function and its converted arguments (raw pointers,
ints, floats) and keeps each tensor alive, as a CUDA graph's pool keeps its memory: a replay re-issues
the calls in order, with none of the step's Python, torch allocations or views. A capture refuses a
step whose torch ops do real work (an op outside a kernel would be missing from the replay): only
allocations and views may run beside the recorded calls.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NotCapturable(RuntimeError):
    """The step ran a torch op that computes: it cannot be replayed as recorded C calls."""


class Recording:
    """The C calls of one captured step, in order, and the tensors they address."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, tuple]] = []
        self.tensors: list[torch.Tensor] = []

    def replay(self) -> None:
        for fn, args in self.calls:  # the check inline: a replay is the decode step, one frame a call less
            if fn(*args):
                _failed(fn)

    def __add__(self, other: Recording) -> Recording:
        """This recording's calls, then other's."""
        joined = Recording()
        joined.calls = self.calls + other.calls
        joined.tensors = self.tensors + other.tensors
        return joined


# The capture of the calling thread (torch's dispatch modes are per thread too): an engine capturing
# never records another thread's kernel calls.
_capturing = threading.local()


def _failed(fn: Callable) -> None:
    """Raises for fn, which returned a status (csrc/nanoqwen_cpu.h's `int` functions) other than 0."""
    raise MemoryError(f"the C kernel {fn.__name__} wrote nothing: its working memory could not be allocated or was "
                      f"given too small")


def call(fn: Callable, *args: torch.Tensor | int | float | None) -> None:
    """fn(*args), each tensor passed as its data pointer (None as NULL), its status checked; recorded during a
    capture."""
    raw = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    if fn(*raw):
        _failed(fn)
    recording = getattr(_capturing, "recording", None)
    if recording is not None:
        # as ctypes objects of the prototype's types: a replay does not convert them again
        types = getattr(fn, "argtypes", None) or [None] * len(raw)
        recording.calls.append((fn, tuple(a if t is None else t(a) for t, a in zip(types, raw))))
        recording.tensors.extend(a for a in args if isinstance(a, torch.Tensor))


ALLOCATIONS = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default)


def _storages(values: object) -> list[int]:
    flat = values if isinstance(values, (list, tuple)) else [values]
    return [t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)]


class _AllocationsAndViewsOnly(TorchDispatchMode):
    """Raises NotCapturable for a torch op that writes (in place or into new memory) rather than
    allocating or viewing its inputs."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # False: torch would wrap __torch_dispatch__ in torch._disable_dynamo, whose first call imports dynamo,
        # inductor and triton (~0.14 GB resident) into a process that never compiles; a capture never runs
        # under torch.compile (graph modes are exclusive: config.resolve_graph)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in ALLOCATIONS:
            inputs = set(_storages(list(args) + list((kwargs or {}).values())))
            if func._schema.is_mutable or not set(_storages(out)) <= inputs:
                raise NotCapturable(f"the step computes with torch op {func}, outside a C kernel")
        return out


@contextlib.contextmanager
def capture() -> Iterator[Recording]:
    """Records the C calls of the code run inside; raises NotCapturable if that code computes with torch."""
    if getattr(_capturing, "recording", None) is not None:
        raise RuntimeError("a CPU graph capture is already active")
    _capturing.recording = recording = Recording()
    try:
        with _AllocationsAndViewsOnly():
            yield recording
    finally:
        _capturing.recording = None
