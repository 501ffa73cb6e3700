"""What a request that fails still owes its client, through `gunicorn -k gevent` and the `openai` client: a worker
whose engine step fails on purpose (tests/gunicorn_failing.py), and which publishes its stats only when asked or as it
exits."""
from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from openai.types.shared import ErrorObject

from chat_http import MODEL, cpu_env, engine_idle, metric, server_stats, sse_events, sse_payloads
from server_process import GunicornServer, pid_alive
from waits import wait_for
from wire_types import wire_problems

CONFIG = Path(__file__).with_name("gunicorn_failing.py")
FAIL_MAX_TOKENS, FAIL_AFTER = 77, 8  # a request of max_tokens 77 fails after 8 tokens
BREAK_N, BREAK_AT = 3, 6  # a chat stream of n=3 breaks in our own code at its 6th event
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(tiny_checkpoint, FAIL_MAX_TOKENS=str(FAIL_MAX_TOKENS), FAIL_AFTER=str(FAIL_AFTER),
                  BREAK_N=str(BREAK_N), BREAK_AT=str(BREAK_AT))
    with GunicornServer(env, tmp_path_factory.mktemp("failing") / "gunicorn.log",
                        args=["-c", str(CONFIG)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: GunicornServer) -> openai.OpenAI:
    return server.openai_client()


def test_a_failed_foreground_stream_kept_is_found_failed(client: openai.OpenAI) -> None:
    """OpenAI keeps a failed response: GET answers it `failed`, with its error and its output so far. A stored
    foreground stream that failed was let go (a 404), where a background one was kept."""
    events = list(client.responses.create(input="Hi", max_output_tokens=FAIL_MAX_TOKENS, stream=True,
                                          reasoning={"effort": "none"}, **GREEDY))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.error.code == "server_error"
    assert "a step failed on purpose" in failed.response.error.message
    found = client.responses.retrieve(failed.response.id)
    assert found.status == "failed" and found.error == failed.response.error
    assert found.model_dump()["output"] == failed.response.model_dump()["output"] != []
    assert found.output[-1].status == "incomplete"
    items = client.responses.input_items.list(failed.response.id)
    assert [item.type for item in items.data] == ["message"]


def test_a_failed_response_not_streamed_has_its_streams_error_code(client: openai.OpenAI) -> None:
    """The server's failure of a response answered whole is a 500 whose code is the one its stream's `response.failed`
    gives, `server_error` (it was null: clients that branch on the code told the two apart)."""
    body = {"input": "Hi", "max_output_tokens": FAIL_MAX_TOKENS, "reasoning": {"effort": "none"}, **GREEDY}
    *_, failed = client.responses.create(stream=True, store=False, **body)
    assert failed.type == "response.failed"
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.create(**body)
    assert info.value.status_code == 500
    assert info.value.body == {"message": failed.response.error.message, "type": "server_error", "param": None,
                               "code": failed.response.error.code}


def test_an_answer_our_code_broke_is_a_500_whose_code_says_server_error(client: openai.OpenAI) -> None:
    """A bug of ours building an answer not streamed reaches the app's last error handler: its 500 gives the type and
    code a stream's failure gives, `server_error` (the code was null)."""
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=BREAK_N, max_tokens=4,
                                       **GREEDY)
    assert info.value.body == {"message": "Internal server error", "type": "server_error", "param": None,
                               "code": "server_error"}


def test_a_failed_stream_sends_the_text_it_held_back(client: openai.OpenAI) -> None:
    """Text held back as it may still begin a stop string went nowhere when the request failed. A failure ends the
    answer where it is, as a finish by length does: the stream's text is the length-cut answer's."""
    body = {**GREEDY, "prompt": "Hello", "extra_body": {"ignore_eos": True}}
    cut = client.completions.create(max_tokens=FAIL_AFTER, **body).choices[0].text
    assert len(cut) > 3 and "\x00" not in cut
    texts = []
    with pytest.raises(openai.APIError, match="a step failed on purpose"):
        for chunk in client.completions.create(max_tokens=FAIL_MAX_TOKENS, stop=[cut[-3:] + "\x00"], stream=True,
                                               **body):
            texts += [choice.text for choice in chunk.choices]
    assert "".join(texts) == cut


