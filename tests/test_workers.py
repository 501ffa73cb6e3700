"""`--workers N` on one host: a slot (device / CPU share) per worker kept across respawns, and /stats
and /metrics that add up every worker, through a real gunicorn."""
from __future__ import annotations

import os
import select
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socket import create_connection
from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

import gevent
import openai
import pytest
import requests
from gevent import socket

from chat_http import metric, vllm_samples, wait_logged
from nanoqwen import worker
from nanoqwen.api import shared_stats
from nanoqwen.api.shared_stats import aggregate
from nanoqwen.placement import cpu_share, lowest_free_slot, worker_device
from nanoqwen.settings import EngineConfig, env_setting
from server_process import GunicornServer, copy_maps_as_dead, worker_run_dir

MODEL = "qwen3-0.6b"
CPU = {"NANOQWEN_DEVICE": "cpu", "NANOQWEN_DTYPE": "float32", "NANOQWEN_MAX_MODEL_LEN": "256"}
REQUESTS = 12
MAX_TOKENS = 6
DEAD_WORKERS = 200  # their maps read by each scrape: ~0.4-1 s of reading on 2 loaded cores
DEAD_PID = 10**9  # above any pid_max: never a live worker's


def test_lowest_free_slot_reuses_a_dead_workers_slot():
    assert lowest_free_slot(set()) == 0
    assert lowest_free_slot({1, 2}) == 0
    assert lowest_free_slot({0, 2}) == 1


def test_heartbeat_dir_is_dev_shm_only_where_it_is_writable_with_room(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_stats, "RAM_DIR", tmp_path)
    assert shared_stats.heartbeat_dir() == str(tmp_path)
    monkeypatch.setattr(shared_stats, "RAM_DIR", tmp_path / "missing")
    assert shared_stats.heartbeat_dir() is None
    monkeypatch.setattr(shared_stats, "RAM_DIR", tmp_path)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    monkeypatch.setattr(shared_stats, "HEARTBEAT_MIN_FREE", free + (1 << 30))  # as good as full
    assert shared_stats.heartbeat_dir() is None
    monkeypatch.setattr(shared_stats, "HEARTBEAT_MIN_FREE", 0)
    for files, favail, where in ((0, 0, str(tmp_path)), (5, 0, None), (5, 1, str(tmp_path))):  # f_files 0: no limit
        fs = os.statvfs_result((4096, 4096, 100, 100, 100, files, favail, favail, 0, 255))
        monkeypatch.setattr(shared_stats.os, "statvfs", lambda path, fs=fs: fs)
        assert shared_stats.heartbeat_dir() == where, (files, favail)


