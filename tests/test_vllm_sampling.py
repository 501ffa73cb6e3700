"""vLLM's sampling extras `min_tokens` and `allowed_token_ids`, sent through the openai client's
`extra_body` to a real `gunicorn -k gevent server:app` (the tiny random checkpoint, fp32), and
OpenAI's full usage objects."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import requests
import torch

from chat_http import MODEL
from checkpoints import ENDOFTEXT_ID, EOS_IDS, VOCAB_SIZE
from nanoqwen.sampler import token_bitmask
from nanoqwen.text import StopMatcher
from server_process import GunicornServer

END_NOW = {str(t): 100 for t in EOS_IDS}  # a control that ends every choice at its first token
NO_EOS = {str(t): -100 for t in EOS_IDS}
MESSAGES = [{"role": "user", "content": "What is the best book?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
PROMPT = "The best book is"
SAMPLED = {"temperature": 1.0, "seed": 5}
GREEDY = {"temperature": 0}


@dataclass
class Answer:
    """Each choice's text and finish reason, and the usage, collected from either endpoint, streamed or not."""

    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    usage: Any = None


def _ask(client: openai.OpenAI, endpoint: str, stream: bool, n: int = 1, **body: Any) -> Answer:
    """One request; `body`'s keys beyond the openai method's arguments go in `extra_body`."""
    known = {"max_tokens", "temperature", "seed", "stop", "logit_bias", "response_format"}
    kwargs = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=n, stream=stream,
                                             extra_body={**NO_THINKING, **extra}, **kwargs)
    else:
        out = client.completions.create(model=MODEL, prompt=PROMPT, n=n, stream=stream, extra_body=extra, **kwargs)
    answer = Answer([""] * n, [None] * n)
    for chunk in out if stream else [out]:
        for choice in chunk.choices:
            if endpoint == "chat":
                answer.texts[choice.index] += (choice.delta if stream else choice.message).content or ""
            else:
                answer.texts[choice.index] += choice.text
            answer.finish_reasons[choice.index] = choice.finish_reason or answer.finish_reasons[choice.index]
        answer.usage = chunk.usage or answer.usage
    return answer


@pytest.mark.parametrize(("endpoint", "stream", "n"), [("chat", False, 1), ("chat", True, 2),
                                                       ("completions", False, 2), ("completions", True, 1)])
def test_min_tokens_forces_the_output_past_eos(client: openai.OpenAI, endpoint: str, stream: bool, n: int) -> None:
    """A +100 bias on EOS ends every choice at once; min_tokens 4 keeps EOS out for four tokens (the
    ones sampled with EOS banned), then the bias ends it."""
    sampling = GREEDY if n == 1 else SAMPLED
    control = _ask(client, endpoint, stream, n, max_tokens=10, logit_bias=END_NOW, **sampling)
    assert control.usage.completion_tokens == n and control.finish_reasons == ["stop"] * n
    forced = _ask(client, endpoint, stream, n, max_tokens=10, logit_bias=END_NOW, min_tokens=4, **sampling)
    assert forced.usage.completion_tokens == 5 * n and forced.finish_reasons == ["stop"] * n
    banned = _ask(client, endpoint, stream, n, max_tokens=4, logit_bias=NO_EOS, **sampling)
    assert forced.texts == banned.texts and all(banned.texts)


def _tokens(client: openai.OpenAI, **body: Any) -> tuple[str, list[str]]:
    """The completion's text and its tokens' text pieces."""
    choice = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=0, **body).choices[0]
    return choice.text, choice.logprobs.tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cannot_end_in_the_first_min_tokens(client: openai.OpenAI, stream: bool) -> None:
    """vLLM's StopChecker: a stop string is looked for from the token after the first min_tokens on."""
    body = {"max_tokens": 8, **SAMPLED}
    text, pieces = _tokens(client, **body)
    # a stop string that occurs once, in token k's text alone
    k = next(k for k in range(1, 6) if pieces[k].strip() and "\ufffd" not in pieces[k]
             and text.count(pieces[k]) == 1 and text.find(pieces[k]) == len("".join(pieces[:k])))
    cut = _ask(client, "completions", stream, stop=[pieces[k]], min_tokens=k, **body)
    assert cut.texts == ["".join(pieces[:k])] and cut.finish_reasons == ["stop"]
    assert cut.usage.completion_tokens == k + 1
    ignored = _ask(client, "completions", stream, stop=[pieces[k]], min_tokens=k + 1, **body)
    assert ignored.texts == [text] and ignored.finish_reasons == ["length"]


