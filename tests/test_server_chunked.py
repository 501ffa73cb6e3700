"""Chunked prefill through a real `gunicorn -k gevent server:app`: with a 5-token step budget, prompts
split across steps beside decode rows, the official openai client gets transformers' greedy tokens."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch

from chat_http import MODEL, cpu_env
from engine_util import hf_greedy
from nanoqwen import loader
from server_process import GunicornServer

pytestmark = pytest.mark.slow

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1037)), [151644, 872, 198]]
NEW_TOKENS = 8


def test_chunked_prefill_serves_transformers_greedy_tokens(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    env = cpu_env(tiny_checkpoint, NANOQWEN_MAX_BATCH="4", NANOQWEN_MAX_STEP_TOKENS="5")
    with GunicornServer(env, tmp_path / "server.log") as srv:
        assert " max_step_tokens=5 " in srv.log()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=600)
        completion = client.completions.create(
            model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=NEW_TOKENS,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
    tokenizer = loader.load_tokenizer(tiny_checkpoint)
    hf = hf_model(tiny_checkpoint)
    expected = [tokenizer.decode(hf_greedy(hf, p, NEW_TOKENS), skip_special_tokens=False) for p in PROMPTS]
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == expected
