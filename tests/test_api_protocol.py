"""The API layer without an engine: request validation, response builders, SSE, stats."""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk
from prometheus_client import generate_latest
from pydantic import BaseModel, ValidationError

from chat_http import VLLM_CHAT_DEFAULTS, VLLM_COMPLETION_DEFAULTS
from nanoqwen.api.body import parse_json
from nanoqwen.api.completions import TextCompletion
from nanoqwen.api.config import MAX_SERVED_NAME_CHARS, ServerConfig
from nanoqwen.api.errors import APIError
from nanoqwen.api.metrics import RATE_WINDOW_S, PrometheusMetrics, ServerStats, Submitted, percentile, percentiles
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder, ToolParsing, fingerprint
from nanoqwen.api.responses_schemas import FunctionTool
from nanoqwen.api.schemas import FunctionDefinition, parse_chat_request, parse_completion_request
from nanoqwen.api.sse import DONE, RunningUsage, sse
from nanoqwen.api.strict_json import MAX_DEPTH, MAX_SEPARATORS, Budget
from nanoqwen.api.structured import closed_objects, structured_grammar
from nanoqwen.engine.request import Event, PromptLogprobs, TokenLogprob, TopLogprob, Usage
from nanoqwen.settings import EngineConfig

USER = [{"role": "user", "content": "hi"}]


def _bad(body: object) -> APIError:
    with pytest.raises(APIError) as info:
        parse_chat_request(body, Budget())
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 1}])
def test_prompt_logprobs_0_in_a_stream_asks_for_nothing(extra: dict[str, object]) -> None:
    """vLLM takes it in a stream (whose chunks have no field for them), as nothing: no ranks, no prompt scored but
    echo's (logprobs' own), and with echo and logprobs no 400 for differing from logprobs."""
    chat = parse_chat_request({"messages": USER, "stream": True, "prompt_logprobs": 0}, Budget())
    completion = parse_completion_request({"prompt": "hi", "stream": True, "prompt_logprobs": 0, **extra}, Budget())
    for req in (chat, completion):
        params = req.sampling_params()
        assert not params.prompt_ranks and not req.wants_prompt_logprobs
        assert params.prompt_logprobs == (1 if req is completion and extra else None)


def test_minimal_request_defaults() -> None:
    req = parse_chat_request({"messages": USER, "user": "u", "metadata": {"x": "1"}, "store": False}, Budget())
    params = req.sampling_params()
    assert req.model is None and not req.stream
    assert (params.temperature, params.top_p, params.max_tokens, params.n, params.stop) == (1.0, 1.0, None, 1, [])
    assert req.split_reasoning


def test_every_field_maps_to_sampling_params() -> None:
    req = parse_chat_request({
        "model": "m", "messages": USER, "temperature": 0, "top_p": 0.5, "max_tokens": 9,
        "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True}, "stop": "###",
        "n": 3, "seed": 11, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True,
        "top_logprobs": 20, "user": "u", "response_format": {"type": "text"}, "top_k": 20, "min_p": 0.1,
        "repetition_penalty": 1.1, "ignore_eos": True, "stop_token_ids": [5],
        "chat_template_kwargs": {"enable_thinking": False},
    }, Budget())
    p = req.sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.n) == (0, 0.5, 20, 0.1, 11, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert p.stop == ["###"] and p.stop_token_ids == [5] and p.ignore_eos
    assert p.logprobs and p.top_logprobs == 20
    assert req.include_usage and not req.split_reasoning


def test_messages_for_the_template() -> None:
    req = parse_chat_request({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "refusal": "I can't."},
    ]}, Budget())
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


# The cases tests/test_server.py sends over HTTP (test_invalid_request, test_strict_types,
# test_fields_that_would_change_the_answer_are_refused) are not repeated here.
@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.[0].content"),
    ({"messages": [{"role": "user"}]}, "messages.[0].content"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stop": 3}, "stop"),
    # strict types, as OpenAI: no coercion from strings or booleans
    ({"messages": USER, "seed": 2**63}, "seed"),
    ({"messages": USER, "stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
    # unknown and unimplemented fields
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools.[0].function"),
    ({"messages": USER, "tools": [{"type": "code", "function": {"name": "f"}}]}, "tools.[0].type"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.[0].function.name"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools.[0].function.parameters"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
     "tools.[0].function.params"),
    ({"messages": USER, "tools": {"type": "function"}}, "tools"),
    ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": USER, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages.[0].tool_calls.[0].function"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
     "messages.[0].tool_calls.[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0]"),
    ({"messages": [{"role": "assistant", "content": "", "function_call": {"name": "f"}}]},
     "messages.[0].function_call"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": 0}}, "chat_template_kwargs.enable_thinking"),
])
def test_invalid_requests_name_the_param(body: dict, param: str) -> None:
    error = _bad(body)
    assert error.param == param
    assert error.body()["error"]["param"] == param


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "content": None}, "Invalid value for 'content': expected a string, got null."),
    ({"role": "user", "content": None}, "Invalid value for 'content': expected a string, got null."),
    ({"role": "user"}, "Missing required parameter: 'messages.[1].content'."),
    ({"role": "assistant", "tool_calls": []}, "Missing required parameter: 'messages.[1].content'."),
])
def test_a_message_without_content_is_openai_s_error(message: dict, error: str) -> None:
    """OpenAI's words, at the message's content (a client matches on them)."""
    bad = _bad({"messages": [*USER, message]})
    assert (bad.message, bad.param) == (error, "messages.[1].content")


