"""The Triton kernels through a real `gunicorn -k gevent server:app` (under TRITON_INTERPRET=1 without a
GPU, which conftest sets and the server inherits): the official openai client gets transformers' greedy
tokens, fp32, for a batch of prompts."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch

from chat_http import MODEL, cpu_env
from engine_util import hf_greedy
from nanoqwen import loader
from server_process import GunicornServer

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
    with GunicornServer(env, tmp_path / "server.log") as srv:
        assert " kernels=triton " in srv.log()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=600)
        completion = client.completions.create(
            model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=NEW_TOKENS,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
    tokenizer = loader.load_tokenizer(tiny_checkpoint)
    hf = hf_model(tiny_checkpoint)
    expected = [tokenizer.decode(hf_greedy(hf, p, NEW_TOKENS), skip_special_tokens=False) for p in PROMPTS]
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == expected
