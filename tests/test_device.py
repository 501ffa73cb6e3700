"""The engine binds its CUDA device to the thread that loads and steps it: Triton launches and
CUDA-graph capture/replay follow the current device, not the tensors' (NANOQWEN_DEVICE=cuda:1)."""
from __future__ import annotations

import pytest
import torch

import nanoqwen.engine.loading as loading_module
from engine_util import load_engine
from nanoqwen.config import bind_device


@pytest.fixture
def set_device_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    return calls


def test_an_indexed_cuda_device_becomes_current(set_device_calls):
    assert bind_device(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert set_device_calls == [1]


def test_plain_cuda_names_the_current_device(set_device_calls):
    assert bind_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert set_device_calls == [3]


def test_other_devices_are_left_alone(set_device_calls):
    assert bind_device(torch.device("cpu")) == torch.device("cpu")
    assert set_device_calls == []


def test_engine_load_binds_its_device(tiny_checkpoint, monkeypatch):
    bound: list[torch.device] = []

    def record(device: torch.device) -> torch.device:
        bound.append(device)
        return bind_device(device)

    monkeypatch.setattr(loading_module, "bind_device", record)
    engine = load_engine(tiny_checkpoint)
    assert bound == [torch.device("cpu")] and engine.info()["device"] == "cpu"
