"""`POST /v1/completions` through `gunicorn -k gevent server:app`, the `openai` client and raw requests."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from chat_http import MODEL, cpu_env
from checkpoints import make_checkpoint
from server_process import GunicornServer

MAX_MODEL_LEN = 256
PROMPT = "Once upon a time, a small robot"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN=str(MAX_MODEL_LEN))
    srv = GunicornServer(env, tmp_path_factory.mktemp("completions") / "gunicorn.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: GunicornServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(srv: GunicornServer, body: Any, path: str = "/v1/completions", **kwargs: Any) -> requests.Response:
    return requests.post(f"{srv.url}{path}", json=body, timeout=120, **kwargs)


def _ids(srv: GunicornServer, prompt: str) -> list[int]:
    return _post(srv, {"prompt": prompt}, "/tokenize").json()["tokens"]


def test_text_and_token_prompts(server: GunicornServer, client: openai.OpenAI) -> None:
    answer = client.completions.create(prompt=PROMPT, **GREEDY)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == MODEL
    (choice,) = answer.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text and choice.logprobs is None
    ids = _ids(server, PROMPT)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 6)
    by_ids = client.completions.create(prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == choice.text
    # OpenAI's default max_tokens is 16
    default = _post(server, {"prompt": PROMPT, "temperature": 0, "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 16 and default["choices"][0]["text"].startswith(choice.text)


def test_batched_prompts_and_n(server: GunicornServer, client: openai.OpenAI) -> None:
    prompts = [PROMPT, "The capital of France"]
    single = [client.completions.create(prompt=p, **GREEDY) for p in prompts]
    for batch in (prompts, [_ids(server, p) for p in prompts]):
        answer = client.completions.create(prompt=batch, n=2, **GREEDY)
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        assert [c.text for c in answer.choices] == [s.choices[0].text for s in single for _ in range(2)]
        assert answer.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
        assert answer.usage.completion_tokens == 4 * 6


def test_stream_equals_non_stream(server: GunicornServer, client: openai.OpenAI) -> None:
    prompts = [PROMPT, "The capital of France"]
    whole = client.completions.create(prompt=prompts, echo=True, **GREEDY)
    assert whole.choices[0].text.startswith(PROMPT) and whole.choices[1].text.startswith("The capital of France")
    chunks = list(client.completions.create(prompt=prompts, echo=True, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.id == chunks[0].id
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices] and reasons == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_logprobs(server: GunicornServer, client: openai.OpenAI) -> None:
    answer = client.completions.create(prompt=PROMPT, logprobs=2, **GREEDY)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == answer.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == logprob and logprob <= 0
        assert max(top.values()) == logprob  # greedy: the sampled token is the likeliest
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    streamed = list(client.completions.create(prompt=PROMPT, logprobs=2, stream=True, **GREEDY))
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    offsets = [o for c in streamed for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens and offsets == lp.text_offset


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": PROMPT, "suffix": "The end."}, "suffix", "unsupported_parameter"),
    ({"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo", "unsupported_parameter"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": PROMPT, "logit_bias": {"5": -101}}, "logit_bias.5", None),
    ({"prompt": PROMPT, "logprobs": 6}, "logprobs", None),
    ({"prompt": PROMPT, "logprobs": True}, "logprobs", None),
    ({"prompt": PROMPT, "max_tokens": "5"}, "max_tokens", None),
    ({"prompt": [1, "a"]}, "prompt", None),
    ({"prompt": [[]]}, "prompt", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": PROMPT, "messages": []}, "messages", None),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options", None),
    ({"prompt": [PROMPT] * 65, "n": 2}, "prompt", None),
    ({"prompt": "word " * 300}, "prompt", "context_length_exceeded"),
    ({}, "prompt", None),
])
def test_bad_requests(server: GunicornServer, body: dict[str, Any], param: str, code: str | None) -> None:
    response = _post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code, error


def test_bad_token_ids_and_unknown_model(server: GunicornServer) -> None:
    response = _post(server, {"prompt": [1, 10**9]})
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]
    missing = _post(server, {"model": "gpt-3.5-turbo-instruct", "prompt": PROMPT})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_openapi_json(server: GunicornServer) -> None:
    doc = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(doc["paths"])
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert completion["required"] == ["prompt"] and completion["properties"]["max_tokens"]["default"] == 16
