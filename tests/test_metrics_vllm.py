"""vLLM's per-request series (nanoqwen.api.metrics, metrics_vllm) as vLLM observes them: an n > 1 request's choices as
its child requests, n and the most tokens of a choice once a request, an abort once a choice."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from chat_http import vllm_samples
from nanoqwen.api.metrics import Fanned, PendingHistogram, RequestTrace, ServerStats, Submitted
from nanoqwen.api.metrics_vllm import PER_REQUEST
from nanoqwen.engine.request import Event, Usage
from nanoqwen.engine.step_counts import ITERATION_TOKENS_BUCKETS, StepCounts


def _samples(stats: ServerStats) -> dict[tuple[str | None, ...], float]:
    """`vllm:` samples but buckets, by name and finished_reason."""
    return vllm_samples(stats.prometheus().decode(), "finished_reason")


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
    """Two prompts (3 and 5 tokens) with n=2, max_tokens=10, three choices ending on length: four requests' success,
    e2e, prompt and generation tokens, max_tokens and phases, as vLLM's n child requests; n and the most tokens of a
    choice once a prompt (vLLM's parent request of each: 10 and 10). Before the metrics are made (pending) and
    after."""
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
    assert got[("vllm:request_params_n_count", None)] == 2 and got[("vllm:request_params_n_sum", None)] == 4
    assert got[("vllm:request_max_num_generation_tokens_count", None)] == 2
    assert got[("vllm:request_max_num_generation_tokens_sum", None)] == 20
    assert got[("vllm:time_to_first_token_seconds_count", None)] == 1  # the request's first token (ours too)
    assert got[("vllm:prompt_tokens_total", None)] == 8  # the engine's prompts, as `usage`


def test_a_choice_with_no_token_is_observed_in_every_series() -> None:
    """A scheduled choice that finishes with no token (echo with max_tokens 0) is observed in each per-choice series,
    as vLLM observes every finished request: its time until its end in prefill and inference, 0 decode and per
    output token; one never scheduled: queued until its end."""
    stats = ServerStats(lambda: None)
    for scheduled in (True, False):
        submitted = Submitted(1, 0, [3])
        if scheduled:
            submitted.admitted = submitted.at
        trace = stats.begin()
        trace.on_event(Event(index=0, finish_reason="length"))
        stats.finish(trace, Usage(3, 0), submitted)
    got = _samples(stats)
    for series in PER_REQUEST.values():
        assert got[(f"{series[0]}_count", None)] == 2, series[0]
    assert got[("vllm:request_decode_time_seconds_sum", None)] == 0.0
    assert got[("vllm:request_time_per_output_token_seconds_sum", None)] == 0.0
    for phase in ("queue", "prefill", "inference"):
        assert got[(f"vllm:request_{phase}_time_seconds_sum", None)] > 0.0, phase


def test_per_choice_series_wait_for_the_publish() -> None:
    """A finished request's per-choice observations (~9 a choice, up to MAX_CHOICES) are pending until a publish, as
    the per-token ones: each a locked write to the maps under gunicorn, at the request's end, on the event loop; its
    own counts (outcome, finish reasons, e2e) are written at once."""
    stats = ServerStats(lambda: None)
    stats.publish()
    submitted = Submitted(2, 4, [3])
    submitted.admitted = submitted.at
    stats.finish(_choices(stats, {0: 4, 1: 4}, {0: "length", 1: "length"}), Usage(3, 8), submitted)
    vllm = stats._metrics.vllm
    assert vllm.success["length"]._value.get() == 2
    assert [vllm.per_request[figure]._sum.get() for figure in ("n", "generation_tokens", "prompt_tokens")] == [0] * 3
    stats.publish()
    assert [vllm.per_request[figure]._sum.get() for figure in ("n", "generation_tokens", "prompt_tokens")] == [2, 8, 6]


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
    """iteration_tokens_total: each engine step's tokens (the engine's counts on vLLM's bounds, their growth added at
    each publish, a count that did not grow never taken from); cache_config_info: the KV cache's block size, blocks,
    prefix caching and dtype (the model's own: vLLM's `auto`), once known. The engine's stats are read once a
    publish."""
    steps = StepCounts()
    engine: dict = {}
    reads = []

    def read() -> dict:
        reads.append(1)
        return {**engine, "step_buckets": steps.buckets.copy(), "step_tokens": steps.tokens}

    stats = ServerStats(read)
    stats.publish()
    assert len(reads) == 1
    for tokens in (1, 1, 1, 9, 16):
        steps.add(tokens)
    engine = {"block_size": 16, "kv_blocks": 512, "prefix_caching": True}
    stats.publish()
    for tokens in (1, 20000):
        steps.add(tokens)
    text = stats.prometheus().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["vllm:iteration_tokens_total"].samples}
    assert samples[("vllm:iteration_tokens_total_count", None)] == 7
    assert samples[("vllm:iteration_tokens_total_sum", None)] == 4 + 9 + 16 + 20000
    assert [samples[("vllm:iteration_tokens_total_bucket", le)] for le in ("1.0", "8.0", "16.0", "16384.0", "+Inf")] \
        == [4, 4, 6, 6, 7]
    info = families["vllm:cache_config_info"].samples
    assert [(s.labels, s.value) for s in info] == [({"block_size": "16", "num_gpu_blocks": "512",
                                                     "enable_prefix_caching": "True", "cache_dtype": "auto",
                                                     "engine": "0"}, 1.0)]


def test_engine_step_counts_stay_one_a_bucket() -> None:
    """Steps of every size up to max_prefill_tokens keep one count a bucket of vLLM's bounds (not one a size: a
    publish's copy and its additions stay small), each in the bucket Histogram.observe puts it."""
    steps = StepCounts()
    for tokens in range(1, 8193):
        steps.add(tokens)
    assert len(steps.buckets) == len(ITERATION_TOKENS_BUCKETS) + 1 and steps.tokens == 8192 * 8193 // 2
    reference = Histogram("steps", "s", buckets=ITERATION_TOKENS_BUCKETS, registry=CollectorRegistry())
    for tokens in range(1, 8193):
        reference.observe(tokens)
    assert steps.buckets == [bucket.get() for bucket in reference._buckets]