def test_every_prompt_of_a_failed_stream_sends_the_text_it_held_back(client: openai.OpenAI) -> None:
    """A legacy completion's prompts share a stream, which ends at its first error event: the second prompt's held
    text came after the first's error and was lost. The stop string is the whole FAIL_AFTER-token answer and a NUL, so
    each prompt holds all its text until the failure, however many tokens it had: its prompts may reach the failing
    step several tokens apart (the engine may run steps between their admissions: seen in CI, 3 tokens apart). A
    prompt not yet admitted when the step failed has no text to tell, so the request is sent again (at most 3 times)
    until both prompts had some."""
    body = {**GREEDY, "prompt": "Hello", "extra_body": {"ignore_eos": True}}
    cuts = [client.completions.create(max_tokens=n, **body).choices[0].text for n in range(1, FAIL_AFTER + 1)]
    assert "\x00" not in cuts[-1] and len(set(cuts)) == len(cuts)
    for _ in range(3):
        texts = ["", ""]
        with pytest.raises(openai.APIError, match="a step failed on purpose"):
            for chunk in client.completions.create(max_tokens=FAIL_MAX_TOKENS, stop=[cuts[-1] + "\x00"], stream=True,
                                                   **{**body, "prompt": ["Hello", "Hello"]}):
                for choice in chunk.choices:
                    texts[choice.index] += choice.text
        assert cuts[-1] in texts and all(text in {"", *cuts} for text in texts), (texts, cuts)
        if all(texts):
            break
    assert all(texts), texts


def test_a_stream_our_code_breaks_ends_with_its_error_stops_generating_and_counts_as_failed(
        server: GunicornServer, client: openai.OpenAI) -> None:
    """A stream broken by our own code (its chunk builder raises: a chat stream of n BREAK_N) ends with an
    error event the client raises, its engine request stopped at once (it generated on while the last frames went
    out) and counted failed (it was counted aborted, as a client gone)."""
    before = server_stats(server)
    errors = f'vllm:request_success_total{{engine="0",finished_reason="error",model_name="{MODEL}"}}'
    errors_before = metric(server, errors)
    with pytest.raises(openai.APIError, match="internal server error"):
        for _ in client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=BREAK_N, max_tokens=400,
                                                stream=True, extra_body={"ignore_eos": True}, **GREEDY):
            pass
    wait_for(lambda: engine_idle(server), 30)
    after = server_stats(server)
    assert after["requests_failed"] == before["requests_failed"] + 1
    assert metric(server, errors) == errors_before + BREAK_N  # vLLM's finished_reason of each unfinished choice
    assert after["requests_aborted"] == before["requests_aborted"]
    assert after["engine_tokens_generated"] - before["engine_tokens_generated"] < BREAK_N * 100


def test_a_stored_completion_that_fails_part_way_is_not_kept(client: openai.OpenAI) -> None:
    """A `store: true` completion whose engine step fails after FAIL_AFTER tokens is not kept, streamed or not; one of
    the same request that finishes is."""
    body: dict[str, Any] = {**GREEDY, "messages": [{"role": "user", "content": "Hi"}], "store": True,
                            "metadata": {"test": uuid.uuid4().hex}, "reasoning_effort": "none",
                            "extra_body": {"ignore_eos": True}}
    with pytest.raises(openai.InternalServerError, match="a step failed on purpose"):
        client.chat.completions.create(max_tokens=FAIL_MAX_TOKENS, **body)
    with pytest.raises(openai.APIError, match="a step failed on purpose"):
        for _ in client.chat.completions.create(max_tokens=FAIL_MAX_TOKENS, stream=True, **body):
            pass
    finished = client.chat.completions.create(max_tokens=4, **body)
    assert [c.id for c in client.chat.completions.list(metadata=body["metadata"])] == [finished.id]


VLLM_LABELS = f'{{engine="0",model_name="{MODEL}"}}'


