"""vLLM's `/metrics` series (`vllm:*`), so that dashboards and tools built for vLLM read this server: its names, types,
`model_name` and `engine` labels and bucket layouts (vLLM's vllm/v1/metrics/loggers.py). Each is fed by the same
observation as its `nanoqwen_*` twin (nanoqwen.api.metrics), never counted apart. A gunicorn worker is one vLLM
engine: `engine` is its slot. What we do not measure is not served (README, "vLLM's metric names").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nanoqwen.engine.step_counts import ITERATION_TOKENS_BUCKETS

# vLLM's FinishReason strings but `repetition` (never ours); `error`: a request that failed part way
FINISH_REASONS = ("stop", "length", "abort", "error")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's CacheConfig fields we have the meaning of (the engine's stats key -> the label): the others (memory
# utilisation, swap space, CPU blocks, ...) are left out
CACHE_CONFIG = {"block_size": "block_size", "kv_blocks": "num_gpu_blocks", "prefix_caching": "enable_prefix_caching"}
# vLLM's cache_dtype for a KV cache of the model's own dtype, as ours always is (nanoqwen.runner's k_cache, v_cache)
CACHE_DTYPE = "auto"
# vLLM's 1-2-5 token buckets end at max_model_len; these are made before the model (and its context) is loaded
TOKENS_MAX = 200_000
# engine counts served cumulatively (nanoqwen.engine.Engine.stats) -> vLLM's counter of them
ENGINE_COUNTERS = {
    "preemptions": ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    "prefix_cache_queried_tokens": ("vllm:prefix_cache_queries",
                                    "Prefix cache queries, in terms of number of queried tokens."),
    "prefix_cache_hit_tokens": ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    "spec_decode_num_drafts": ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
    "spec_decode_num_draft_tokens": ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens."),
    "spec_decode_num_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens."),
}


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's build_1_2_5_buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


TOKEN_BUCKETS = buckets_1_2_5(TOKENS_MAX)
# a served request's histograms that only vLLM's names have: its figure's name (each choice's, as vLLM's child
# requests, but n and the most tokens of a choice, once a request: nanoqwen.api.metrics.RequestTrace.figures) -> (the
# series, help, buckets)
PER_REQUEST = {
    "e2e": ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS),
    "prompt_tokens": ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS),
    "generation_tokens": ("vllm:request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS),
    "max_num_generation_tokens": ("vllm:request_max_num_generation_tokens",
                                  "Histogram of maximum number of requested generation tokens.", TOKEN_BUCKETS),
    "n": ("vllm:request_params_n", "Histogram of the n request parameter.", (1, 2, 5, 10, 20)),
    "max_tokens": ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", TOKEN_BUCKETS),
    "time_per_output_token": ("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS),
    "queued": ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
               REQUEST_LATENCY_BUCKETS),
    "prefill": ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                REQUEST_LATENCY_BUCKETS),
    "decode": ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
               REQUEST_LATENCY_BUCKETS),
    "inference": ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
                  REQUEST_LATENCY_BUCKETS),
}


class VllmMetrics:
    """One worker's `vllm:*` series, every one made here (their maps never grow: nanoqwen.api.metric_maps)."""

    def __init__(self, registry: CollectorRegistry, model_name: str, engine: int) -> None:
        labels = ("model_name", "engine")
        values = (model_name, str(engine))

        def gauge(name: str, help: str) -> Gauge:
            # a slot's series is its live worker's alone: "livesum" drops a dead one's, and adds no pid label
            return Gauge(name, help, labels, registry=registry, multiprocess_mode="livesum").labels(*values)

        def counter(name: str, help: str) -> Counter:
            return Counter(name, help, labels, registry=registry).labels(*values)

        def histogram(name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help, labels, registry=registry, buckets=buckets).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.engine_counts = {key: counter(name, help) for key, (name, help) in ENGINE_COUNTERS.items()}
        self.prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generated = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*labels, "finished_reason"], registry=registry)
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        self.per_request = {figure: histogram(*made) for figure, made in PER_REQUEST.items()}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS)
        # vLLM's info gauge: no model_name label; made once the engine's configuration is known (its first publish)
        self._cache_info = Gauge("vllm:cache_config_info", "Information of the LLMCache",
                                 [*CACHE_CONFIG.values(), "cache_dtype", "engine"], registry=registry,
                                 multiprocess_mode="livesum")
        self._engine = str(engine)
        self._cache_info_set = False
        self._engine_seen = dict.fromkeys(ENGINE_COUNTERS, 0)
        self._steps_seen = [0] * (len(self.iteration_tokens._buckets) + 1)  # each bucket's count, then the tokens

    def set_engine(self, engine: dict) -> None:
        """The engine's counts' growth since the last publish into the counters (its gauges: set with ours, Fanned)."""
        for key, counter in self.engine_counts.items():
            _add_growth(counter, self._engine_seen, key, engine.get(key, 0))
        self._add_steps(engine.get("step_buckets", ()), engine.get("step_tokens", 0))
        if not self._cache_info_set and "kv_blocks" in engine:
            self._cache_info.labels(*(str(engine[key]) for key in CACHE_CONFIG), CACHE_DTYPE, self._engine).set(1)
            self._cache_info_set = True

    def _add_steps(self, buckets: Sequence[int], tokens: int) -> None:
        """The engine's steps since the last publish into iteration_tokens: its buckets' counts (on these bounds:
        nanoqwen.engine.step_counts) and their tokens, what grew of each (what Histogram.observe does a step)."""
        histogram = self.iteration_tokens
        for bucket, count in enumerate(buckets):
            _add_growth(histogram._buckets[bucket], self._steps_seen, bucket, count)
        _add_growth(histogram._sum, self._steps_seen, len(self._steps_seen) - 1, tokens)


def _add_growth(value: Any, seen: list[int] | dict[str, int], key: Any, total: int) -> None:
    """What a running total grew by since it was last seen (seen[key]) added to `value` (a counter, a histogram's
    bucket or sum: what has `inc`); nothing where it did not grow."""
    if total > seen[key]:
        value.inc(total - seen[key])
        seen[key] = total
