"""NANOQWEN_QUANT=int8|int4 through a real `gunicorn -k gevent server:app`: /health names the weight
format and greedy completions are the torch reference's tokens for the same quantised model."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from chat_http import MODEL, cpu_env
from checkpoints import make_checkpoint
from engine_util import hf_greedy
from nanoqwen import loader
from quant_reference import load_quantised_hf_model
from server_process import GunicornServer

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1019))]


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
    tokenizer = loader.load_tokenizer(checkpoint)
    body = {"model": MODEL, "prompt": PROMPTS, "temperature": 0, "max_tokens": 6, "ignore_eos": True,
            "skip_special_tokens": False}
    response = requests.post(f"{server.url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    texts = [choice["text"] for choice in sorted(response.json()["choices"], key=lambda c: c["index"])]
    assert texts == [tokenizer.decode(hf_greedy(hf, prompt, 6), skip_special_tokens=False) for prompt in PROMPTS]