def _token_ids(server: GunicornServer, text: str) -> list[int]:
    response = requests.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


@pytest.mark.parametrize(("endpoint", "stream"), [("chat", False), ("chat", True), ("completions", False),
                                                  ("completions", True)])
def test_allowed_token_ids_restrict_every_token(server: GunicornServer, client: openai.OpenAI, endpoint: str,
                                                stream: bool) -> None:
    allowed = [_token_ids(server, c)[0] for c in "xyz"]
    answer = _ask(client, endpoint, stream, 2, max_tokens=12, allowed_token_ids=allowed, **SAMPLED)
    # no EOS among them: every choice runs to max_tokens, one allowed character per token
    assert answer.finish_reasons == ["length"] * 2 and answer.usage.completion_tokens == 24
    assert [len(t) for t in answer.texts] == [12, 12] and set("".join(answer.texts)) <= set("xyz")
    assert len(set("".join(answer.texts))) > 1  # sampled among them, not one forced token


def test_allowed_token_ids_hold_for_every_prompt_of_a_batched_completion(server: GunicornServer,
                                                                         client: openai.OpenAI) -> None:
    """The engine builds the mask once for the prompts' shared params: each prompt's choices keep to it."""
    allowed = [_token_ids(server, c)[0] for c in "xy"]
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time", "1, 2, 3"], max_tokens=6,
                                    extra_body={"allowed_token_ids": allowed}, **SAMPLED)
    assert sorted(choice.index for choice in out.choices) == [0, 1, 2]
    assert all(len(choice.text) == 6 and set(choice.text) <= set("xy") for choice in out.choices)


def test_a_temperature_below_1e_5_is_greedy(server: GunicornServer) -> None:
    """A temperature under 1e-5 is greedy (README: vLLM samples it at 0.01 instead). The runner-up token is lifted
    to 1e-5 under the likeliest one (by their logprobs' gap): far above the logits' differences between batch shapes
    (~1e-6), so greedy always takes the likeliest, but a draw at 1e-5 takes the runner-up about one time in four.
    Every choice of `temperature: 1e-6` takes the greedy token."""
    prompt = _token_ids(server, PROMPT)
    body = {"model": MODEL, "max_tokens": 1, **GREEDY}
    # the next token's distribution as the prompt logprobs of one more position, keyed by id with ranks
    scored = requests.post(f"{server.url}/v1/completions", json={**body, "prompt": [*prompt, 0], "prompt_logprobs": 2},
                           timeout=120).json()["choices"][0]["prompt_logprobs"][-1]
    (_, best), (second, runner_up) = sorted(
        ((int(t), e["logprob"]) for t, e in scored.items() if e["rank"] <= 2), key=lambda entry: -entry[1])
    tied = {**body, "prompt": prompt, "logprobs": 0, "logit_bias": {str(second): best - runner_up - 1e-5}}

    client = server.openai_client()

    def picks(**sampling: Any) -> list[tuple[str, float]]:
        out = client.completions.create(**{**tied, **sampling})
        return [(c.text, c.logprobs.token_logprobs[0]) for c in out.choices]

    [(greedy, logprob)] = picks()
    assert logprob == pytest.approx(best, abs=5e-6)  # half the lifted gap: logprobs move ~1e-6 between batch shapes
    draws = picks(temperature=1e-6, seed=1, n=8) + picks(temperature=1e-6, seed=2, n=8)
    assert [text for text, _ in draws] == [greedy] * 16
    assert all(draw == pytest.approx(logprob, abs=5e-6) for _, draw in draws)


def test_token_bitmask_sets_exactly_the_given_bits() -> None:
    ids = [0, 1, 31, 32, 33, 100, 151935]
    words = token_bitmask(ids, VOCAB_SIZE)  # int32 [ceil(V / 32)]: bit t % 32 of word t // 32
    assert words.shape == (4748,) and words.dtype == torch.int32
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert bits.flatten().nonzero().flatten().tolist() == ids


def test_allowed_token_ids_logprobs_name_only_allowed_tokens(server: GunicornServer, client: openai.OpenAI) -> None:
    allowed = [_token_ids(server, c)[0] for c in "ab"]
    choice = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True,
                                            extra_body={**NO_THINKING, "allowed_token_ids": allowed},
                                            **SAMPLED).choices[0]
    assert {lp.token for lp in choice.logprobs.content} <= {"a", "b"} and len(choice.logprobs.content) == 6


