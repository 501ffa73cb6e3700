"""NANOQWEN_GRAPH=cpugraph through a real `gunicorn -k gevent server:app`: the replayed decode steps
serve the official openai client transformers' greedy tokens, a batch of different lengths at once."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chat_http import assert_serves_greedy, cpu_env
from ops.cpu import build as cpu_build

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")]

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1037)), [151644, 872, 198]]
NEW_TOKENS = 8


def test_cpu_graph_serves_transformers_greedy_tokens(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    env = cpu_env(tiny_checkpoint, NANOQWEN_GRAPH="cpugraph", NANOQWEN_MAX_BATCH="4")
    assert_serves_greedy(tiny_checkpoint, hf_model, env, tmp_path / "server.log", " graph=cpugraph ",
                         PROMPTS, NEW_TOKENS)