def test_cpu_share_splits_the_cores_contiguously():
    cpus = [0, 1, 2, 3, 4, 5, 6]
    shares = [cpu_share(cpus, slot, 3) for slot in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [cpu_share([4, 7], slot, 3) for slot in range(3)] == [[4], [7], [4]]  # more workers than cores


def test_worker_device_round_robin_on_cuda_only_when_not_pinned():
    assert [worker_device("auto", slot, 2) for slot in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_device("cuda", 1, 4) == "cuda:1"
    assert worker_device("cuda:3", 0, 4) == "cuda:3" and worker_device("cpu", 1, 4) == "cpu"
    assert worker_device("auto", 1, 0) == "auto"


def test_an_empty_device_setting_is_the_default_as_unset():
    """post_fork places workers from it: an empty NANOQWEN_DEVICE passed as "" skipped the CUDA round-robin."""
    assert env_setting("device", {}) is None
    assert env_setting("device", {"NANOQWEN_DEVICE": ""}) is None
    assert env_setting("device", {"NANOQWEN_DEVICE": "cpu"}) == "cpu"
    assert EngineConfig.from_env({"NANOQWEN_DEVICE": ""}).device == EngineConfig.device


def test_aggregate_sums_counts_and_weights_the_mean():
    base = {"ttft_p50_ms": 0.0, "ttft_p99_ms": 0.0, "itl_p50_ms": 0.0, "itl_p99_ms": 0.0, "uptime": 1.0,
            "kv_cache_usage": 0.0, "prefix_cache_hit_rate": 0.0, "queue_length": 0, "active_requests": 0,
            "requests_aborted": 0, "requests_failed": 0, "total_prompt_tokens": 0, "tokens_per_second": 0.0,
            "preemptions": 0, "engine_tokens_generated": 0, "graph_compiles": 0, "spec_decode_num_drafts": 0,
            "grammars_cached": 0, "grammar_cache_bytes": 0}
    a = base | {"requests_served": 1, "total_tokens_generated": 5, "average_response_time": 1.0, "ttft_p99_ms": 9.0,
                "kv_cache_usage": 0.2, "spec_decode_num_draft_tokens": 10, "spec_decode_num_accepted_tokens": 2,
                "graph_compiles": 8, "grammar_cache_bytes": 1 << 20}
    b = base | {"requests_served": 3, "total_tokens_generated": 7, "average_response_time": 3.0, "ttft_p99_ms": 4.0,
                "kv_cache_usage": 0.4, "spec_decode_num_draft_tokens": 30, "spec_decode_num_accepted_tokens": 18,
                "graph_compiles": 4, "grammar_cache_bytes": 2 << 20}
    total = aggregate([a, b])
    assert (total["requests_served"], total["total_tokens_generated"], total["graph_compiles"]) == (4, 12, 12)
    assert total["grammar_cache_bytes"] == 3 << 20  # each worker's cache its own
    assert total["average_response_time"] == pytest.approx(2.5) and total["ttft_p99_ms"] == 9.0
    assert total["kv_cache_usage"] == pytest.approx(0.3)
    assert total["spec_decode_acceptance_rate"] == pytest.approx(0.5)  # 20 of 40, not the mean of the rates


def test_another_serves_only_where_a_sibling_published_so_lately(tmp_path: Path) -> None:
    """What a loading worker waits on: another slot's snapshot that says it serves, replaced within SERVING_FRESH_S
    (older: a stalled worker's, which accepts nothing either); its own and a stopping one's do not count."""
    shared_stats.stats_dir(tmp_path).mkdir()
    shared = shared_stats.SharedStats(tmp_path)
    snapshot = shared_stats.snapshot_path(tmp_path, os.getpid() + 1)
    shared_stats.snapshot_path(tmp_path, os.getpid()).write_text('{"serving": true}')
    assert not shared.another_serves()  # its own
    snapshot.write_text('{"serving": false}')
    assert not shared.another_serves()  # stopping, or loading
    snapshot.write_text('{"serving": true}')
    assert shared.another_serves()
    stale = time.time() - shared_stats.SERVING_FRESH_S - 1
    os.utime(snapshot, (stale, stale))
    assert not shared.another_serves()


def test_restarts_at_max_requests_take_turns(tmp_path: Path) -> None:
    """Two workers that reached their limits at once each saw the other serve, and both restarted: the first to take
    the turn holds it (till its exit), the second waits."""
    shared_stats.stats_dir(tmp_path).mkdir()
    first, second = shared_stats.SharedStats(tmp_path), shared_stats.SharedStats(tmp_path)
    assert first.take_restart_turn() and first.take_restart_turn()
    assert not second.take_restart_turn()


def test_a_reloads_worker_waits_for_its_predecessor_where_cuda_sizes_its_pool_and_not_for_ever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload's new worker waits for the old one of its slot only where its KV pool takes a share of the free memory
    (CUDA, neither size set); and one never seen gone (a pid reused, its snapshot's removal failed) holds it
    --graceful-timeout + PREDECESSOR_MARGIN_S, logged, not for ever."""
    monkeypatch.setenv(shared_stats.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(worker, "PREDECESSOR_MARGIN_S", 0.3)
    new = SimpleNamespace(alive=True, pid=2, nanoqwen_predecessors=(os.getpid(),), notify=lambda: None,
                          cfg=SimpleNamespace(graceful_timeout=0.2), log=Mock())
    for config, wait_s in ((EngineConfig(device="cuda:0"), 0.5), (EngineConfig(device="cpu"), 0.0),
                           (EngineConfig(device="cuda", kv_cache_memory=1e9), 0.0),
                           (EngineConfig(device="cuda", num_kv_blocks=64), 0.0)):
        start = time.monotonic()
        with gevent.Timeout(5, AssertionError(f"{config.device}: it waited for ever")):
            assert worker.NanoqwenWorker._wait_for_predecessors(new, config)
        assert wait_s <= time.monotonic() - start < wait_s + 0.4, config
    new.log.warning.assert_called_once()


def test_a_worker_held_at_its_limit_asks_each_publish_and_holds_under_timeout_0() -> None:
    """gunicorn's --timeout 0 means none: the hold's bound is then nanoqwen's default of it, not 0 (a restart at
    once, no hold). Each question reads the run directory on the serving worker's event loop: asked each PUBLISH_S
    (LOAD_POLL_S before: 10 times in 2 s)."""
    asked = []
    held = SimpleNamespace(alive=True, pid=2, cfg=SimpleNamespace(timeout=0), log=Mock(), _start_drain=Mock(),
                           _stats=SimpleNamespace(may_restart=lambda: asked.append(True) and False))
    waiting = gevent.spawn(worker.NanoqwenWorker._restart_when_another_serves, held)
    gevent.sleep(4 * shared_stats.PUBLISH_S)
    waiting.kill()
    assert held.alive and not held._start_drain.called
    assert 2 <= len(asked) <= 6, len(asked)
    held.cfg.timeout = shared_stats.PUBLISH_S  # its bound reached, no other serving: it says so, not that one serves
    gevent.spawn(worker.NanoqwenWorker._restart_when_another_serves, held).join(timeout=10)
    assert not held.alive and held._start_drain.called and held.log.warning.called
    assert not any("another worker serves" in str(call) for call in held.log.info.call_args_list)


def _get(srv: GunicornServer, path: str) -> requests.Response:
    response = requests.get(f"{srv.url}{path}", timeout=10)
    response.raise_for_status()
    return response


def _workers(srv: GunicornServer) -> dict[int, dict[str, Any]]:
    return {w["slot"]: w for w in _get(srv, "/stats").json()["workers"]}


def _both_ready(srv: GunicornServer) -> dict[int, dict[str, Any]]:
    """Once both workers have loaded and published: their /stats entries by slot."""
    wait_logged(lambda: metric(srv, "nanoqwen_model_ready") == 2.0, "both workers loaded", srv)
    return wait_logged(lambda: (w := _workers(srv)) and len(w) == 2 and w, "both workers published", srv)


def _vllm_series(srv: GunicornServer, name: str) -> dict[tuple[str | None, ...], float]:
    """A `vllm:` sample's value by its (engine, model_name, pid) labels (vLLM's `engine` a worker's slot; no pid label
    but a leftover's)."""
    samples = vllm_samples(_get(srv, "/metrics").text, "engine", "model_name", "pid")
    return {key[1:]: value for key, value in samples.items() if key[0] == name}


def _chat(srv: GunicornServer, i: int) -> int:
    # A connection per request: gunicorn's workers share the listening socket and take turns accepting.
    with requests.Session() as session:
        response = session.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": f"request {i}"}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0})
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def _lingered_s(writes_every_s: float | None) -> float:
    """How long worker.linger holds a connection whose client sends 1 KB every `writes_every_s` (None: once)."""
    server, client = socket.socketpair()

    def trickle() -> None:
        while True:
            client.sendall(b"x" * 1024)
            if writes_every_s is None:
                return
            gevent.sleep(writes_every_s)

    writer = gevent.spawn(trickle)
    start = time.monotonic()
    with gevent.Timeout(5, AssertionError("linger did not end")):
        worker.linger(server)
    writer.kill()
    server.close(), client.close()
    return time.monotonic() - start


def test_linger_ends_at_its_deadline_even_inside_a_wait_and_when_the_client_goes_quiet(monkeypatch):
    """A client trickling data holds the connection LINGER_S at most, also where the wait for its next write would
    run past the deadline (2 s writes against 0.5 s: 2 s before); one gone quiet, LINGER_IDLE_S (0.1 s against 5 s).
    Each upper bound lies halfway between the right wait and the wrong one: a load's pause is no defect."""
    monkeypatch.setattr(worker, "LINGER_S", 0.5)
    monkeypatch.setattr(worker, "LINGER_IDLE_S", 3.0)
    assert 0.45 < _lingered_s(2.0) < 1.25
    monkeypatch.setattr(worker, "LINGER_S", 5.0)
    monkeypatch.setattr(worker, "LINGER_IDLE_S", 0.1)
    assert 0.08 < _lingered_s(None) < 2.5


def test_two_workers_share_the_socket_add_up_respawn_into_their_slot_and_serve_unable_to_write_their_run_directory(
        tiny_checkpoint: Path, tmp_path: Path):
    """Two workers' counts add up and a killed one respawns into its slot; then, on the same server (one start of two
    workers, not two), _serve_unable_to_write_their_run_directory."""
    env = {"NANOQWEN_MODEL": str(tiny_checkpoint), **CPU}
    with GunicornServer(env, tmp_path / "gunicorn.log", args=("--workers", "2")) as srv:
        _share_the_socket_add_up_and_respawn_into_their_slot(srv)
        _serve_unable_to_write_their_run_directory(srv)


def _share_the_socket_add_up_and_respawn_into_their_slot(srv: GunicornServer) -> None:
    """From the server's start: every count is its requests'."""
    cpus = sorted(os.sched_getaffinity(0))
    workers = _both_ready(srv)
    assert sorted(workers) == [0, 1]
    shares = {slot: sorted(os.sched_getaffinity(w["pid"])) for slot, w in workers.items()}
    assert shares == {slot: cpu_share(cpus, slot, 2) for slot in (0, 1)}

    with ThreadPoolExecutor(REQUESTS) as pool:
        assert list(pool.map(lambda i: _chat(srv, i), range(REQUESTS))) == [MAX_TOKENS] * REQUESTS

    stats = wait_logged(lambda: (s := _get(srv, "/stats").json())["requests_served"] == REQUESTS and s,
                        "every worker's snapshot to include its requests", srv, timeout=10)
    per_worker = stats["workers"]
    assert all(w["requests_served"] > 0 for w in per_worker), per_worker  # both took requests
    for key in ("requests_served", "total_tokens_generated", "total_prompt_tokens"):
        assert stats[key] == sum(w[key] for w in per_worker)
    assert stats["total_tokens_generated"] == REQUESTS * MAX_TOKENS
    assert metric(srv, 'nanoqwen_requests_total{outcome="served"}') == REQUESTS
    assert metric(srv, "nanoqwen_generation_tokens_total") == REQUESTS * MAX_TOKENS
    # vLLM's series from the same counts, a series a worker as vLLM's per engine: both took requests
    generated = _vllm_series(srv, "vllm:generation_tokens_total")
    assert sorted(generated) == [(slot, MODEL, None) for slot in "01"]
    assert all(generated.values()) and sum(generated.values()) == REQUESTS * MAX_TOKENS
    assert sum(_vllm_series(srv, "vllm:request_success_total").values()) == REQUESTS
    assert sum(_vllm_series(srv, "vllm:e2e_request_latency_seconds_count").values()) == REQUESTS

    dead = workers[0]
    os.kill(dead["pid"], signal.SIGKILL)
    respawned = wait_logged(lambda: (w := _workers(srv)) and len(w) == 2 and w[0]["pid"] != dead["pid"] and w,
                            "slot 0 to come back", srv)
    assert sorted(os.sched_getaffinity(respawned[0]["pid"])) == shares[0]
    assert respawned[1]["pid"] == workers[1]["pid"]
    wait_logged(lambda: metric(srv, "nanoqwen_model_ready") == 2.0, "the respawned worker loaded", srv)
    # /stats covers the live workers; Prometheus counters keep what the dead one served.
    assert _get(srv, "/stats").json()["requests_served"] == per_worker[1]["requests_served"]
    assert metric(srv, 'nanoqwen_requests_total{outcome="served"}') == REQUESTS
    assert sum(_vllm_series(srv, "vllm:generation_tokens_total").values()) == REQUESTS * MAX_TOKENS
    # ... folded into one archive of each kind by the master (nanoqwen.api.metric_archive), its own maps gone
    maps = {path.name for path in (worker_run_dir(respawned[1]["pid"]) / "metrics").iterdir()}
    assert {"counter_folded_1_0.db", "histogram_folded_1_0.db"} <= maps
    assert not {f"counter_{dead['pid']}.db", f"histogram_{dead['pid']}.db"} & maps
    # a live gauge: one series a slot, the dead worker's gone (no pid label)
    assert sorted(_vllm_series(srv, "vllm:num_requests_running")) == \
        [(slot, MODEL, None) for slot in "01"]
    assert f"worker {respawned[0]['pid']}: slot 0, cpu on cores" in srv.log()


def _answered(srv: GunicornServer) -> str:
    """One chat request on a connection of its own (the workers take turns accepting): "served" or the 503's code."""
    with srv.openai_client() as client:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            return exc.code
    return "served"


def test_a_respawned_worker_stays_off_the_socket_while_its_sibling_serves(tiny_checkpoint: Path, tmp_path: Path):
    """Under --max-requests the workers split the requests and reach their limits within one load of each other, and a
    worker respawned beside a ready sibling accepted while its model loaded and, idle, first: it answered 503
    model_loading what its sibling would have served (lane scale43: 61 of 80 requests under --max-requests 8). Now a
    worker at its limit serves on while no other serves, restarts by turns, and a respawned one accepts once loaded: a
    steady client sees no model_loading through each worker's restart. On SIGHUP the old workers stop at once, so the
    new ones accept while they load, as before; they take the old ones' slots 0 and 1, and on the CPU load while an
    old one still drains a request (lane maxreq44fix: waiting for it, none accepted for the drain)."""
    env = {"NANOQWEN_MODEL": str(tiny_checkpoint), **CPU, "NANOQWEN_QUANT": "int8",  # a load of some seconds
           "NANOQWEN_BODY_TIMEOUT": "120"}  # the upload's
    args = ("--workers", "2", "--max-requests", "4", "--graceful-timeout", "90")  # the upload outlasts the reload
    with GunicornServer(env, tmp_path / "gunicorn.log", args=args) as srv:
        wait_logged(lambda: srv.log().count("ready: ") == 2, "both workers loaded", srv)  # polls would count
        answers, while_loading, deadline = [], 0, time.monotonic() + 300
        while srv.log().count("ready: ") < 3:  # the first respawned one's, the other held at its limit meanwhile
            assert time.monotonic() < deadline, f"no worker respawned: {Counter(answers)}\n{srv.log()}"
            log = srv.log()
            loading = log.rfind(worker.OFF_SOCKET) > log.rfind("ready: ")  # past its imports: where it accepted before
            answers.append(_answered(srv))
            while_loading += loading
        assert set(answers) == {"served"}, Counter(answers)
        assert while_loading >= 3, f"the respawned worker loaded before the client could reach it: {answers}"
        assert "reached --max-requests while no other worker serves" in srv.log()
        wait_logged(lambda: "Autorestarting worker: another worker serves" in srv.log(), "the held one's restart", srv)
        assert "restarting all the same" not in srv.log()  # not at its bound: once its sibling served

        old = {w["pid"] for w in _workers(srv).values()}
        # a request whose body is still coming: an old worker drains it for the whole reload
        upload = create_connection(("127.0.0.1", srv.port))
        upload.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: nanoqwen\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")
        time.sleep(1)  # read by a worker
        readies = srv.log().count("ready: ")  # the held worker's successor, if loaded, is stopped as an old one
        srv.hangup()
        health, deadline = [], time.monotonic() + 120
        with upload:
            while srv.log().count("ready: ") < readies + 2:  # both new ones'
                assert time.monotonic() < deadline, f"the new workers never loaded: {health}\n{srv.log()}"
                assert not select.select([upload], [], [], 0)[0], "the upload ended before the new workers loaded"
                response = requests.get(f"{srv.url}/health", timeout=60)  # during their imports: in the backlog
                health.append("healthy" if response.ok else response.json()["status"])
                serving = [w["slot"] for w in requests.get(f"{srv.url}/stats", timeout=60).json()["workers"]
                           if w["serving"]]
                assert len(serving) == len(set(serving)), serving  # a slot's old worker, draining, says it does not
        assert "loading" in health, health
        # the new workers take the old ones' slots: they took 2 and 3, and kept them (lane scale43)
        # the list as /stats gives it: by slot, a draining old worker and its successor would be one entry
        new = wait_logged(lambda: (w := _get(srv, "/stats").json()["workers"]) and len(w) == 2
                          and not old & {v["pid"] for v in w} and w, "the new workers published", srv)
        assert sorted(v["slot"] for v in new) == [0, 1]
        # a worker at its limit meanwhile (the polls count) is respawned into its slot: its metrics made anew
        wait_logged(lambda: sorted(_vllm_series(srv, "vllm:num_requests_running")) ==
                    [(slot, MODEL, None) for slot in "01"], "an engine label per slot", srv)


def test_preloaded_workers_still_get_their_own_slot(tiny_checkpoint: Path, tmp_path: Path):
    """--preload builds the app in the master, before any worker has a slot."""
    cpus = sorted(os.sched_getaffinity(0))
    env = {"NANOQWEN_MODEL": str(tiny_checkpoint), **CPU}
    with GunicornServer(env, tmp_path / "gunicorn.log", args=("--workers", "2", "--preload")) as srv:
        # a worker publishes its slot before its model loads: until then it answers 503 "loading"
        workers = _both_ready(srv)
        assert {slot: sorted(os.sched_getaffinity(w["pid"])) for slot, w in workers.items()} == \
            {slot: cpu_share(cpus, slot, 2) for slot in (0, 1)}
        assert _chat(srv, 0) == MAX_TOKENS
        # vLLM's `engine` label is the worker's slot, read when its metrics are made (after the fork)
        assert sorted(_vllm_series(srv, "vllm:kv_cache_usage_perc")) == \
            [(slot, MODEL, None) for slot in "01"]


def _serve_unable_to_write_their_run_directory(srv: GunicornServer) -> None:
    """Every worker's snapshot unwritable (a directory where its temporary file goes), their last ones readable:
    /stats answers each time, every worker in it (this worker's own figures live). Then a worker respawned into a run
    directory where its metrics' maps cannot be made (the metrics directory a file here; a full $TMPDIR alike: ENOSPC,
    where it was a SIGBUS): it boots and serves, /metrics answers 503 `stats_unavailable` at both workers; once the
    directory is back its maps are made with everything it recorded meanwhile. Counts as deltas from its start (the
    server has served and respawned before)."""
    workers = _both_ready(srv)
    served_before = _get(srv, "/stats").json()["requests_served"]  # the live workers'
    counted_before = metric(srv, 'nanoqwen_requests_total{outcome="served"}')  # the dead ones' too
    readies = srv.log().count("ready: model=")
    run_dir = worker_run_dir(workers[0]["pid"])
    blocked = [shared_stats.snapshot_path(run_dir, w["pid"]).with_suffix(".tmp") for w in workers.values()]
    for path in blocked:
        path.mkdir()
    time.sleep(3 * shared_stats.PUBLISH_S)
    for _ in range(10):
        response = requests.get(f"{srv.url}/stats", timeout=10)
        assert response.status_code == 200, response.text
        assert {w["slot"]: w["pid"] for w in response.json()["workers"]} == {0: workers[0]["pid"],
                                                                              1: workers[1]["pid"]}
    for path in blocked:
        path.rmdir()

    served = sum(_chat(srv, i) > 0 for i in range(2))
    # a worker's per-token counts since its last publish die with it
    wait_logged(lambda: _get(srv, "/stats").json()["requests_served"] == served_before + served,
                "both requests published", srv, timeout=10)
    metrics_dir = run_dir / "metrics"
    moved = metrics_dir.with_name("metrics.moved")
    metrics_dir.rename(moved)
    metrics_dir.write_text("not a directory")
    os.kill(workers[0]["pid"], signal.SIGKILL)
    respawned = wait_logged(lambda: (w := _workers(srv)) and w.get(0, workers[0])["pid"] != workers[0]["pid"] and w,
                            "slot 0 to come back", srv)[0]["pid"]
    wait_logged(lambda: srv.log().count("ready: model=") == readies + 1, "the respawned worker loaded", srv)
    with ThreadPoolExecutor(REQUESTS) as pool:
        assert list(pool.map(lambda i: _chat(srv, i), range(REQUESTS))) == [MAX_TOKENS] * REQUESTS
    served += REQUESTS
    for _ in range(10):
        response = requests.get(f"{srv.url}/metrics", timeout=10)
        # the respawned worker's maps cannot be made, the other's directory is not one: neither counts every worker
        assert (response.status_code, response.json()["error"]["code"]) == (503, "stats_unavailable"), response.text
    metrics_dir.unlink()
    moved.rename(metrics_dir)

    wait_logged(lambda: metric(srv, 'nanoqwen_requests_total{outcome="served"}') == counted_before + served,
                "every request counted, the respawned worker's included", srv, timeout=10)
    # the count above may be the sibling's alone (the respawned one took none of the requests): its maps are made
    # at its first publish since
    wait_logged(lambda: f'nanoqwen_kv_cache_usage{{pid="{respawned}"}}' in _get(srv, "/metrics").text,
                "the respawned worker's gauges", srv, timeout=10)
    # a scrape may make the maps before the worker's loop tries again and says so
    again = f"worker {respawned}: its statistics are published again"
    log = wait_logged(lambda: again in (log := srv.log()) and log, "the worker's loop to publish again", srv,
                      timeout=10)
    assert f"worker {respawned}: its statistics are not published" in log and "Traceback" not in log


def test_a_scrape_reads_the_maps_off_the_event_loop(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A scrape reading many maps (a burst of worker deaths: each scrape lists and reads their maps until the master
    has folded them; here DEAD_WORKERS maps that no master folds) leaves the worker's event loop to its other
    requests: a /health sent while the scrape reads is answered before the scrape. On the loop, /health waited for
    the whole read (~1-2 s), as every stream did. The scrape's `name[]` filter keeps its answer one small write."""
    env = {"NANOQWEN_MODEL": str(tiny_checkpoint), **CPU}
    with GunicornServer(env, tmp_path / "gunicorn.log") as srv:
        assert _chat(srv, 0) == MAX_TOKENS
        [worker] = wait_logged(lambda: (w := _workers(srv)) and w[0]["requests_served"] == 1 and w.values(),
                               "the request published", srv, timeout=10)

        def scraped() -> tuple[str, float]:
            return _get(srv, "/metrics?name[]=nanoqwen_requests_total").text, time.monotonic()

        dead = 0
        while True:  # maps enough that a scrape reads them for a while, whatever this host's speed
            copy_maps_as_dead(worker_run_dir(worker["pid"]) / "metrics", worker["pid"],
                              range(DEAD_PID + dead, DEAD_PID + dead + DEAD_WORKERS))
            dead += DEAD_WORKERS
            started = time.monotonic()
            text, scrape_ended = scraped()
            took = scrape_ended - started
            assert f'nanoqwen_requests_total{{outcome="served"}} {float(dead + 1)}' in text, text
            if took >= 0.4 or dead >= 10 * DEAD_WORKERS:
                break
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            scrape = pool.submit(scraped)
            time.sleep(took / 8)  # the scrape's read under way (a second may be quicker than the first)
            assert not scrape.done(), time.monotonic() - started
            _get(srv, "/health")
            answered = time.monotonic()
            text, scrape_ended = scrape.result()
        assert answered < scrape_ended, (answered - started, scrape_ended - started)
        assert f'nanoqwen_requests_total{{outcome="served"}} {float(dead + 1)}' in text, text