def test_min_tokens_never_leaves_a_row_nothing_to_sample(client: openai.OpenAI) -> None:
    """When a row's mask allows only stop ids (allowed_token_ids of EOS alone, a grammar that can only
    end), min_tokens does not ban them: the choice ends."""
    answer = _ask(client, "completions", False, max_tokens=8, allowed_token_ids=[ENDOFTEXT_ID], min_tokens=5, **GREEDY)
    assert answer.finish_reasons == ["stop"] and answer.usage.completion_tokens == 1


def _json_answer(client: openai.OpenAI, schema: dict[str, Any], **body: Any) -> tuple[Any, Answer]:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    answer = _ask(client, "chat", False, max_tokens=20, response_format=response_format, **GREEDY, **body)
    return json.loads(answer.texts[0]), answer


def test_min_tokens_with_a_grammar(server: GunicornServer, client: openai.OpenAI) -> None:
    """While the grammar may go on, min_tokens keeps its end (EOS) out; where the grammar can only end,
    the end stays allowed: a constrained answer is always complete."""
    seven = _token_ids(server, "7")[0]
    digits = {"logit_bias": {**END_NOW, str(seven): 50}}  # "7", then EOS as soon as the grammar allows it
    value, short = _json_answer(client, {"type": "integer"}, **digits)
    assert value == 7 and short.usage.completion_tokens == 2 and short.finish_reasons == ["stop"]
    value, long = _json_answer(client, {"type": "integer"}, min_tokens=5, **digits)
    assert value == 77777 and long.usage.completion_tokens == 6 and long.finish_reasons == ["stop"]
    value, ended = _json_answer(client, {"enum": ["yes"]}, min_tokens=15)
    assert value == "yes" and ended.usage.completion_tokens < 15 and ended.finish_reasons == ["stop"]


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("chat", {"min_tokens": -1}, "min_tokens"),
    ("chat", {"min_tokens": "3"}, "min_tokens"),
    ("chat", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ("chat", {"min_tokens": 5, "max_completion_tokens": 4}, "min_tokens"),
    ("completions", {"min_tokens": 17}, "min_tokens"),  # the legacy max_tokens defaults to 16
    ("chat", {"min_tokens": 10**6}, "min_tokens"),  # no max_tokens: the context's room is the limit
    ("chat", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("chat", {"allowed_token_ids": [1, 10**7]}, "allowed_token_ids"),
    ("completions", {"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ("chat", {"allowed_token_ids": ["1"]}, "allowed_token_ids.[0]"),
    ("chat", {"allowed_token_ids": [1], "response_format": {"type": "json_object"}}, "allowed_token_ids"),
])
def test_invalid_values_are_400s(client: openai.OpenAI, endpoint: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        _ask(client, endpoint, False, **body)
    assert raised.value.status_code == 400 and raised.value.type == "invalid_request_error"
    assert raised.value.param == param


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_usage_has_openai_details(server: GunicornServer, endpoint: str) -> None:
    """The usage object as OpenAI sends it, collected and as the stream's last chunk."""
    path, prompt = ("/v1/chat/completions", {"messages": MESSAGES, **NO_THINKING}) if endpoint == "chat" \
        else ("/v1/completions", {"prompt": PROMPT})
    body = {"model": MODEL, "max_tokens": 3, **GREEDY, **prompt}
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{server.url}{path}", json=streamed, stream=True, timeout=120) as response:
        *_, last = [line for line in response.iter_lines() if line.startswith(b"data: {")]
    for usage in requests.post(f"{server.url}{path}", json=body, timeout=120).json()["usage"], \
            json.loads(last.removeprefix(b"data: "))["usage"]:
        cached = usage["prompt_tokens_details"]["cached_tokens"]  # the prefix cache's hits: 0 or a block
        assert usage == {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 3,
                         "total_tokens": usage["prompt_tokens"] + 3,
                         "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                       "accepted_prediction_tokens": 0,
                                                       "rejected_prediction_tokens": 0}}
        assert 0 <= cached < usage["prompt_tokens"]


def test_a_stop_string_must_end_in_checked_text() -> None:
    """Text added unchecked (the first min_tokens tokens') is held as usual: a stop completed inside it
    never matches later, one that starts in it and completes after it cuts there (as vLLM's does)."""
    matcher = StopMatcher(["b", "abcd"])
    assert matcher.add("ab", check=False) == ("", False)  # "ab" may still become "abcd"
    assert matcher.add("x") == ("abx", False)  # the "b" completed unchecked
    matcher = StopMatcher(["abcd"])
    assert matcher.add("xab", check=False) == ("x", False)
    assert matcher.add("cd") == ("", True)