def test_unknown_template_kwargs_name_the_known_one() -> None:
    assert "enable_thinking" in _bad({"messages": USER, "chat_template_kwargs": {"documents": []}}).message


def test_template_kwargs_where_no_template_is_an_unrecognized_argument() -> None:
    """Legacy completions render no template (nor do vLLM's take the field): the field is unknown there, not a
    variable unknown to the template, as the 400 said."""
    with pytest.raises(APIError) as info:
        parse_completion_request({"prompt": "x", "chat_template_kwargs": {"enable_thinking": False}}, Budget())
    assert info.value.message == "Unrecognized request argument supplied: chat_template_kwargs"


def test_an_int_is_a_fine_float() -> None:
    assert parse_chat_request({"messages": USER, "temperature": 1}, Budget()).sampling_params().temperature == 1.0


def test_model_defaults_fill_only_missing_fields() -> None:
    qwen3 = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    params = parse_chat_request({"messages": USER, "top_k": 0}, Budget()).sampling_params(qwen3)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.95, 0, 0.0)
    greedy = parse_chat_request({"messages": USER, "temperature": 0}, Budget()).sampling_params(qwen3)
    assert greedy.temperature == 0 and greedy.greedy


def test_earlier_reasoning_reaches_the_template() -> None:
    req = parse_chat_request({"messages": [*USER, {"role": "assistant", "content": "4", "reasoning_content": "2+2",
                                                   "refusal": None, "tool_calls": None, "name": "bot"}, *USER]},
                             Budget())
    assert req.template_messages()[1] == {"role": "assistant", "content": "4", "reasoning_content": "2+2",
                                          "name": "bot"}


def test_non_object_body() -> None:
    assert _bad([1, 2]).param is None


def _logprob(token: str, logprob: float) -> TokenLogprob:
    return TokenLogprob(token_id=1, token=token, logprob=logprob, bytes=list(token.encode()),
                        top_logprobs=[TopLogprob(token_id=1, token=token, logprob=logprob, bytes=list(token.encode()))])


def test_completion_builder() -> None:
    builder = CompletionBuilder("qwen3-0.6b", "fp_x", n=2, want_logprobs=True)
    builder.add(Event(index=0, reasoning="hmm", token_ids=[1], logprobs=[_logprob("hmm", -0.1)]))
    builder.add(Event(index=1, text="B", token_ids=[2], logprobs=[_logprob("B", -0.2)], finish_reason="length"))
    builder.add(Event(index=0, text="A", token_ids=[3], logprobs=[_logprob("A", -0.3)], finish_reason="stop"))
    out = builder.build(Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2))
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "qwen3-0.6b" and out["system_fingerprint"] == "fp_x"
    first, second = out["choices"]
    assert first["message"] == {"role": "assistant", "content": "A", "refusal": None, "annotations": [],
                                "reasoning_content": "hmm", "reasoning": "hmm"}
    assert first["finish_reason"] == "stop" and second["finish_reason"] == "length"
    assert second["message"] == {"role": "assistant", "content": "B", "refusal": None, "annotations": []}  # no thought
    assert [t["token"] for t in first["logprobs"]["content"]] == ["hmm", "A"]
    assert first["logprobs"]["content"][1] == {"token": "A", "logprob": -0.3, "bytes": [65],
                                               "top_logprobs": [{"token": "A", "logprob": -0.3, "bytes": [65]}]}
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                            "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
                            "completion_tokens_details": {"reasoning_tokens": 1, "audio_tokens": 0,
                                                          "accepted_prediction_tokens": 0,
                                                          "rejected_prediction_tokens": 0}}