def test_a_worker_that_exits_keeps_its_last_tokens_in_the_metrics(server: GunicornServer,
                                                                  client: openai.OpenAI) -> None:
    """The per-token counts, and vLLM's per-choice series, wait in the worker for its next publish: a graceful exit
    (SIGTERM, max_requests) before it flushes them, and /metrics (the respawned worker's, summing the dead one's
    counters) has every token and the choice."""
    before = metric(server, "nanoqwen_generation_tokens_total")  # published: nothing waits
    choices = metric(server, f"vllm:request_generation_tokens_sum{VLLM_LABELS}")
    pid = _pid(server)
    answer = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                            extra_body={"ignore_eos": True}, **GREEDY)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 120)  # asked nothing meanwhile: a scrape or /stats would publish the counts
    wait_for(lambda: _pid(server) is not None, 120, 0.2)  # respawned
    assert metric(server, "nanoqwen_generation_tokens_total") == before + answer.usage.completion_tokens == before + 12
    assert metric(server, f"vllm:request_generation_tokens_sum{VLLM_LABELS}") == choices + 12


REQUEST_COUNTS = ('nanoqwen_requests_total{outcome="served"}', "nanoqwen_prompt_tokens_total",
                  "nanoqwen_time_to_first_token_seconds_count", "nanoqwen_request_duration_seconds_count")


def test_a_worker_killed_keeps_its_requests_counts_in_the_metrics(server: GunicornServer,
                                                                  client: openai.OpenAI) -> None:
    """A request's own counts are written into the worker's maps as it is answered: SIGKILLed before its next publish,
    the worker leaves them to /metrics (the respawned worker's); only the per-token counts and vLLM's per-choice
    series it kept pending are lost."""
    wait_for(lambda: metric(server, "nanoqwen_model_ready") == 1, 120, 0.2)  # a respawn before this test's loaded
    before = {sample: metric(server, sample) for sample in REQUEST_COUNTS}  # published: nothing waits
    pid = _pid(server)
    answer = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 120)
    wait_for(lambda: _pid(server) is not None, 120, 0.2)  # respawned
    added = {sample: metric(server, sample) - before[sample] for sample in REQUEST_COUNTS}
    prompt = answer.usage.prompt_tokens
    assert added == dict(zip(REQUEST_COUNTS, (1, prompt, 1, 1), strict=True))


def _pid(srv: GunicornServer) -> int | None:
    """The worker's (one), None while none answers."""
    try:
        (worker,) = requests.get(f"{srv.url}/stats", timeout=5).json()["workers"]
    except (requests.RequestException, ValueError):
        return None
    return worker["pid"]


def test_a_failed_streams_events_are_the_openai_types(server: GunicornServer) -> None:
    """A stream whose engine step fails part way (tests/test_wire_types.py's check): chat's and the legacy completion's
    chunks, then their error event's object (OpenAI's error object); Responses' events through `response.failed`."""
    chat = {**GREEDY, "max_tokens": FAIL_MAX_TOKENS, "stream": True, "messages": [{"role": "user", "content": "Hi"}],
            "reasoning_effort": "none"}
    completion = {**GREEDY, "max_tokens": FAIL_MAX_TOKENS, "stream": True, "prompt": "Hi"}
    problems: list[str] = []
    wait_for(lambda: metric(server, "nanoqwen_model_ready") == 1, 120, 0.2)  # a worker killed before: respawned
    for path, body, kind in (("/v1/chat/completions", chat, ChatCompletionChunk), ("/v1/completions", completion,
                                                                                    Completion)):
        response = requests.post(server.url + path, json=body, stream=True, timeout=120)
        payloads = [json.loads(data) for data in sse_payloads(response) if data != "[DONE]"]
        assert set(payloads[-1]) == {"error"} and len(payloads) > 1, payloads
        problems += [p for chunk in payloads[:-1] for p in wire_problems(kind, chunk, {("finish_reason", None)})]
        problems += wire_problems(ErrorObject, payloads[-1]["error"])
    response = requests.post(f"{server.url}/v1/responses", stream=True, timeout=120, json={
        **GREEDY, "input": "Hi", "max_output_tokens": FAIL_MAX_TOKENS, "stream": True, "reasoning": {"effort": "none"}})
    events = [json.loads(data) for _, data in sse_events(response)]
    assert events[-1]["type"] == "response.failed", events[-1]
    problems += [p for event in events for p in wire_problems(ResponseStreamEvent, event)]
    assert problems == []
