"""Which device (or CPU cores) each gunicorn worker of a `--workers N` server gets.

The arbiter numbers workers by slot 0..N-1; a respawned worker takes the lowest slot no live worker
holds, so it lands on the device its dead predecessor used.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence

SLOT_ENV = "NANOQWEN_WORKER_SLOT"


def lowest_free_slot(taken: Collection[int]) -> int:
    slot = 0
    while slot in taken:
        slot += 1
    return slot


def cpu_share(cpus: Sequence[int], slot: int, workers: int) -> list[int]:
    """Slot's contiguous share of `cpus`; with more workers than CPUs, workers share single CPUs."""
    cpus = sorted(cpus)
    slot %= workers  # after a TTOU the live workers may hold the higher slots
    if workers >= len(cpus):
        return [cpus[slot % len(cpus)]]
    per, extra = divmod(len(cpus), workers)
    start = slot * per + min(slot, extra)
    return cpus[start:start + per + (slot < extra)]


def worker_device(requested: str, slot: int, cuda_devices: int) -> str:
    """`auto`/`cuda` with CUDA devices present: cuda:<slot>, round-robin; any other choice stays as it is."""
    if requested in ("auto", "cuda") and cuda_devices > 0:
        return f"cuda:{slot % cuda_devices}"
    return requested


def place_worker(slot: int, workers: int, requested: str) -> tuple[str, str]:
    """In the freshly forked worker: its device, and on the CPU its cores; returns (device, description).

    Threads started later (the engine's, torch's pool) inherit the affinity mask, and torch's thread
    count defaults to its size (nanoqwen.config.resolve_threads).
    """
    import torch

    device = worker_device(requested, slot, torch.cuda.device_count())
    if device.startswith("cuda") or workers == 1:
        return device, device
    cores = cpu_share(os.sched_getaffinity(0), slot, workers)
    os.sched_setaffinity(0, cores)
    return device, f"{device} on cores {','.join(map(str, cores))}"
