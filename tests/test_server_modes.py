"""Chunked prefill through a real `gunicorn -k gevent server:app`: with a 5-token step budget, prompts
split across steps beside decode rows, the official openai client gets transformers' greedy tokens."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chat_http import assert_serves_greedy, cpu_env

pytestmark = pytest.mark.slow

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1037)), [151644, 872, 198]]
NEW_TOKENS = 8


def test_chunked_prefill_serves_transformers_greedy_tokens(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    env = cpu_env(tiny_checkpoint, NANOQWEN_MAX_BATCH="4", NANOQWEN_MAX_STEP_TOKENS="5")
    assert_serves_greedy(tiny_checkpoint, hf_model, env, tmp_path / "server.log",
                         " max_step_tokens=5 ", PROMPTS, NEW_TOKENS)
