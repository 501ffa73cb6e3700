"""Serving statistics for `/stats` (JSON) and `/metrics` (Prometheus text format).

Everything here is touched only by greenlets of one worker, so it needs no locks. Engine-side
numbers (queue, KV usage, prefix cache) are read from `engine.stats()` into gauges whenever the
worker publishes (on each scrape, and every PUBLISH_S under gunicorn, where other workers' scrapes
read them: see nanoqwen.api.shared_stats).
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import functools
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanoqwen.api import metric_maps
from nanoqwen.api.errors import APIError
from nanoqwen.api.metric_archive import FoldedCollector
from nanoqwen.api.metrics_vllm import ITL_BUCKETS, PER_REQUEST, TTFT_BUCKETS, VllmMetrics
from nanoqwen.api.offload import NativePool, run_or_503
from nanoqwen.api.shared_stats import MULTIPROC_ENV, SPEC_DECODE_COUNTS, SharedStats, aggregate
from nanoqwen.engine.request import Event, Usage
from nanoqwen.placement import SLOT_ENV

SAMPLES = 10_000  # latency samples kept for the percentiles
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OUTCOMES = ("served", "aborted", "failed")
NAME_FILTER = "name[]"  # /metrics' query: the sample names kept (prometheus-client's exposition reads the same)
SCRAPES_PENDING = 4  # scrapes reading the maps at once (one) or waiting; past it a 503 `queue_full`
EngineStats = Callable[[], dict[str, Any] | None]

if os.environ.get(MULTIPROC_ENV):  # the only mode with maps
    metric_maps.install()  # before any metric is made
# prometheus-client's own fields, which PendingHistogram adds to: fail at the worker's boot, not at a publish
if not {"_sum", "_buckets", "_upper_bounds"} <= set(Histogram._metric_init.__code__.co_names):
    raise RuntimeError("prometheus-client's Histogram has no _sum, _buckets and _upper_bounds")


def percentiles(values: Collection[float], qs: Sequence[float]) -> list[float]:
    """Nearest-rank percentiles (each q in 0..100), 0.0 for no samples. One partial sort for them all: a whole sort of
    SAMPLES floats per percentile was up to ~2 ms, four a publish (every PUBLISH_S, on the hub, holding the GIL)."""
    if not values:
        return [0.0] * len(qs)
    n = len(values)
    ranks = [max(1, int(-(-n * q // 100))) - 1 for q in qs]  # ceil
    ordered = np.partition(np.fromiter(values, float, n), ranks)
    return [float(ordered[rank]) for rank in ranks]


def percentile(values: Collection[float], q: float) -> float:
    """One nearest-rank percentile (`percentiles`)."""
    return percentiles(values, (q,))[0]


@functools.cache
def _union(layouts: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
    """The buckets' bounds of all these layouts together: made once a measurement, not at each publish's new
    PendingMetrics (eleven unions and their tables were ~75-100 us of a publish, on the hub)."""
    return (*sorted(set().union(*layouts)), math.inf)


@functools.cache
def _buckets_of(bounds: tuple[float, ...], upper_bounds: tuple[float, ...]) -> tuple[int, ...]:
    """The histogram's (its upper bounds, inf last) bucket of each bucket of the union `bounds`. Each of its bounds
    must be one of the union's: a union bucket would straddle two of its own."""
    if not set(upper_bounds) <= set(bounds):
        raise ValueError(f"a histogram's bounds {upper_bounds} are not all among its pending ones {bounds}")
    return tuple(bisect.bisect_left(upper_bounds, bound) for bound in bounds)


class PendingHistogram:
    """Observations counted here and added to Prometheus histograms at a publish, their buckets' counts at once (what
    Histogram.observe does one observation at a time: the sum, and the first bucket whose bound holds it): one
    histogram a bucket layout, each of the same observations (ours and vLLM's, nanoqwen.api.metrics_vllm). Counted in
    the buckets of all their bounds together, each within one bucket of every layout: one search an observation. Each
    histogram's buckets are taken from the histogram itself (its layout decided where it is made), which must be one
    of these layouts."""

    def __init__(self, *layouts: Sequence[float]) -> None:
        self._bounds = _union(tuple(map(tuple, layouts)))
        self._sum = 0.0
        self._counts = [0] * len(self._bounds)

    def observe(self, value: float) -> None:
        self._sum += value
        self._counts[bisect.bisect_left(self._bounds, value)] += 1

    def add_to(self, histograms: Fanned) -> None:
        if not any(self._counts):
            return
        for histogram in histograms.metrics:
            histogram._sum.inc(self._sum)
            for bucket, count in zip(_buckets_of(self._bounds, tuple(histogram._upper_bounds)), self._counts,
                                     strict=True):
                if count:
                    histogram._buckets[bucket].inc(count)

    def clear(self) -> None:
        self._sum = 0.0
        self._counts[:] = [0] * len(self._counts)