def test_chunk_builder() -> None:
    chunks = ChunkBuilder("m", "fp_x", include_usage=True)
    role = chunks.role(1)
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert role["choices"] == [{"index": 1, "delta": {"role": "assistant", "content": "", "refusal": None},
                                "logprobs": None,
                                "finish_reason": None}]
    assert chunks.deltas(Event(index=0, token_ids=[1])) == []  # nothing to send (e.g. held-back text)
    (delta,) = chunks.deltas(Event(index=0, text="x", reasoning="r", token_ids=[1]))
    assert delta["choices"][0]["delta"] == {"content": "x", "reasoning_content": "r", "reasoning": "r"}
    assert {c["id"] for c in (role, delta)} == {chunks.id} and delta["created"] == role["created"]
    assert chunks.finish(0, "stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                      "finish_reason": "stop"}
    usage = chunks.usage(Usage(prompt_tokens=1, completion_tokens=2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert "usage" not in ChunkBuilder("m", "fp", include_usage=False).role(0)


class _CountedUsage(RunningUsage):
    """The continuous usage, counting the usage objects it builds."""

    built = 0

    def json(self) -> dict[str, int]:
        self.built += 1
        return super().json()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "legacy"])
def test_continuous_usage_is_built_once_for_the_chunks_going_out_together(chat: bool) -> None:
    """vLLM's continuous_usage_stats: every chunk has the usage so far, one object for the chunks that go out
    together (chat's were built once per chunk, then once more to stamp over them; legacy's once per chunk)."""
    running = _CountedUsage(3)
    builder = (ChunkBuilder("m", "fp", include_usage=True, n=2, running=running) if chat
               else TextCompletion("m", "fp", ["Hi", "Hi"], False, include_usage=True, running=running))
    opening = builder.opening()
    assert len(opening) == 2 and running.built == 1
    assert [c["usage"] for c in opening] == [{"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}] * 2
    out = builder.chunks(Event(index=1, text="a", token_ids=[7, 8], finish_reason="stop"))
    assert running.built == 2 and [c["usage"]["completion_tokens"] for c in out] == [2] * len(out)
    *out, last = builder.chunks(Event(index=0, text="b", token_ids=[9], finish_reason="stop", usage=Usage(3, 3)))
    assert running.built == 3 and [c["usage"]["completion_tokens"] for c in out] == [3] * len(out)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 6


def test_sse_framing() -> None:
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert DONE == "data: [DONE]\n\n"
    assert json.loads(sse([1])[len("data: "):]) == [1]


def test_fingerprint_tracks_the_configuration() -> None:
    assert fingerprint({"kernels": "torch"}) == fingerprint({"kernels": "torch"})
    assert fingerprint({"kernels": "torch"}) != fingerprint({"kernels": "triton"})


def test_server_config_from_env() -> None:
    config = ServerConfig.from_env("/models/ckpt", {"NANOQWEN_API_KEY": "k", "NANOQWEN_BODY_TIMEOUT": "2.5",
                                                    "NANOQWEN_SEND_TIMEOUT": "7", "NANOQWEN_GRAMMAR_THREADS": "4",
                                                    "NANOQWEN_MAX_PENDING_GRAMMARS": "32",
                                                    "NANOQWEN_CORS_ORIGINS": "http://a, http://b"})
    assert (config.grammar_threads, config.max_pending_grammars) == (4, 32)
    assert config.served_model_name == "qwen3-0.6b" and config.api_key == "k" and config.body_timeout_s == 2.5
    assert config.send_timeout_s == 7
    assert config.cors_origins == ("http://a", "http://b")
    assert config.model_name == "ckpt" and config.hub_id is None  # a local directory: no path, no Hub id
    assert config.accepts_model("qwen3-0.6b") and not config.accepts_model("/models/ckpt")
    assert not config.accepts_model("Qwen/Qwen3-0.6B") and not config.accepts_model("x")
    default = ServerConfig.from_env(EngineConfig.from_env({}).model, {})
    assert default.accepts_model("Qwen/Qwen3-0.6B") and default.api_key is None and default.cors_origins == ()
    assert (default.body_timeout_s, default.send_timeout_s) == (30, 60)
    assert (default.grammar_threads, default.max_pending_grammars) == (2, 16)
    assert default.model_name == "Qwen/Qwen3-0.6B"
    snapshot = ServerConfig.from_env("/hf/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc", {})
    assert snapshot.model_name == "Qwen/Qwen3-0.6B" and snapshot.accepts_model("Qwen/Qwen3-0.6B")
    assert not snapshot.accepts_model("/hf/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc")


@pytest.mark.parametrize("value", ["many", "0", "-1", "2.5"])
@pytest.mark.parametrize("name", ["GRAMMAR_THREADS", "MAX_PENDING_GRAMMARS"])
def test_server_config_refuses_a_pool_size_that_is_no_count(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"NANOQWEN_{name}='{value}' is not a whole number > 0"):
        ServerConfig.from_env("/models/ckpt", {f"NANOQWEN_{name}": value})


def test_server_config_refuses_a_served_name_too_long_for_the_metrics_maps() -> None:
    """At the bound (as JSON escapes it) the name is served; past it, refused at startup, naming the setting."""
    for name in ("a" * MAX_SERVED_NAME_CHARS, "é" * (MAX_SERVED_NAME_CHARS // 6)):
        assert ServerConfig.from_env("/models/ckpt", {"NANOQWEN_SERVED_MODEL_NAME": name}).served_model_name == name
    for name in ("a" * (MAX_SERVED_NAME_CHARS + 1), "é" * (MAX_SERVED_NAME_CHARS // 6 + 1)):
        with pytest.raises(ValueError, match="NANOQWEN_SERVED_MODEL_NAME is .* at most 128"):
            ServerConfig.from_env("/models/ckpt", {"NANOQWEN_SERVED_MODEL_NAME": name})


@pytest.mark.parametrize("key", ["secret\n", " secret", "sec\tret", "clé", "sec\x00ret"])
def test_server_config_refuses_an_api_key_no_client_can_send(key: str) -> None:
    """Its token is stripped and a header carries no control character (the openai client: only ASCII): such a key
    made every /v1 request a 401. The key is not echoed."""
    with pytest.raises(ValueError, match="NANOQWEN_API_KEY must be printable ASCII") as refused:
        ServerConfig.from_env("/models/ckpt", {"NANOQWEN_API_KEY": key})
    assert key.strip() not in str(refused.value)
    assert ServerConfig.from_env("/models/ckpt", {"NANOQWEN_API_KEY": "a b!~"}).api_key == "a b!~"


@pytest.mark.parametrize("value", ["soon", "0", "inf"])
@pytest.mark.parametrize("name", ["BODY_TIMEOUT", "SEND_TIMEOUT"])
def test_server_config_refuses_a_timeout_that_is_no_duration(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"NANOQWEN_{name}='{value}' is not a number of seconds > 0"):
        ServerConfig.from_env("/models/ckpt", {f"NANOQWEN_{name}": value})


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(1, 101), 99) == 99


def test_percentiles_are_the_nearest_ranks_of_the_sorted_samples() -> None:
    rng = random.Random(0)
    qs = (0, 1, 50, 90, 99, 100)
    for n in (1, 2, 3, 7, 99, 100, 101, 10_000):
        values = [rng.choice([rng.random(), 0.5]) for _ in range(n)]  # ties too
        ordered = sorted(values)
        assert percentiles(values, qs) == [ordered[max(1, math.ceil(n * q / 100)) - 1] for q in qs], n
    assert percentiles([], (50, 99)) == [0.0, 0.0]


def test_tokens_per_second_counts_the_window_only() -> None:
    """The running count of the rate window's tokens: what falls out of the window leaves the count."""
    stats = ServerStats(lambda: {})
    now = time.perf_counter()
    stats.record_tokens(5, now - 3 * RATE_WINDOW_S, None)
    stats.record_tokens(7, now - 2 * RATE_WINDOW_S, 0.1)
    assert stats.tokens_per_second() == 0.0
    stats.record_tokens(3, now - RATE_WINDOW_S / 2, 0.1)
    stats.record_tokens(1, now, 0.1)
    assert stats.tokens_per_second() == pytest.approx(4 / RATE_WINDOW_S)


def test_stats_counters() -> None:
    engine_stats = {"queue_length": 2, "active_requests": 1, "kv_usage": 0.5, "prefix_cache_hit_rate": 0.25,
                    "preemptions": 0}
    stats = ServerStats(lambda: engine_stats)
    served = stats.begin()
    served.on_event(Event(token_ids=[1]))
    served.on_event(Event(token_ids=[2, 3]))
    stats.finish(served, Usage(prompt_tokens=4, completion_tokens=3), Submitted(1, None, [4]))
    aborted = stats.begin()
    aborted.on_event(Event(token_ids=[1]))
    stats.abort(aborted, Submitted(1, None, [1]))
    snap = stats.snapshot()
    assert (snap["requests_served"], snap["requests_aborted"], snap["total_tokens_generated"]) == (1, 1, 4)
    assert (snap["queue_length"], snap["active_requests"], snap["kv_cache_usage"]) == (2, 1, 0.5)
    assert snap["average_response_time"] > 0 and snap["tokens_per_second"] == pytest.approx(0.4)
    assert snap["ttft_p50_ms"] > 0 and snap["itl_p99_ms"] >= 0
    text = stats.prometheus().decode()
    assert 'nanoqwen_requests_total{outcome="served"} 1.0' in text
    assert "nanoqwen_generation_tokens_total 4.0" in text and "nanoqwen_queue_length 2.0" in text
    assert "nanoqwen_time_to_first_token_seconds_count 2.0" in text


def test_metrics_added_at_publish_equal_observing_each() -> None:
    """The per-token metrics, counted and added at publish (PendingMetrics), read as observing each token would: the
    generated-tokens counter and the inter-token-latency histogram's buckets, ours and vLLM's (values on a bound of
    either layout or both, between, past the last, 0)."""
    itls = [0.0, 0.005, 0.0051, 0.01, 0.3, 30.0, 31.0, 0.005, 0.025, 0.075, 0.076, 80.0, 81.0]
    batched, direct = ServerStats(lambda: None), PrometheusMetrics()
    batched.record_tokens(1, 0.0, None)  # a choice's first token: no latency
    for itl in itls:
        batched.record_tokens(2, 0.0, itl)
        direct.itl.observe(itl)
    direct.generated.inc(1 + 2 * len(itls))
    direct.set_engine(None)

    def metrics(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines() if "_created" not in line]

    assert "nanoqwen_inter_token_latency_seconds_bucket{le=\"0.005\"} 3.0" in metrics(generate_latest(direct.registry))
    assert metrics(batched.prometheus()) == metrics(generate_latest(direct.registry))


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunk_frames_encode_as_the_whole_chunk(include_usage: bool) -> None:
    """A stream's chunks framed with their head encoded once a stream (DoneFraming.frame) are byte for byte the
    chunk's own JSON: chat and legacy, role, reasoning, content, tool calls, logprobs, the finish, usage and
    continuous usage, an error, a chunk with a key of its own."""
    tools = ToolParsing(enabled=True)
    lp = [TokenLogprob(token_id=5, token="é", logprob=-0.5, bytes=[195, 169], top_logprobs=[])]
    events = [Event(index=0, token_ids=[1], reasoning="hm"),
              Event(index=0, token_ids=[2], text="Hé \"x\"", logprobs=lp),
              Event(index=0, token_ids=[3], text='<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'),
              Event(index=0, token_ids=[4], finish_reason="stop"), Event(index=0, usage=Usage(4, 4))]
    builders = [ChunkBuilder("qwen3-0.6b", "fp_1", include_usage, tools=tools, running=RunningUsage(4)),
                ChunkBuilder("modèle", "fp_2", include_usage, n=2),
                TextCompletion("m", "fp_3", ["", "echo"], True, include_usage, RunningUsage(3))]
    framed = 0
    for builder in builders:
        chunks = builder.opening() + [c for event in events for c in builder.chunks(event)]
        chunks += builder.failure("boom") + builder.chunks(Event(index=0, error="boom"))
        own = {**next(c for c in chunks if "choices" in c), "prompt_token_ids": [1]}  # a key of its own: not dropped
        for chunk in [*chunks, own]:
            assert builder.frame(chunk) == sse(chunk) == builder.frame(chunk, split=True), chunk
            framed += "choices" in chunk
    assert framed >= 12


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("model, tool", [(FunctionDefinition, {}), (FunctionTool, {"type": "function"})])
@pytest.mark.parametrize("name", [{"name": "get weather"}, {}])
def test_a_refused_function_name_is_its_tool_s_only_error(model: type[BaseModel], tool: dict[str, Any],
                                                          name: dict[str, Any]) -> None:
    """A function whose name is refused (or missing) and whose parameters are no object schema: the name's error
    alone, as OpenAI answers. The parameters' check, without a name, made one naming function 'None' (shown only
    where it came first: the request's first error is its answer)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate({**tool, **name, "parameters": {"type": "string"}})
    assert [error["loc"] for error in info.value.errors()] == [("name",)]


def test_tool_history_reaches_the_template() -> None:
    req = parse_chat_request({"messages": [
        *USER,
        {"role": "assistant", "content": None, "reasoning_content": "need weather", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ], "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}, Budget())
    assert req.template_messages()[1:] == [
        {"role": "assistant", "content": "", "reasoning_content": "need weather", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"},
    ]
    assert req.template_tools() == TOOLS and req.shows_tools and req.kept_calls == 1
    unused = parse_chat_request({"messages": USER, "tools": TOOLS, "tool_choice": "none"}, Budget())
    assert unused.template_tools() is None and not unused.shows_tools  # "none": not shown, not parsed


def _answer(builder: CompletionBuilder, *texts: str, reason: str = "stop") -> dict:
    for text in texts[:-1]:
        builder.add(Event(index=0, text=text, token_ids=[1]))
    builder.add(Event(index=0, text=texts[-1], token_ids=[1], finish_reason=reason))
    return builder.build(Usage(prompt_tokens=1, completion_tokens=len(texts)))["choices"][0]


@pytest.mark.parametrize("text, content", [(CALL, None), ("Sunny." + CALL, ""), ("Sunny.", "")])
def test_tool_choice_autos_role_delta_waits_for_the_answer(text: str, content: str | None) -> None:
    """With tools offered and tool_choice auto, OpenAI opens an answer that calls at once with `content: null` in
    the call's first chunk (its recorded streams) and one that says something first with `content: ""`: each choice's
    role delta comes with its first chunk, its content what the collected message's content starts as; a choice
    decided before a lower one waits for it (choices open in index order, the openai stream helper needs it)."""
    chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True), n=2)
    assert chunks.opening() == []
    assert chunks.chunks(Event(index=1, text=text, token_ids=[1], finish_reason="stop")) == []
    both = [c["choices"][0] for c in chunks.chunks(Event(index=0, text="Hi.", token_ids=[1], finish_reason="stop"))]
    assert [c["index"] for c in both] == [0] * 3 + [1] * (len(both) - 3)  # role, text, finish; then choice 1's
    out = both[3:]
    role = {"role": "assistant", "content": content, "refusal": None}
    call = {"tool_calls": out[0]["delta"]["tool_calls"]} if content is None else {}
    assert out[0] == {"index": 1, "delta": {**role, **call}, "logprobs": None, "finish_reason": None}
    assert call == {} or call["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all("role" not in c["delta"] for c in out[1:]) and out[-1]["finish_reason"] in ("stop", "tool_calls")
    whole = _answer(CompletionBuilder("m", "fp", 1, False, ToolParsing(True)), text)["message"]["content"]
    assert (whole is None) == (content is None)


def test_tool_choice_autos_role_delta_before_a_call_with_logprobs_says_null() -> None:
    """With logprobs the choice's first chunk carries them with an empty delta, the call's chunks after it: the role
    delta still says `content: null`, as without logprobs."""
    for pieces in ([CALL], ["<tool_call>", CALL[len("<tool_call>"):]]):  # in one event, or token by token
        chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True))
        out = []
        for i, text in enumerate(pieces):
            out += [c["choices"][0] for c in chunks.chunks(Event(
                index=0, text=text, token_ids=[1], logprobs=[_logprob(text, -0.5)],
                finish_reason="stop" if i == len(pieces) - 1 else None))]
        assert out[0]["delta"] == {"role": "assistant", "content": None, "refusal": None}, pieces
        assert any("tool_calls" in c["delta"] for c in out[1:])
        assert sum(len(c["logprobs"]["content"]) for c in out[1:] if c["logprobs"]) == len(pieces)


def test_tool_choice_autos_role_delta_before_reasoning_says_no_content() -> None:
    """Qwen3 reasons first: whether a call or text follows is not known when the role delta goes, which then has
    no content, so that a call's streamed message has none (null), as the collected one."""
    chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True))
    out = chunks.chunks(Event(index=0, reasoning="hm", token_ids=[1]))
    out += chunks.chunks(Event(index=0, text=CALL, token_ids=[2], finish_reason="stop"))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[:2] == [{"role": "assistant", "refusal": None}, {"reasoning_content": "hm", "reasoning": "hm"}]
    assert all("content" not in d for d in deltas) and any("tool_calls" in d for d in deltas)


def test_tool_choice_autos_answer_cut_in_its_reasoning_says_its_empty_content_last() -> None:
    """Cut by max_tokens while reasoning, the collected message has `content: ""`: the stream's deltas joined say so
    too, in a delta before the finish (the role delta, sent before the reasoning, could not)."""
    chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True))
    out = chunks.chunks(Event(index=0, reasoning="hm", token_ids=[1]))
    out += chunks.chunks(Event(index=0, reasoning="m", token_ids=[2], finish_reason="length"))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[-2:] == [{"content": ""}, {}] and out[-1]["choices"][0]["finish_reason"] == "length"
    assert [d["content"] for d in deltas if "content" in d] == [""]
    whole = CompletionBuilder("m", "fp", 1, False, ToolParsing(True))
    whole.add(Event(index=0, reasoning="hmm", token_ids=[1, 2], finish_reason="length"))
    assert whole.build(Usage(prompt_tokens=1, completion_tokens=2))["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize("held", ["<tool_call>\n{", CALL[:30], "Sunny.\n", ""])
def test_a_failed_stream_sends_what_its_choices_held_first(held: str) -> None:
    """An error ends a stream: what its choices held back (text that may yet be a tool call, a choice's chunks waiting
    for a lower one to open) was dropped. Now each choice opens, in index order, and says what it generated, as its
    collected answer cut there would, with no finish reason; the server's error event follows."""
    chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True), n=2)
    out = chunks.chunks(Event(index=1, text="Hi.", token_ids=[1]))
    out += chunks.chunks(Event(index=0, text=held, token_ids=[1] if held else []))
    out += chunks.chunks(Event(error="internal error"))
    choices = [chunk["choices"][0] for chunk in out]
    assert list(dict.fromkeys(choice["index"] for choice in choices)) == [0, 1]  # opened in index order
    assert all(choice["finish_reason"] is None for choice in choices)
    for index, text in enumerate((held, "Hi.")):
        mine = [choice["delta"] for choice in choices if choice["index"] == index]
        assert mine[0]["role"] == "assistant" and all("role" not in delta for delta in mine[1:])
        collected = _answer(CompletionBuilder("m", "fp", 1, False, ToolParsing(True)), text, reason="length")
        assert "".join(delta.get("content") or "" for delta in mine) == collected["message"]["content"], mine
        assert text or mine[0]["content"] == "", "cut before anything: its answer is \"\", as at any end"


def test_a_failed_stream_sends_the_logprobs_held_without_reasoning() -> None:
    """With `include_reasoning: false`, a token not yet known to be reasoning or content holds its logprobs back: a
    stream failing then sends them before its error, as its end would have."""
    chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True), include_reasoning=False)
    assert chunks.chunks(Event(index=0, token_ids=[1], logprobs=[_logprob("<", -0.5)])) == []
    out = chunks.chunks(Event(error="internal error"))
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [lp["token"] for chunk in out if (lps := chunk["choices"][0]["logprobs"]) for lp in lps["content"]] == ["<"]


