"""vLLM's per-request series (nanoqwen.api.metrics, metrics_vllm) as vLLM observes them: an n > 1 request's choices as
its child requests, n and the most tokens of a choice once a request, an abort once a choice."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from nanoqwen.api.metrics import Fanned, PendingHistogram, RequestTrace, ServerStats, Submitted
from nanoqwen.engine.request import Event, Usage


def _samples(stats: ServerStats) -> dict[tuple[str, str | None], float]:
    """`vllm:` samples but buckets, by name and finished_reason."""
    return {(sample.name, sample.labels.get("finished_reason")): sample.value
            for family in text_string_to_metric_families(stats.prometheus().decode())
            for sample in family.samples if sample.name.startswith("vllm:") and "le" not in sample.labels}


def _choices(stats: ServerStats, tokens: dict[int, int], finished: dict[int, str]) -> RequestTrace:
    """A request's trace with `tokens[i]` tokens of choice i, one an event, and choice i's finish `finished[i]`."""
    trace = stats.begin()
    for index, count in tokens.items():
        for token in range(count):
            last = token == count - 1
            trace.on_event(Event(index=index, token_ids=[token], finish_reason=finished.get(index) if last else None))
    return trace


@pytest.mark.parametrize("published", [False, True])
def test_each_choice_is_observed_as_a_vllm_child_request(published: bool) -> None:
    """Two prompts (3 and 5 tokens) with n=2, max_tokens=10, each choice ending on length: four requests' success,
    e2e, prompt and generation tokens, max_tokens and phases, as vLLM's n child requests; n and the most tokens of a
    choice once. Before the metrics are made (pending) and after."""
    stats = ServerStats(lambda: None)
    if published:
        stats.publish()
    submitted = Submitted(2, 10, [3, 5])
    submitted.admitted = submitted.at
    trace = _choices(stats, {0: 10, 1: 10, 2: 10, 3: 7}, dict.fromkeys(range(3), "length") | {3: "stop"})
    stats.finish(trace, Usage(8, 37), submitted)
    got = _samples(stats)
    assert got[("vllm:request_success_total", "length")] == 3 and got[("vllm:request_success_total", "stop")] == 1
    for series in ("e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens",
                   "request_params_max_tokens", "request_queue_time_seconds", "request_prefill_time_seconds",
                   "request_decode_time_seconds", "request_inference_time_seconds",
                   "request_time_per_output_token_seconds"):
        assert got[(f"vllm:{series}_count", None)] == 4, series
    assert got[("vllm:request_prompt_tokens_sum", None)] == 3 + 3 + 5 + 5
    assert got[("vllm:request_generation_tokens_sum", None)] == 37 == got[("vllm:generation_tokens_total", None)]
    assert got[("vllm:request_params_max_tokens_sum", None)] == 40
    assert got[("vllm:request_params_n_count", None)] == 1 and got[("vllm:request_params_n_sum", None)] == 2
    assert got[("vllm:request_max_num_generation_tokens_count", None)] == 1
    assert got[("vllm:request_max_num_generation_tokens_sum", None)] == 10
    assert got[("vllm:time_to_first_token_seconds_count", None)] == 1  # the request's first token (ours too)
    assert got[("vllm:prompt_tokens_total", None)] == 8  # the engine's prompts, as `usage`


@pytest.mark.parametrize(("unfinished", "outcome"), [("abort", "abort"), ("error", "fail")])
def test_an_ended_n_request_counts_each_choice(unfinished: str, outcome: str) -> None:
    """vLLM aborts each child: an n=3 request aborted (failed) with one choice finished counts that one under its
    reason and the two others as `abort` (`error`); an n=1 request with none finished counts one."""
    stats = ServerStats(lambda: None)
    trace = _choices(stats, {0: 2, 1: 1}, {0: "length"})
    getattr(stats, outcome)(trace, Submitted(3, 2, [4]))
    getattr(stats, outcome)(stats.begin(), Submitted(1, 2, [4]))
    got = _samples(stats)
    assert got[("vllm:request_success_total", "length")] == 1
    assert got[("vllm:request_success_total", unfinished)] == 3
    assert got[("vllm:e2e_request_latency_seconds_count", None)] == 0


def test_pending_counts_reach_each_histogram_by_its_own_bounds() -> None:
    """A pending histogram adds to each histogram by that histogram's bounds, whatever the order it was given them
    in; one whose bounds are not all among the pending's is refused, not added to wrongly."""
    registry = CollectorRegistry()
    coarse = Histogram("coarse", "c", buckets=(1.0, 10.0), registry=registry)
    fine = Histogram("fine", "f", buckets=(0.5, 1.0, 2.0), registry=registry)
    pending = PendingHistogram((0.5, 1.0, 2.0), (1.0, 10.0))  # the order unlike Fanned's
    for value in (0.2, 0.7, 1.0, 1.5, 5.0, 50.0):
        pending.observe(value)
    pending.add_to(Fanned(coarse, fine))
    assert [b.get() for b in coarse._buckets] == [3, 2, 1] and [b.get() for b in fine._buckets] == [1, 2, 1, 2]
    pending.clear()
    pending.add_to(Fanned(coarse))  # nothing pending: nothing added
    assert coarse._sum.get() == pytest.approx(58.4)
    other = Histogram("other", "o", buckets=(3.0,), registry=registry)
    pending.observe(1.0)
    with pytest.raises(ValueError, match="not all among"):
        pending.add_to(Fanned(other))


def test_engine_steps_and_cache_config_are_vllms_series() -> None:
    """iteration_tokens_total: each engine step's tokens (the engine's counts by size, their growth added at each
    publish, on vLLM's bounds); cache_config_info: the KV cache's block size, blocks and prefix caching, once known."""
    engine: dict = {"step_tokens": {}}
    stats = ServerStats(lambda: engine)
    stats.publish()
    engine = {"step_tokens": {1: 3, 9: 1, 16: 1}, "block_size": 16, "kv_blocks": 512, "prefix_caching": True}
    stats.publish()
    engine = {**engine, "step_tokens": {1: 4, 9: 1, 16: 1, 20000: 1}}
    text = stats.prometheus().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["vllm:iteration_tokens_total"].samples}
    assert samples[("vllm:iteration_tokens_total_count", None)] == 7
    assert samples[("vllm:iteration_tokens_total_sum", None)] == 4 + 9 + 16 + 20000
    assert [samples[("vllm:iteration_tokens_total_bucket", le)] for le in ("1.0", "8.0", "16.0", "16384.0", "+Inf")] \
        == [4, 4, 6, 6, 7]
    info = families["vllm:cache_config_info"].samples
    assert [(s.labels, s.value) for s in info] == [({"block_size": "16", "num_gpu_blocks": "512",
                                                     "enable_prefix_caching": "True", "engine": "0"}, 1.0)]
