"""The Triton kernels through a real `gunicorn -k gevent server:app` (under TRITON_INTERPRET=1 without a
GPU, which conftest sets and the server inherits): the official openai client gets transformers' greedy
tokens, fp32, for a batch of prompts, with the decode linears by cuBLAS (the CPU's torch), by Triton's GEMV, and int8
(its GEMV) against the same int8 model in transformers."""
from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from chat_http import assert_serves_greedy, cpu_env
from quant_reference import load_quantised_hf_model

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1013))]
NEW_TOKENS = 4


# The decode linears (2 rows) by cuBLAS's stand-in, by the Triton GEMV (NANOQWEN_FLOAT_GEMV), and int8 by the
# GEMV (the quantised formats' linear at decode sizes), against the same quantised model in transformers.
MODES = {
    "default": ({}, (" kernels=triton ", " float_gemv=False ")),
    "float-gemv": ({"NANOQWEN_FLOAT_GEMV": "1"}, (" kernels=triton ", " float_gemv=True ")),
    "int8-gemv": ({"NANOQWEN_QUANT": "int8"}, (" kernels=triton ", " quant=int8 ")),
}


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", MODES)
def test_triton_kernels_serve_transformers_greedy_tokens(
    mode: str, tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    settings, markers = MODES[mode]
    env = cpu_env(tiny_checkpoint, NANOQWEN_KERNELS="triton", NANOQWEN_MAX_BATCH="2", **settings)
    reference = hf_model if mode != "int8-gemv" else partial(load_quantised_hf_model, quant="int8")
    assert_serves_greedy(tiny_checkpoint, reference, env, tmp_path / "server.log", markers, [PROMPTS], NEW_TOKENS)
