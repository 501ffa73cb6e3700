"""`POST /v1/completions` through `gunicorn -k gevent server:app`, the `openai` client and raw requests."""
from __future__ import annotations

import random
from typing import Any

import openai
import pytest
import requests
import torch
from transformers import AutoTokenizer

from chat_http import CHAT_SERVER_MAX_MODEL_LEN, MODEL, completion_texts
from checkpoints import load_hf_model, make_checkpoint
from engine_util import hf_greedy, odd_text, shared_tokenizer
from server_process import GunicornServer

PROMPT = "Once upon a time, a small robot"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


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


def test_penalised_tokens_are_the_torch_penalties_paths(server: GunicornServer, client: openai.OpenAI,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Penalised requests (greedy: a repetition penalty on a prompt that repeats, presence and frequency penalties on
    outputs that repeat without them; seeded: all three), streamed and
    not, give the tokens of an fp32 engine here that applies the penalties as torch ops before sampling (the path
    before the CPU sampler applied them itself)."""
    from engine_util import generate_together, load_engine
    from nanoqwen.engine import SamplingParams
    from nanoqwen.runner import runner
    from sampler_util import sample_with_torch_penalties

    prompts = [[7] * 17, [42, 43] * 8]
    settings = [{"temperature": 0.0, "repetition_penalty": 1.8}, {"temperature": 0.0, "presence_penalty": 1.5,
                                                                  "frequency_penalty": 0.5},
                {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "min_p": 0.0, "seed": 3, "presence_penalty": 1.0,
                 "frequency_penalty": 0.7, "repetition_penalty": 1.2}]

    monkeypatch.setattr(runner, "sample", sample_with_torch_penalties)
    engine = load_engine(make_checkpoint(), max_model_len=CHAT_SERVER_MAX_MODEL_LEN)  # eager: the replay's logits
    tokenizer = engine.tokenizer
    for fields in settings:
        params = SamplingParams(**fields, max_tokens=12, ignore_eos=True)
        expected = [tokenizer.decode(t, skip_special_tokens=False)
                    for t in generate_together(engine, prompts, [params] * len(prompts))]
        body = {"model": MODEL, "prompt": prompts, "max_tokens": 12,
                "extra_body": {"ignore_eos": True, "skip_special_tokens": False, **fields}}
        for stream in (False, True):
            assert completion_texts(server, body, stream) == expected, (fields, stream)


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


def _stopped(client: openai.OpenAI, ids: list[int], stream: bool, **stop: Any) -> tuple[str, str, list[float], int]:
    """(text, finish_reason, token logprobs, completion tokens) of one greedy answer ended by `stop` (EOS ignored, as
    hf_greedy does)."""
    body = {"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": 24, "logprobs": 0}
    if not stream:
        answer = client.completions.create(**body, extra_body={**stop, "ignore_eos": True})
        (choice,) = answer.choices
        return choice.text, choice.finish_reason, choice.logprobs.token_logprobs, answer.usage.completion_tokens
    chunks = list(client.completions.create(**body, extra_body={**stop, "ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    return ("".join(c.text for c in choices), choices[-1].finish_reason,
            [v for c in choices if c.logprobs for v in c.logprobs.token_logprobs], chunks[-1].usage.completion_tokens)


def test_stops_cut_transformers_answer_at_the_token_completing_them(server: GunicornServer,
                                                                    client: openai.OpenAI) -> None:
    """A stop string made of the end of one token's text and the start of the next one's, and a plain (not special)
    token in stop_token_ids, streamed and not: transformers' greedy text cut before the stop, finish_reason "stop", the
    usage counting the tokens through the one completing the stop, and a logprob (transformers' value) for each of
    those but the ones whose text the stop string cut away whole (the token completing it: llama.cpp's, not vLLM's)."""
    ids = _ids(server, PROMPT)
    tokens = hf_greedy(load_hf_model(make_checkpoint()), ids, 24)
    tokenizer = shared_tokenizer(make_checkpoint())
    text = tokenizer.decode(tokens)
    rows = _reference(ids + tokens)[len(ids) - 1:-1]  # [len(tokens), V]: each answer token's position
    reference = [row[t].item() for row, t in zip(rows, tokens, strict=True)]
    # the first k whose last character and the next token's first form a string not seen before in the text
    k, stop = next((k, text[len(head) - 1:len(head) + 1]) for k in range(2, len(tokens) - 1)
                   if (head := tokenizer.decode(tokens[:k + 1])) and text.startswith(head)
                   and text.find(text[len(head) - 1:len(head) + 1]) == len(head) - 1
                   and "\ufffd" not in text[:len(head) + 1])
    j = next(j for j in range(k + 3, len(tokens)) if tokens[j] not in tokens[:j])  # the stop id ends it later
    cases = [({"stop": [stop]}, text[:text.index(stop)], k + 2, k + 1),
             ({"stop_token_ids": [tokens[j]]}, tokenizer.decode(tokens[:j]), j + 1, j + 1)]
    for stop_field, expected, count, listed in cases:
        for stream in (False, True):
            got_text, finish, logprobs, completion_tokens = _stopped(client, ids, stream, **stop_field)
            assert (got_text, finish, completion_tokens) == (expected, "stop", count), (stop_field, stream)
            assert logprobs == pytest.approx(reference[:listed], abs=1e-4), (stop_field, stream)


def _reference(prompt: list[int]) -> torch.Tensor:
    """transformers' log_softmax after each prompt position: [len(prompt), V]."""
    with torch.no_grad():
        return load_hf_model(make_checkpoint())(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def _check_prompt_logprobs(lp: Any, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    """The first len(prompt) entries of legacy logprobs against transformers'."""
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        top = lp.top_logprobs[i]
        assert top[lp.tokens[i]] == lp.token_logprobs[i]
        # the prompt token and the top k (fewer keys when they coincide or two ids share a piece)
        assert len(top) <= k + 1
        if k:
            assert sorted(top.values(), reverse=True)[:k] == pytest.approx(ref[i - 1].topk(k).values.tolist(),
                                                                           abs=1e-4)


def test_echo_with_logprobs_scores_the_prompt(server: GunicornServer, client: openai.OpenAI) -> None:
    ids = _ids(server, PROMPT)
    ref = _reference(ids)
    for prompt in (PROMPT, ids):
        answer = client.completions.create(prompt=prompt, echo=True, logprobs=2, **GREEDY)
        (choice,) = answer.choices
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 6
        _check_prompt_logprobs(lp, ids, ref, 2)
        assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        # the answer's first token follows on from the prompt's: transformers' greedy choice
        assert lp.token_logprobs[len(ids)] == pytest.approx(ref[-1].max().item(), abs=1e-4)
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 6
        assert "prompt_logprobs" not in choice.model_extra  # vLLM's field, sent here only when asked for


def test_echo_with_max_tokens_zero_is_the_prompt_alone(server: GunicornServer, client: openai.OpenAI) -> None:
    ids = _ids(server, PROMPT)
    answer = client.completions.create(prompt=ids, echo=True, logprobs=0, **{**GREEDY, "max_tokens": 0})
    (choice,) = answer.choices
    assert choice.text == PROMPT and choice.finish_reason == "length" and answer.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(ids) and all(top is None or len(top) == 1
                                                           for top in choice.logprobs.top_logprobs)
    _check_prompt_logprobs(choice.logprobs, ids, _reference(ids), 0)
    plain = client.completions.create(prompt=PROMPT, echo=True, **{**GREEDY, "max_tokens": 0})
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None
    streamed = list(client.completions.create(prompt=ids, echo=True, logprobs=0, stream=True,
                                              **{**GREEDY, "max_tokens": 0}))
    assert "".join(c.choices[0].text for c in streamed) == PROMPT
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        choice.logprobs.token_logprobs


def test_echo_with_max_tokens_zero_scores_a_prompt_filling_the_context(server: GunicornServer) -> None:
    """Scoring the prompt alone needs no room for an answer: a prompt of the whole context is scored (it was refused
    as needing one token more), one token more is the 400."""
    ids = list(range(1000, 1000 + CHAT_SERVER_MAX_MODEL_LEN))
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    answer = _post(server, body)
    assert answer.status_code == 200, answer.text
    logprobs = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():  # the prompt's tokens' log-softmax only: not [1024, V] twice
        logits = load_hf_model(make_checkpoint())(torch.tensor([ids])).logits[0, :-1].float()
        want = logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0] - logits.logsumexp(-1)
    assert logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    over = _post(server, {**body, "prompt": [*ids, 7]})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"


def test_loglikelihood_as_lm_eval_computes_it(server: GunicornServer) -> None:
    """lm-eval-harness `local-completions`: context + continuation as token ids, echo, max_tokens 1,
    logprobs 1; the sum of token_logprobs[ctxlen:-1], and whether each is the top one."""
    from engine_util import hf_greedy

    hf = load_hf_model(make_checkpoint())
    context = _ids(server, "Question: what is the capital of France? Answer:")
    continuations = [hf_greedy(hf, context, 4), _ids(server, " Paris, of course")]
    body = {"model": MODEL, "prompt": [context + c for c in continuations], "max_tokens": 1, "logprobs": 1,
            "echo": True, "temperature": 0, "seed": 1234}
    choices = _post(server, body).json()["choices"]
    for choice, continuation in zip(choices, continuations):
        logprobs = choice["logprobs"]["token_logprobs"][len(context):-1]
        tops = choice["logprobs"]["top_logprobs"][len(context):-1]
        is_greedy = all(lp == max(top.values()) for lp, top in zip(logprobs, tops))
        ref = _reference(context + continuation)[len(context) - 1 : -1]
        expected = ref.gather(1, torch.tensor(continuation)[:, None]).sum().item()
        assert sum(logprobs) == pytest.approx(expected, abs=1e-3)
        assert is_greedy == (ref.argmax(-1).tolist() == continuation)
    first = choices[0]["logprobs"]  # the first continuation is transformers' greedy one
    assert all(lp == max(top.values()) for lp, top in zip(first["token_logprobs"][len(context):-1],
                                                          first["top_logprobs"][len(context):-1]))


def test_echo_with_logprobs_streams_as_a_whole(server: GunicornServer, client: openai.OpenAI) -> None:
    prompts = [PROMPT, "The capital of France"]
    whole = client.completions.create(prompt=prompts, echo=True, logprobs=1, n=2, **GREEDY)
    chunks = list(client.completions.create(prompt=prompts, echo=True, logprobs=1, n=2, stream=True, **GREEDY))
    texts, fields = [""] * 4, [{"tokens": [], "token_logprobs": [], "text_offset": []} for _ in range(4)]
    for chunk in chunks:
        (choice,) = chunk.choices
        if not texts[choice.index]:  # a choice's first chunk: the echo and the answer's first token
            assert choice.text.startswith(prompts[choice.index // 2]) and choice.logprobs.token_logprobs[0] is None
        texts[choice.index] += choice.text
        for name, values in fields[choice.index].items():
            values += getattr(choice.logprobs, name) if choice.logprobs else []
    assert texts == [c.text for c in whole.choices]
    for got, choice in zip(fields, whole.choices):  # logprobs to rounding: the batches' packing differs
        assert got["tokens"] == choice.logprobs.tokens and got["text_offset"] == choice.logprobs.text_offset
        assert got["token_logprobs"][0] is None and choice.logprobs.token_logprobs[0] is None
        assert got["token_logprobs"][1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-4)


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": PROMPT, "suffix": "The end."}, "suffix", "unsupported_parameter"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens", None),
    ({"prompt": PROMPT, "echo": True, "max_tokens": -1}, "max_tokens", None),
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
    ({"prompt": "word " * (CHAT_SERVER_MAX_MODEL_LEN + 1)}, "prompt", "context_length_exceeded"),
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


def test_long_prompts_are_tokenised_as_the_tokenizer_does(server: GunicornServer) -> None:
    """A prompt past a piece's 64 KiB (encoded in pieces cut between words, nanoqwen/engine/pieces.py) gets the ids
    the tokenizer gets for it whole, through /tokenize and as a completion's prompt (the 400's count, first of two)."""
    texts = ["w " * 40000, odd_text(random.Random(2), 60000)]
    tokenizer = AutoTokenizer.from_pretrained(str(make_checkpoint()))
    for text in texts:
        assert _ids(server, text) == tokenizer(text)["input_ids"]
    response = _post(server, {"prompt": [PROMPT, *texts[::-1]], "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    assert f"({len(tokenizer(texts[1])['input_ids'])} in the prompt" in response.json()["error"]["message"]


def test_openapi_json(server: GunicornServer) -> None:
    doc = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(doc["paths"])
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert completion["required"] == ["prompt"] and completion["properties"]["max_tokens"]["default"] == 16
