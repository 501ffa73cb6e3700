"""NANOQWEN_QUANT=int8|int4 through a real `gunicorn -k gevent server:app`: /health names the weight
format and greedy completions (the openai client) are the torch reference's tokens for the same
quantised model."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from chat_http import assert_completions_greedy, cpu_env
from checkpoints import make_checkpoint
from quant_reference import load_quantised_hf_model
from server_process import GunicornServer

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1019)), [151644, 872, 198]]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return make_checkpoint()


@pytest.fixture(scope="module", params=["int8", "int4"])
def quant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(checkpoint: Path, quant: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    log = tmp_path_factory.mktemp("quant") / "server.log"
    with GunicornServer(cpu_env(checkpoint, NANOQWEN_QUANT=quant), log) as srv:
        yield srv


def test_health_and_ready_line_name_the_quantisation(server: GunicornServer, quant: str) -> None:
    assert requests.get(f"{server.url}/health", timeout=10).json()["model_info"]["quant"] == quant
    assert f" quant={quant} " in server.log()


def test_greedy_completions_are_the_reference_tokens(server: GunicornServer, checkpoint: Path, quant: str) -> None:
    hf = load_quantised_hf_model(checkpoint, quant)
    # one prompt alone and three at once: the C linears' one-row (VNNI) and several-row (AMX) paths both serve
    assert_completions_greedy(server, checkpoint, hf, PROMPTS[:1], 6)
    assert_completions_greedy(server, checkpoint, hf, PROMPTS, 6)
    # 40 prompt tokens: the prefill's linears take 33+ rows, dequant.py's blocked GEMM
    assert_completions_greedy(server, checkpoint, hf, [list(range(2000, 2040))], 6)