def test_a_failed_legacy_stream_sends_the_echoes_still_waiting_for_their_prompts_logprobs() -> None:
    """With logprobs an echo waits for its prompt's logprobs, which come with its choice's first event: a stream
    failing before then (its prompt queued, or in its prefill) dropped the echo. It goes out without them, as it
    would without logprobs asked; nothing generated is held (choice 0's text went out as it came)."""
    builder = TextCompletion("m", "fp", ["Hi", "Yo", ""], True)
    assert builder.opening() == []
    prompt = PromptLogprobs("Hi", [])
    out = builder.chunks(Event(index=0, text=" there", token_ids=[1], logprobs=[_logprob(" there", -0.5)],
                               prompt_logprobs=prompt))
    assert [choice["text"] for chunk in out for choice in chunk["choices"]] == ["Hi there"]
    out = builder.chunks(Event(error="internal error"))
    assert [chunk["choices"] for chunk in out] == [[{"index": 1, "text": "Yo", "logprobs": None,
                                                     "finish_reason": None}]]
    assert builder.chunks(Event(error="internal error")) == []  # sent once


def test_completion_builder_parses_tool_calls() -> None:
    tools = ToolParsing(enabled=True)
    choice = _answer(CompletionBuilder("m", "fp", 1, False, tools), "Checking.\n", CALL[:20], CALL[20:])
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"]["content"] == "Checking." and choice["finish_reason"] == "tool_calls"
    only_calls = _answer(CompletionBuilder("m", "fp", 1, False, tools), CALL + "\n" + CALL)
    assert only_calls["message"]["content"] is None and len(only_calls["message"]["tool_calls"]) == 2
    one = _answer(CompletionBuilder("m", "fp", 1, False, ToolParsing(True, max_calls=1)), CALL + "\n" + CALL)
    assert len(one["message"]["tool_calls"]) == 1
    # a second call cut before its name: the markup of a cut call, not content
    cut = _answer(CompletionBuilder("m", "fp", 1, False, tools), CALL, "<tool_call>\n{", reason="length")
    assert cut["finish_reason"] == "length" and cut["message"]["content"] is None
    assert len(cut["message"]["tool_calls"]) == 1
    stopped = _answer(CompletionBuilder("m", "fp", 1, False, tools), CALL, "<tool_call>\n{", reason="stop")
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] is None
    plain = _answer(CompletionBuilder("m", "fp", 1, False), CALL)  # no tools in the request: text as it is
    assert plain["message"]["content"] == CALL and "tool_calls" not in plain["message"]
    assert plain["finish_reason"] == "stop"


