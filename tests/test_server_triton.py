"""The Triton kernels through a real `gunicorn -k gevent server:app` (under TRITON_INTERPRET=1 without a
GPU, which conftest sets and the server inherits): the official openai client gets transformers' greedy
tokens, fp32, for a batch of prompts."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chat_http import assert_serves_greedy, cpu_env

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1013))]
NEW_TOKENS = 4


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1")
def test_triton_kernels_serve_transformers_greedy_tokens(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    env = cpu_env(tiny_checkpoint, NANOQWEN_KERNELS="triton", NANOQWEN_MAX_BATCH="2")
    assert_serves_greedy(tiny_checkpoint, hf_model, env, tmp_path / "server.log",
                         (" kernels=triton ",), [PROMPTS], NEW_TOKENS)