class Fanned:
    """One measurement's metrics under each name (ours, vLLM's): an update goes to each."""

    def __init__(self, *metrics: Any) -> None:
        self.metrics = metrics

    def inc(self, amount: float) -> None:
        for metric in self.metrics:
            metric.inc(amount)

    def observe(self, value: float) -> None:
        for metric in self.metrics:
            metric.observe(value)

    def set(self, value: float) -> None:
        for metric in self.metrics:
            metric.set(value)


@dataclass
class Served:
    """A served request's figures for its own metrics (the HTTP request's)."""

    prompt_tokens: int
    seconds: float


@dataclass
class Submitted:
    """What a request asked the engine for (vLLM's request_params histograms): n choices of each prompt (`prompts`,
    their token counts: choice i is prompt i // n's), and when (time.perf_counter): its submission, and the scheduling
    of its first prefill chunk (set by the engine thread; None until then)."""

    n: int
    max_tokens: int | None
    prompts: list[int]
    at: float = field(default_factory=time.perf_counter)
    admitted: float | None = None

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)


@dataclass
class PendingMetrics:
    """What requests recorded since the last publish, for the Prometheus metrics: the per-token counts (each update of
    a multiprocess-mode metric is a locked mmap write: two a streamed token were a fifth of the hub's time per token),
    and the per-request ones while the worker's maps cannot be made (PrometheusMetrics)."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    finish_reasons: collections.Counter[str] = field(default_factory=collections.Counter)  # vLLM's request_success
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: PendingHistogram = field(default_factory=lambda: PendingHistogram(LATENCY_BUCKETS, TTFT_BUCKETS))
    itl: PendingHistogram = field(default_factory=lambda: PendingHistogram(LATENCY_BUCKETS, ITL_BUCKETS))
    e2e: PendingHistogram = field(default_factory=lambda: PendingHistogram(LATENCY_BUCKETS))
    per_request: dict[str, PendingHistogram] = field(
        default_factory=lambda: {figure: PendingHistogram(buckets) for figure, (_, _, buckets) in PER_REQUEST.items()})

    def count(self, outcome: str, reasons: collections.Counter[str], served: Served | None = None) -> None:
        self.outcomes[outcome] += 1
        self.finish_reasons.update(reasons)
        if served is None:
            return
        self.prompt_tokens += served.prompt_tokens
        self.e2e.observe(served.seconds)

    def clear(self) -> None:
        """Emptied in place once added (made anew, each publish remade its histograms' tables: ~0.1 ms)."""
        self.outcomes.clear()
        self.finish_reasons.clear()
        self.prompt_tokens = self.generated_tokens = 0
        for histogram in (self.ttft, self.itl, self.e2e, *self.per_request.values()):
            histogram.clear()


class PrometheusMetrics:
    """One worker's Prometheus metrics. Made at its first publish, not with ServerStats: under gunicorn each lives in
    a map in the run directory, which cannot be made where the disk is full (OSError: nanoqwen.api.metric_maps); the
    worker serves all the same, keeps what its requests record pending and makes them again at the next publish.
    Every series is made here, so adding to them later writes into reserved pages only."""

    # the maps of the metrics below: prometheus-client's file per metric type, a gauge's per multiprocess mode
    MAPS = ("counter", "histogram", "gauge_livesum", "gauge_liveall")

    def __init__(self, model_name: str = "", engine: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.vllm = VllmMetrics(self.registry, model_name, engine)
        self.requests = Counter("nanoqwen_requests", "Finished chat completions by outcome", ["outcome"],
                                registry=self.registry)
        self.outcomes = {outcome: self.requests.labels(outcome) for outcome in OUTCOMES}
        self.prompt = Fanned(Counter("nanoqwen_prompt_tokens", "Prompt tokens of served requests",
                                     registry=self.registry), self.vllm.prompt)
        self.generated = Fanned(Counter("nanoqwen_generation_tokens", "Generated tokens", registry=self.registry),
                                self.vllm.generated)
        self.ttft = Fanned(Histogram("nanoqwen_time_to_first_token_seconds", "Time to first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry), self.vllm.ttft)
        self.itl = Fanned(Histogram("nanoqwen_inter_token_latency_seconds", "Time between tokens of a choice",
                                    buckets=LATENCY_BUCKETS, registry=self.registry), self.vllm.itl)
        self.e2e = Fanned(Histogram("nanoqwen_request_duration_seconds", "Arrival to last token",
                                    buckets=LATENCY_BUCKETS, registry=self.registry))
        self.per_request = {figure: Fanned(histogram) for figure, histogram in self.vllm.per_request.items()}
        # Under gunicorn's multiprocess mode "live*" gauges combine the live workers' values.
        self.ready = Gauge("nanoqwen_model_ready", "Workers with the model loaded", registry=self.registry,
                           multiprocess_mode="livesum")
        self.queue = Fanned(Gauge("nanoqwen_queue_length", "Requests waiting for a batch slot",
                                  registry=self.registry, multiprocess_mode="livesum"), self.vllm.waiting)
        self.active = Fanned(Gauge("nanoqwen_active_requests", "Requests being generated", registry=self.registry,
                                   multiprocess_mode="livesum"), self.vllm.running)
        self.preempt = Gauge("nanoqwen_preemptions", "Sequences preempted for lack of KV blocks (live workers)",
                             registry=self.registry, multiprocess_mode="livesum")
        self.kv = Fanned(Gauge("nanoqwen_kv_cache_usage", "Fraction of KV-cache blocks in use (0..1), per worker",
                               registry=self.registry, multiprocess_mode="liveall"), self.vllm.kv)
        self.hit = Gauge("nanoqwen_prefix_cache_hit_rate", "Prefix-cache hits / queries, per worker",
                         registry=self.registry, multiprocess_mode="liveall")
        self.spec = {key: Gauge(f"nanoqwen_{key}", help, registry=self.registry, multiprocess_mode="livesum")
                     for key, help in SPEC_DECODE_COUNTS.items()}

    def add(self, pending: PendingMetrics) -> None:
        for outcome, count in pending.outcomes.items():
            self.outcomes[outcome].inc(count)
        for reason, count in pending.finish_reasons.items():
            self.vllm.success[reason].inc(count)
        if pending.prompt_tokens:
            self.prompt.inc(pending.prompt_tokens)
        if pending.generated_tokens:
            self.generated.inc(pending.generated_tokens)
        pending.ttft.add_to(self.ttft)
        pending.itl.add_to(self.itl)
        pending.e2e.add_to(self.e2e)
        for figure, histogram in pending.per_request.items():
            histogram.add_to(self.per_request[figure])

    def count(self, outcome: str, reasons: collections.Counter[str], served: Served | None = None) -> None:
        self.outcomes[outcome].inc()
        for reason, count in reasons.items():
            self.vllm.success[reason].inc(count)
        if served is None:
            return
        if served.prompt_tokens:
            self.prompt.inc(served.prompt_tokens)
        self.e2e.observe(served.seconds)

    def set_engine(self, engine: dict[str, Any] | None) -> None:
        self.ready.set(float(engine is not None))
        engine = engine or {}
        self.queue.set(engine.get("queue_length", 0))
        self.active.set(engine.get("active_requests", 0))
        self.preempt.set(engine.get("preemptions", 0))
        self.kv.set(engine.get("kv_usage", 0.0))
        self.hit.set(engine.get("prefix_cache_hit_rate", 0.0))
        for key, gauge in self.spec.items():
            gauge.set(engine.get(key, 0))
        self.vllm.set_engine(engine)


@dataclass
class ChoiceTrace:
    """One choice's tokens, their arrivals and its finish, as its request's greenlet reads them (time.perf_counter)."""

    tokens: int = 0
    first_token: float | None = None
    last_token: float = 0.0
    finished: float | None = None
    reason: str | None = None  # the engine's finish reason


class RequestTrace:
    """Timing of one request, fed with its events as the request greenlet reads them."""

    def __init__(self, stats: ServerStats, start: float) -> None:
        self._stats = stats
        self.start = start
        self.first_token: float | None = None  # any choice's
        self.tokens = 0
        self.choices: dict[int, ChoiceTrace] = {}  # by choice index

    def on_event(self, event: Event) -> None:
        if not event.token_ids and event.finish_reason is None:
            return
        now = time.perf_counter()
        choice = self.choices.get(event.index)
        if choice is None:
            choice = self.choices[event.index] = ChoiceTrace()
        if event.token_ids:
            self._on_tokens(choice, len(event.token_ids), now)
        if event.finish_reason is not None:
            choice.finished, choice.reason = now, event.finish_reason

    def _on_tokens(self, choice: ChoiceTrace, count: int, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
            self._stats.record_ttft(now - self.start)
        if choice.first_token is None:
            choice.first_token = now
            itl = None
        else:
            itl = (now - choice.last_token) / count
        choice.last_token = now
        choice.tokens += count
        self.tokens += count
        self._stats.record_tokens(count, now, itl)

    def reasons(self, choices: int, unfinished: str) -> collections.Counter[str]:
        """vLLM's finished_reason of each of `choices` choices: a finished one's, `unfinished` for the others."""
        reasons = collections.Counter(choice.reason for choice in self.choices.values() if choice.reason is not None)
        reasons[unfinished] += choices - reasons.total()
        return +reasons

    def figures(self, submitted: Submitted) -> list[tuple[str, float]]:
        """The observations of vLLM's per-request histograms: each choice's, as vLLM's child requests of an n > 1
        request (nanoqwen.api.metrics_vllm.PER_REQUEST), and n and the most tokens of a choice once a prompt (vLLM's
        ParentRequest: its completions endpoint makes one a prompt). A choice's times: queued from the submission
        until the first prefill chunk is scheduled (the same for them all), prefill until its first token, decode from
        that token to its last, inference from the scheduling to its last token; one with no token (echo with
        max_tokens 0) observed in each all the same, as vLLM observes every finished request: 0 for the phases it
        never reached, the one it ended in until its end."""
        most = [0] * len(submitted.prompts)
        for index, choice in self.choices.items():
            most[index // submitted.n] = max(most[index // submitted.n], choice.tokens)
        figures: list[tuple[str, float]] = [("n", submitted.n) for _ in most]
        figures += [("max_num_generation_tokens", tokens) for tokens in most]
        for index, choice in self.choices.items():
            end = choice.finished or choice.last_token
            figures += [("e2e", end - self.start), ("prompt_tokens", submitted.prompts[index // submitted.n]),
                        ("generation_tokens", choice.tokens)]
            if submitted.max_tokens is not None:  # vLLM's, never unset, is the context's room: not asked for here
                figures.append(("max_tokens", submitted.max_tokens))
            figures += [(figure, value) for figure, value in _phases(submitted, choice, end).items()]
        return figures


def _phases(submitted: Submitted, choice: ChoiceTrace, end: float) -> dict[str, float]:
    """A choice's time in each of vLLM's phases, and its time per output token, until its `end`."""
    scheduled, first = submitted.admitted, choice.first_token
    if scheduled is None:  # never scheduled: queued to its end
        return {"time_per_output_token": 0.0, "queued": end - submitted.at, "prefill": 0.0, "decode": 0.0,
                "inference": 0.0}
    if first is None:  # scheduled, no token: in prefill to its end
        return {"time_per_output_token": 0.0, "queued": scheduled - submitted.at, "prefill": end - scheduled,
                "decode": 0.0, "inference": end - scheduled}
    decode = choice.last_token - first
    return {"time_per_output_token": decode / (choice.tokens - 1) if choice.tokens > 1 else 0.0,
            "queued": scheduled - submitted.at, "prefill": first - scheduled, "decode": decode,
            "inference": choice.last_token - scheduled}


class ServerStats:
    def __init__(self, engine_stats: EngineStats, shared: SharedStats | None = None, model_name: str = "") -> None:
        self._engine_stats = engine_stats
        self._shared = shared
        self._model_name = model_name  # vLLM's series' `model_name` label
        self.started = time.time()
        # whether this worker accepts connections with its model loaded: nanoqwen.worker's, for its respawned siblings
        # (None, unknown, in an app it does not run)
        self.serving: Callable[[], bool | None] = lambda: None
        self.requests_served = 0
        self.requests_aborted = 0
        self.requests_failed = 0
        self.total_tokens_generated = 0
        self.total_prompt_tokens = 0
        self._response_time_total = 0.0
        self._ttft: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._itl: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_count = 0  # the tokens in _recent_tokens, kept as they come and go (was summed at each publish)

        self._pending = PendingMetrics()
        self._metrics: PrometheusMetrics | None = None
        # the workers' maps read by a scrape, off the event loop: a burst of worker deaths lists many maps, re-read
        # while the master folds them (metric_archive.FoldedCollector): ~2 s with 100 dead workers' maps, which held
        # every stream and /health (profiles/bench_scrape_churn.py)
        self._scrapes = NativePool(1, SCRAPES_PENDING, jobs="scrapes are already reading the metrics")

    def begin(self) -> RequestTrace:
        return RequestTrace(self, time.perf_counter())

    def _requests(self) -> PrometheusMetrics | PendingMetrics:
        """Where a request's own counts go: into the metrics once made (a few locked writes a request, which a worker
        SIGKILLed before its next publish leaves in its maps), pending before."""
        return self._pending if self._metrics is None else self._metrics

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)
        self._requests().ttft.observe(seconds)

    def record_tokens(self, count: int, now: float, itl: float | None) -> None:
        """`count` tokens of a choice arrived at `now`; `itl`: the time between them and its previous ones (None for
        its first)."""
        if itl is not None:
            self._itl.append(itl)
            self._pending.itl.observe(itl)
        self._recent_tokens.append((now, count))
        self._recent_count += count
        self._pending.generated_tokens += count
        self._drop_old_tokens(now)

    def _drop_old_tokens(self, now: float) -> None:
        recent = self._recent_tokens
        while recent and recent[0][0] < now - RATE_WINDOW_S:
            self._recent_count -= recent.popleft()[1]

    def finish(self, trace: RequestTrace, usage: Usage, submitted: Submitted) -> None:
        elapsed = time.perf_counter() - trace.start
        self.requests_served += 1
        self.total_tokens_generated += usage.completion_tokens
        self.total_prompt_tokens += usage.prompt_tokens
        self._response_time_total += elapsed
        reasons = trace.reasons(submitted.choices, "error")
        self._requests().count("served", reasons, Served(usage.prompt_tokens, elapsed))
        # vLLM's per-choice series (~9 observations a choice, up to MAX_CHOICES): pending, as the per-token ones
        for figure, value in trace.figures(submitted):
            self._pending.per_request[figure].observe(value)

    def abort(self, trace: RequestTrace, submitted: Submitted) -> None:
        """vLLM's: each choice not finished an abort (vLLM aborts each child request)."""
        self.requests_aborted += 1
        self.total_tokens_generated += trace.tokens
        self._requests().count("aborted", trace.reasons(submitted.choices, "abort"))

    def fail(self, trace: RequestTrace, submitted: Submitted) -> None:
        self.requests_failed += 1
        self.total_tokens_generated += trace.tokens
        self._requests().count("failed", trace.reasons(submitted.choices, "error"))

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        self._drop_old_tokens(now)
        return self._recent_count / RATE_WINDOW_S

    def snapshot(self, engine: dict[str, Any] | None = None) -> dict[str, Any]:
        """This worker's figures; `engine`: its engine's stats, where the caller has them (read anew where not)."""
        engine = (engine if engine is not None else self._engine_stats()) or {}
        ms = 1000.0
        ttft_p50, ttft_p99 = percentiles(self._ttft, (50, 99))
        itl_p50, itl_p99 = percentiles(self._itl, (50, 99))
        return {
            "requests_served": self.requests_served,
            "total_tokens_generated": self.total_tokens_generated,
            "average_response_time": (self._response_time_total / self.requests_served
                                      if self.requests_served else 0.0),
            "queue_length": engine.get("queue_length", 0),
            "active_requests": engine.get("active_requests", 0),
            "requests_aborted": self.requests_aborted,
            "requests_failed": self.requests_failed,
            "total_prompt_tokens": self.total_prompt_tokens,
            "tokens_per_second": self.tokens_per_second(),
            "ttft_p50_ms": ttft_p50 * ms,
            "ttft_p99_ms": ttft_p99 * ms,
            "itl_p50_ms": itl_p50 * ms,
            "itl_p99_ms": itl_p99 * ms,
            "kv_cache_usage": engine.get("kv_usage", 0.0),
            "prefix_cache_hit_rate": engine.get("prefix_cache_hit_rate", 0.0),
            "preemptions": engine.get("preemptions", 0),
            **{key: engine.get(key, 0) for key in SPEC_DECODE_COUNTS},
            "spec_decode_acceptance_rate": engine.get("spec_decode_acceptance_rate", 0.0),
            "engine_tokens_generated": engine.get("tokens_generated", 0),  # aborted requests' included
            "graph_compiles": engine.get("graph_compiles", 0),
            "grammars_cached": engine.get("grammars_cached", 0),
            "grammar_cache_bytes": engine.get("grammar_cache_bytes", 0),
            "uptime": time.time() - self.started,
            "pid": os.getpid(),
            "slot": 0 if self._shared is None else self._shared.slot,
            "serving": self.serving(),
        }

    def _made_metrics(self) -> PrometheusMetrics:
        """Raises OSError where the metrics' maps cannot all be reserved (a full disk, the run directory gone): then
        no metric is made."""
        if self._metrics is None:
            if os.environ.get(MULTIPROC_ENV):
                metric_maps.reserve_maps(os.environ[MULTIPROC_ENV], PrometheusMetrics.MAPS)
            self._metrics = PrometheusMetrics(self._model_name, int(os.environ.get(SLOT_ENV, "0")))
        return self._metrics

    def flush_metrics(self) -> None:
        """What requests recorded since the last publish into the metrics, where they are made: at a worker's exit."""
        if self._metrics is not None:
            self._metrics.add(self._pending)
            self._pending.clear()

    def publish(self) -> dict[str, Any]:
        """What requests recorded and the engine's numbers into the metrics, and this worker's snapshot to the other
        workers; returns the snapshot. Raises OSError where the metrics cannot be made or the snapshot cannot be
        written, having tried both."""
        engine = self._engine_stats()  # once: a copy of the engine's counts
        snapshot = self.snapshot(engine)
        try:
            self._made_metrics().set_engine(engine)
            self.flush_metrics()
        finally:
            if self._shared is not None:
                self._shared.publish(snapshot)
        return snapshot

    def _asked(self, question: Callable[[SharedStats], bool], otherwise: bool) -> bool:
        """The run directory's answer to `question`; `otherwise` without one, or where it cannot be read."""
        if self._shared is None:
            return otherwise
        try:
            return question(self._shared)
        except OSError:
            return otherwise

    def another_serves(self) -> bool:
        """Whether another worker of this server accepts connections with its model loaded
        (SharedStats.another_serves); False without a run directory, or where it cannot be read."""
        return self._asked(SharedStats.another_serves, False)

    def may_restart(self) -> bool:
        """Whether this worker may restart at --max-requests now: another worker serves and no other's restart is
        under way (SharedStats.take_restart_turn). True without a run directory, or where it cannot be read: it
        restarts as a lone worker does."""
        return self._asked(lambda shared: shared.another_serves() and shared.take_restart_turn(), True)

    def report(self) -> dict[str, Any]:
        """`/stats`: the server's totals and a per-worker list: this worker's figures live, the others' as they last
        published them. A snapshot or metrics of this worker's that cannot be written (the worker's loop logs it) does
        not keep the others' figures from a reader."""
        try:
            workers = [self.publish()]
        except OSError:
            workers = [self.snapshot()]
        if self._shared is not None:
            with _unavailable_on_os_error():
                workers = sorted([*self._shared.others(), *workers], key=lambda w: w["slot"])
        return {**aggregate(workers), "workers": workers}

    def prometheus(self, names: Sequence[str] | None = None) -> bytes:
        """The exposition; where `names` are given, only the samples of those names (prometheus-client's restricted
        registry: its own `name[]` filter, which keeps a multiprocess collector's too)."""
        with contextlib.suppress(OSError):  # the snapshot's write, which the worker's loop logs: the gauges are set
            self.publish()
        with _unavailable_on_os_error():
            metrics = self._made_metrics()  # where it cannot be, a scrape would miss this worker's counts: a 503
            directory = os.environ.get(MULTIPROC_ENV)
            if directory:
                return run_or_503(self._scrapes, _maps_exposition, directory, names)
            return _exposition(metrics.registry, names)


def _exposition(registry: CollectorRegistry, names: Sequence[str] | None) -> bytes:
    return generate_latest(registry if names is None else registry.restricted_registry(names))


def _maps_exposition(directory: str, names: Sequence[str] | None) -> bytes:
    """Every worker's metrics, read from the maps of `directory` (a native thread's work: ServerStats.prometheus)."""
    registry = CollectorRegistry(support_collectors_without_names=True)  # kept by a restricted one
    try:
        FoldedCollector(registry, directory)
    except ValueError as exc:  # prometheus-client's where the directory is not one (gone): not an OSError
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from exc
    return _exposition(registry, names)


@contextlib.contextmanager
def _unavailable_on_os_error() -> Iterator[None]:
    """The workers' shared files (snapshots, metrics' maps) that cannot be read or written (a full disk, a run
    directory gone): a 503 that says so."""
    try:
        yield
    except OSError as exc:
        raise APIError(503, f"The server's statistics are unavailable: {exc.strerror or exc}", type="server_error",
                       code="stats_unavailable") from exc
