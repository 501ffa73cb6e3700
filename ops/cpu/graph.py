"""CPU graphs: the C kernel calls of a decode step, recorded once and replayed (NANOQWEN_GRAPH=cpugraph).

Every CPU kernel wrapper calls its C function through `call`, with tensors as arguments. While a
`capture()` is active, `call` also records the function and its converted arguments (raw pointers,
ints, floats) and keeps each tensor alive, as a CUDA graph's pool keeps its memory: a replay re-issues
the calls in order, with none of the step's Python, torch allocations or views. A capture refuses a
step whose torch ops do real work (an op outside a kernel would be missing from the replay): only
allocations and views may run beside the recorded calls.

A capture's end packs its calls for csrc/replay.c, which a replay enters once: its thunks issue every call in order,
the GIL released throughout (~256 calls a step: 0.27-0.51 ms of the caller's CPU less a b1 step, profiles/RESULTS.md's
replay39; ~0.08 ms of it the loop hot, the rest likely the interpreter's memory gone cold between calls). A recording
with a call that is no C function typed as the header declares it (a Python callable, a callback), or without that
library, replays as a Python loop of the calls.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ops.cpu.build import HEADER, CKernel, Prototype, prototypes

KERNEL = CKernel("cpu_replay", "replay.c", ("cpugraph_thunk", "cpugraph_replay"))


class NotCapturable(RuntimeError):
    """The step ran a torch op that computes: it cannot be replayed as recorded C calls."""


class _Slot(ctypes.Union):
    """One argument of a packed call: csrc/replay.c's union slot."""
    _fields_ = [("p", ctypes.c_void_p), ("l", ctypes.c_long), ("i", ctypes.c_int), ("f", ctypes.c_float)]


class _Call(ctypes.Structure):
    """One packed call: csrc/replay.c's struct call."""
    _fields_ = [("thunk", ctypes.c_void_p), ("fn", ctypes.c_void_p), ("args", ctypes.c_void_p)]


_SLOT_MEMBERS = {ctypes.c_void_p: "p", ctypes.c_long: "l", ctypes.c_int: "i", ctypes.c_float: "f"}


@functools.cache
def _header() -> dict[str, Prototype]:
    return prototypes((KERNEL.csrc / HEADER).read_text())


def _thunk(fn: Callable) -> int | None:
    """The address of replay.c's thunk for fn, None where fn is no C function typed as the header declares its name
    (a callback has no name; one typed otherwise would be packed unlike its thunk reads it)."""
    declared = _header().get(getattr(fn, "__name__", None))
    if (not isinstance(fn, ctypes._CFuncPtr) or declared is None
            or (fn.restype, tuple(fn.argtypes or ())) != (declared.restype, tuple(declared.argtypes))):
        return None
    found = ctypes.c_void_p()
    KERNEL.lib.cpugraph_thunk(fn.__name__.encode(), ctypes.byref(found))
    return found.value


class _Packed:
    """A recording's calls as replay.c reads them: `calls`, each pointing into one of the `slots` arrays."""

    def __init__(self, calls: ctypes.Array, slots: list[ctypes.Array]) -> None:
        self.calls = calls
        self.slots = slots

    @classmethod
    def of(cls, recorded: list[tuple[Callable, tuple]]) -> _Packed | None:
        """The packed calls, or None where one is no C function with a thunk (or replay.c did not build)."""
        thunks = [_thunk(fn) for fn, _ in recorded] if KERNEL.ready else [None]
        if None in thunks:
            return None
        slots = (_Slot * sum(len(args) for _, args in recorded))()
        calls = (_Call * len(recorded))()
        offset = 0
        for call, thunk, (fn, args) in zip(calls, thunks, recorded):
            call.thunk, call.fn = thunk, ctypes.cast(fn, ctypes.c_void_p).value
            call.args = ctypes.addressof(slots) + offset * ctypes.sizeof(_Slot)
            for arg in args:
                setattr(slots[offset], _SLOT_MEMBERS[type(arg)], arg.value)
                offset += 1
        return cls(calls, [slots])

    def __add__(self, other: _Packed) -> _Packed:
        return _Packed((_Call * (len(self.calls) + len(other.calls)))(*self.calls, *other.calls),
                       self.slots + other.slots)


class Recording:
    """The C calls of one captured step, in order, and the tensors they address; `packed` once pack() ran (at the
    end of its capture) where every call is a C function of the header."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, tuple]] = []
        self.tensors: list[torch.Tensor] = []
        self.packed: _Packed | None = None

    def pack(self) -> None:
        """Packs the calls for replay.c, where its library built (ops.cpu.kernels builds it with the kernels)."""
        self.packed = _Packed.of(self.calls)

    def replay(self) -> None:
        if self.packed is not None:
            failed = KERNEL.lib.cpugraph_replay(self.packed.calls, len(self.packed.calls))
            if failed >= 0:
                _failed(self.calls[failed][0])
            return
        for fn, args in self.calls:  # the check inline: a replay is the decode step, one frame a call less
            if fn(*args):
                _failed(fn)

    def __add__(self, other: Recording) -> Recording:
        """This recording's calls, then other's."""
        joined = Recording()
        joined.calls = self.calls + other.calls
        joined.tensors = self.tensors + other.tensors
        if self.packed is not None and other.packed is not None:
            joined.packed = self.packed + other.packed
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
        recording.pack()
    finally:
        _capturing.recording = None