@pytest.mark.parametrize("first", ['{"city": "Paris"}', '{"city": NaN}'], ids=["json", "nan"])
def test_streamed_tool_calls_reassemble_to_the_completion(first: str) -> None:
    """A call in Qwen3's key order sends its arguments as the model wrote them, unchecked (tool_calls.py: they are
    out before the object closes): invalid JSON too (NaN), streamed and not alike."""
    text = "Checking.\n" + CALL.replace('{"city": "Paris"}', first) + "\n" + CALL.replace("Paris", "Oslo")
    whole = _answer(CompletionBuilder("m", "fp", 1, False, ToolParsing(True)), text)
    assert [c["function"]["arguments"] for c in whole["message"]["tool_calls"]] == [first, '{"city": "Oslo"}']
    for step in (1, 3, 7, len(text)):
        chunks = ChunkBuilder("m", "fp", include_usage=False, tools=ToolParsing(True))
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        deltas = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            deltas += chunks.deltas(Event(index=0, text=piece, token_ids=[1], finish_reason="stop" if last else None))
        content, calls, pieces = "", {}, {}
        for chunk in deltas:
            ChatCompletionChunk.model_validate(chunk)  # as the openai client reads it
            delta = chunk["choices"][0]["delta"]
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                if "id" in call:  # the first delta of a call: index, id, type, name
                    assert call["type"] == "function" and call["function"]["arguments"] == ""
                    calls[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
                else:
                    pieces[call["index"]] = pieces.get(call["index"], 0) + 1
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
        assert content == whole["message"]["content"]
        assert [calls[i] for i in sorted(calls)] == [c["function"] for c in whole["message"]["tool_calls"]]
        # the arguments as they are decoded: a piece per delta of text inside them
        if step == len(text):
            assert pieces == {0: 1, 1: 1}
        else:  # at least a piece per `step` characters of each call's arguments (13 to 17 characters)
            lengths = [len(c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
            assert [pieces[i] >= n // step for i, n in enumerate(lengths)] == [True, True], (pieces, lengths)
        assert chunks.finish(0, "stop")["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("effort, thinking", [("none", False), ("minimal", True), ("high", True), (None, None)])
def test_reasoning_effort_switches_thinking(effort: str | None, thinking: bool | None) -> None:
    req = parse_chat_request({"messages": USER, "reasoning_effort": effort}, Budget())
    assert req.template_kwargs().get("enable_thinking") == thinking
    assert req.split_reasoning == (thinking is not False)
    agreeing = {"messages": USER, "reasoning_effort": effort, "chat_template_kwargs": {"enable_thinking": thinking}}
    assert parse_chat_request(agreeing, Budget()).template_kwargs().get("enable_thinking") == thinking


def test_reasoning_effort_contradicting_enable_thinking_is_refused() -> None:
    body = {"messages": USER, "reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}
    assert _bad(body).param == "reasoning_effort"


def test_logit_bias_keys_become_token_ids() -> None:
    params = parse_chat_request({"messages": USER, "logit_bias": {"7": -100, "42": 12.5}}, Budget()).sampling_params()
    assert params.logit_bias == {7: -100.0, 42: 12.5}
    assert _bad({"messages": USER, "logit_bias": {"-1": 1}}).param == "logit_bias"
    many = _bad({"messages": USER, "logit_bias": {f"x{i}": 1 for i in range(100)}})
    assert "not ['x0', 'x1', 'x2', 'x3', 'x4', … (100 in all)]" in many.message
    assert _bad({"messages": USER, "logit_bias": {"7": True}}).param == "logit_bias.7"
    assert _bad({"messages": USER, "logit_bias": {"7": 100.5}}).param == "logit_bias.7"


def _other(value: Any) -> Any:
    """A value other than vLLM's default `value`, of the field's type where it has one."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return ["x"] if isinstance(value, list) else {None: "x", "auto": "xgrammar"}[value]


@pytest.mark.parametrize("parse, defaults", [
    (lambda f: parse_chat_request({"messages": USER, **f}, Budget()), VLLM_CHAT_DEFAULTS),
    (lambda f: parse_completion_request({"prompt": "x", **f}, Budget()), VLLM_COMPLETION_DEFAULTS),
], ids=["chat", "completions"])
def test_vllm_fields_are_accepted_at_their_defaults_only(parse: Callable[[dict], Any], defaults: dict) -> None:
    """Accepted as fields of the request, asking for no constraint (that the answer is the same:
    test_server_structured.py's test_vllm_fields_at_their_defaults_change_nothing); any other value refused."""
    req = parse(defaults)
    assert set(defaults) <= req.model_fields_set and req.constraint is None
    for name, value in defaults.items():
        with pytest.raises(APIError) as info:
            parse({name: _other(value)})
        assert (info.value.status, info.value.param, info.value.code) == (400, name, "unsupported_parameter")
        assert "accepted: null" in str(info.value) or value is None


@pytest.mark.parametrize("extra, param, words", [
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "got regex, choice"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "asks for no constraint"),
    ({"structured_outputs": {"json_object": False, "regex": "a"}}, "structured_outputs", "got regex, json_object"),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs.json", "not valid JSON"),
    ({"guided_json": "[]"}, "guided_json", "an object"),
    ({"guided_choice": []}, "guided_choice", "at least 1"),
    ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "guided_regex", "structured_outputs"),
    ({"guided_choice": ["a"], "guided_grammar": "start: \"a\""}, "guided_grammar", "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "response_format"),
    ({"structured_outputs": {"regex": "a"}, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, "structured_outputs", "forced tool call"),
    ({"guided_regex": "a", "add_generation_prompt": False, "continue_final_message": True,
      "messages": [*USER, {"role": "assistant", "content": "b"}]}, "continue_final_message", "structured outputs"),
    ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs.backend", "\"guidance\""),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
     "Unsupported"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "\"auto\""),
])
def test_structured_outputs_refusals_name_the_field(extra: dict[str, Any], param: str, words: str) -> None:
    error = _bad({"messages": USER, **extra})
    assert error.param == param and words in str(error), str(error)


@pytest.mark.parametrize("encoded, words", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("[" * 70 + "]" * 70, f"nested more than {MAX_DEPTH} levels"),
    ('{"const": NaN}', "not valid JSON"),
    ('{"minimum": -Infinity}', "not valid JSON"),
    ('{"enum": [' + "0," * MAX_SEPARATORS + "0]}", f"more than {MAX_SEPARATORS} values"),
    ('{"const": "\\udc00"}', "lone UTF-16 surrogate"),
], ids=["5000-deep", "65-deep", "NaN", "Infinity", "values", "surrogate"])
def test_an_encoded_schema_has_the_limits_of_a_body(encoded: str, words: str) -> None:
    """A schema sent as its JSON encoding escapes strict_json's checks on the body: it gets them itself, a 400 naming
    the field (a string nested 5000 deep was a RecursionError, a 500); its values are the body's, past them a 413."""
    for extra, param in (({"guided_json": encoded}, "guided_json"),
                         ({"structured_outputs": {"json": encoded}}, "structured_outputs.json")):
        with pytest.raises(APIError) as info:
            parse_chat_request(*parse_json(json.dumps({"messages": USER, **extra})))  # as a client sends it
        error = info.value
        expected = (413, "request_too_large") if words.startswith("more than") else (400, param)
        assert (error.status, error.code if error.status == 413 else error.param) == expected, str(error)
        assert words in str(error), str(error)


def test_structured_outputs_kinds() -> None:
    """Each kind as its constraint, a JSON schema's encoding decoded; the options honoured whatever their value."""
    options = {"backend": "guidance", "disable_fallback": True, "disable_any_whitespace": True,
               "disable_additional_properties": True}
    cases = [({"structured_outputs": {"json": '{"type": "integer"}', **options}},
              ("json", {"type": "integer"}, "structured_outputs.json")),
             ({"structured_outputs": {"json_object": True, "regex": None}},
              ("json_object", True, "structured_outputs.json_object")),
             ({"guided_choice": ["a", "b"], "guided_decoding_backend": "auto"},
              ("choice", ["a", "b"], "guided_choice")),
             ({"guided_grammar": "root ::= \"a\""}, ("grammar", "root ::= \"a\"", "guided_grammar"))]
    for extra, expected in cases:
        req = parse_chat_request({"messages": USER, **extra}, Budget())
        assert (req.constraint.kind, req.constraint.value, req.constraint.param) == expected
        assert req.constrains_answer
    assert parse_completion_request({"prompt": "x", "guided_regex": "a+"}, Budget()).constraint.param == "guided_regex"
    assert parse_chat_request({"messages": USER}, Budget()).constraint is None


def test_closed_objects_closes_what_vllm_closes() -> None:
    """vLLM's rule: each object at any depth, under any key, with `properties` or `patternProperties` and no
    `additionalProperties`; a bare object schema stays open (it was closed to `{}`)."""
    named = {"type": "object", "properties": {"a": {"type": "integer"}}}
    patterned = {"patternProperties": {"^x": {"type": "string"}}}
    bare = {"type": "object"}
    schema = {"$defs": {"o": named}, "properties": {"p": patterned, "q": bare}, "anyOf": [named, bare],
              "x-vendor": {"deep": [[named]]}, "if": {"properties": {"b": {"const": 1}}, "additionalProperties": True}}
    closed, closed_patterns = {**named, "additionalProperties": False}, {**patterned, "additionalProperties": False}
    assert closed_objects(schema) == {
        "$defs": {"o": closed}, "properties": {"p": closed_patterns, "q": bare}, "anyOf": [closed, bare],
        "x-vendor": {"deep": [[closed]]}, "if": {"properties": {"b": {"const": 1}}, "additionalProperties": True},
        "additionalProperties": False}
    assert closed_objects(bare) == bare and closed_objects(named) == closed
    assert named == {"type": "object", "properties": {"a": {"type": "integer"}}}  # a copy


class _Grammars:
    """The engine's Grammars as structured_grammar calls it: the schemas it is given."""

    def __init__(self) -> None:
        self.schemas: list[dict[str, Any]] = []

    def json_schema(self, schema: dict[str, Any], *_: Any) -> None:
        self.schemas.append(schema)

    def cached(self, _key: Any) -> None:
        return None


class _Serving:
    def __init__(self) -> None:
        self.engine = type("Engine", (), {"grammars": _Grammars()})()

    def compile_off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def off_loop(self, _chars: int, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


@pytest.mark.parametrize("kind, value, compiled", [
    ("json_object", True, {"type": "object"}),  # was {"type": "object", "additionalProperties": False}: only {}
    ("json", {"type": "object", "properties": {}}, {"type": "object", "properties": {}, "additionalProperties": False}),
])
def test_disable_additional_properties_applies_to_json_only(kind: str, value: Any, compiled: dict) -> None:
    serving = _Serving()
    req = parse_chat_request({"messages": USER, "structured_outputs": {kind: value,
                                                                       "disable_additional_properties": True}},
                             Budget())
    structured_grammar(serving, req)
    assert serving.engine.grammars.schemas == [compiled]


@pytest.mark.parametrize("request_id", ["x" * 257, 7])
def test_request_id_is_a_string_of_at_most_256(request_id: Any) -> None:
    """It is repeated in every chunk of a stream: a body's megabytes in each would be an amplifier."""
    assert _bad({"messages": USER, "request_id": request_id}).param == "request_id"
    assert parse_completion_request({"prompt": "x", "request_id": "x" * 256}, Budget()).request_id == "x" * 256
