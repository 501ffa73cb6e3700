"""Property-based fuzzing of a live `gunicorn -k gevent server:app` from its own `/openapi.json` (schemathesis).

Every operation of the document, with schema-valid (positive) and schema-invalid (negative) cases; every other case
of an operation on a `{response_id}` names a response that exists (a background stream running, a background
response polled, a stored one: GET's stream and starting_after, cancel and DELETE reach past the 404). A case fails
when the answer is a 5xx, an error without OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`,
an answer the document does not describe (status, content type, body schema), a schema-invalid request accepted
(not one whose only invalid part the wire made valid: a deepObject query's null sent as the text "null"), or no
answer at all. Meanwhile a process of its own polls `/health`: its slowest answer is the longest the event
loop stalled, which must stay under --max-stall-ms (checked again by replaying the requests in flight then, as this
shared machine's load alone slows a probe now and then); and the worker's pid must be the same at the end (no
restart).

    pip install -e ".[test,fuzz]"   # the tests' checkpoint and server helpers, and schemathesis
    python profiles/fuzz_openapi.py --max-examples 100 --seconds 600
    python profiles/fuzz_openapi.py --paths '^/v1/responses' --seconds 300   # only the operations of these paths

The server serves the tests' tiny random checkpoint with a short context (--max-model-len), which bounds every
generation; positive cases' `max_tokens` and `n` are lowered further (to values the schema allows) so that
examples stay cheap. The summary goes to profiles/out/fuzz_openapi.json; the exit status is 1 on any finding.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.parameters import ParameterLocation

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import cpu_env  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from fuzz_live import LiveResponses  # noqa: E402
from server_process import GunicornServer  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# a negative case whose negation the wire undid (see negation_lost_in_the_query) may be accepted
CHECKS_VALID_AS_SENT = [check for check in CHECKS if check is not negative_data_rejection]
NOT_QUERY = (ParameterLocation.BODY, ParameterLocation.PATH, ParameterLocation.HEADER, ParameterLocation.COOKIE)
ERROR_KEYS = {"message", "type", "param", "code"}
# generation fields a positive case keeps at most this large (each is valid at 1 or 2)
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "best_of": 2, "top_logprobs": 2, "logprobs": 2}


@dataclass
class FuzzConfig:
    max_examples: int = 100  # per operation and mode
    seconds: float = 600.0  # the whole run stops starting examples past this
    seed: int = 0
    paths: str = ""  # a regular expression the operations' paths match (re.search); "": all of them
    max_model_len: int = 128
    max_stall_ms: float = 300.0
    health_interval_s: float = 0.05
    request_timeout_s: float = 60.0
    out: Path = REPO / "profiles" / "out" / "fuzz_openapi.json"


@dataclass
class Finding:
    operation: str
    mode: str
    problem: str
    request: str  # a curl command that repeats it

    def key(self) -> tuple[str, str]:
        return self.operation, self.problem.splitlines()[0][:160]


@dataclass
class Summary:
    examples: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    # schema-valid requests the server refused, by error message (not findings: the schema cannot express
    # every rule, e.g. the served model's name or the context length; a reviewer reads these)
    refused_positive: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    max_health_ms: float = 0.0
    max_health_during: list[str] = field(default_factory=list)  # the requests in flight while it waited
    # /health's slowest answer while those requests were sent again, REPLAYS times each: a stall they cause comes
    # back, one from this machine's load (the probe or the server descheduled) does not
    replayed_health_ms: float = 0.0
    health_failures: int = 0
    worker_pid_before: int | None = None
    worker_pid_after: int | None = None
    seconds: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)  # at the end (1, 5, 15 minutes)


class HealthProbe:
    """GET /health every interval until stopped, from its own process (the fuzzer's own work, holding its GIL,
    would count as the server's): the slowest answer is the event loop's longest stall."""

    def __init__(self, url: str, interval_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.done, self.polling = context.Event(), context.Event()
        self._slowest, self._at = context.Value("d", 0.0), context.Value("d", 0.0)
        self._failures = context.Value("i", 0)
        self._process = context.Process(target=_probe, args=(url, interval_s, self.done, self.polling, self._slowest,
                                                             self._at, self._failures), daemon=True)

    def start(self) -> None:
        """Returns once the first probe has been answered."""
        self._process.start()
        self.polling.wait()

    def stop(self) -> None:
        self.done.set()
        self._process.join()

    @property
    def slowest(self) -> tuple[float, float, int]:
        """(seconds of the slowest answer, time.monotonic() when it was asked, failed probes)."""
        return self._slowest.value, self._at.value, self._failures.value


def _probe(url: str, interval_s: float, done: Any, polling: Any, slowest: Any, at: Any, failures: Any) -> None:
    session = requests.Session()
    while not done.is_set():
        t0 = time.monotonic()
        try:
            ok = session.get(f"{url}/health", timeout=30).status_code == 200
        except requests.RequestException:
            ok = False
        if time.monotonic() - t0 > slowest.value:
            slowest.value, at.value = time.monotonic() - t0, t0
        failures.value += not ok
        polling.set()
        done.wait(interval_s)


class DeadlinePassed(BaseException):
    """Ends an operation's examples at --seconds: hypothesis catches an Exception as a failure and shrinks it."""


def worker_pid(url: str) -> int:
    [worker] = requests.get(f"{url}/stats", timeout=10).json()["workers"]
    return worker["pid"]


def capped(body: Any) -> Any:
    """A positive case's body with its generation lengths and choice counts lowered to CAPS (still valid)."""
    if not isinstance(body, dict):
        return body
    return {k: min(v, CAPS[k]) if k in CAPS and type(v) is int and v > CAPS[k] else v for k, v in body.items()}


def envelope_problem(response: requests.Response) -> str | None:
    """What is wrong with a 4xx/5xx answer's body, or None when it is OpenAI's error envelope."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} without an error envelope: {response.text[:300]!r}"
    if not isinstance(error, dict) or set(error) != ERROR_KEYS or not isinstance(error["message"], str):
        return f"{response.status_code} with a malformed error envelope: {response.text[:300]!r}"
    return None


def query_as_read(parameters: list[dict[str, Any]], generated: dict[str, Any], url: str) -> dict[str, Any]:
    """A query as the server reads it: each deepObject parameter's `name[key]=value` pairs, from the `url` sent,
    gathered into an object of the texts sent (chat_stored_api's reading; a bare `name=value` stays that text); every
    other parameter as generated (a case's wrong `limit` stays wrong)."""
    deep = {p["name"] for p in parameters if p.get("style") == "deepObject"}
    query = {name: value for name, value in generated.items() if name not in deep}
    objects: dict[str, dict[str, str]] = {}
    for key, text in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        name, bracket, rest = key.partition("[")
        if name not in deep:
            continue
        if bracket and rest.endswith("]"):
            objects.setdefault(name, {})[rest[:-1]] = text
        else:
            query[name] = text
    return {**objects, **query}


def negation_lost_in_the_query(case: Any, response: requests.Response) -> bool:
    """Whether a negative case, negated in its query alone, reads as valid where the server reads it. schemathesis
    sends a deepObject's generated null, boolean or number as the text "null", "true", "5" (valid where the values
    are strings) and its own wire filters read only plain `name=value` parameters."""
    meta = case.meta
    if meta is None or not meta.is_negative_at(ParameterLocation.QUERY) or any(map(meta.is_negative_at, NOT_QUERY)):
        return False
    parameters = [p for p in case.operation.definition.raw.get("parameters", []) if p.get("in") == "query"]
    schema = {"type": "object", "properties": {p["name"]: p.get("schema", {}) for p in parameters},
              "required": [p["name"] for p in parameters if p.get("required")]}
    return Draft202012Validator(schema).is_valid(query_as_read(parameters, dict(case.query or {}),
                                                               response.request.url))


def fuzz_operation(operation: Any, mode: GenerationMode, config: FuzzConfig, deadline: float,
                   summary: Summary, session: requests.Session, timeline: list[tuple[float, float, Any]],
                   live: LiveResponses) -> None:
    """Runs the operation's cases of this mode; appends (sent, answered, case) per request to `timeline`."""
    label = operation.label

    @seed(config.seed)
    @settings(max_examples=config.max_examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            raise DeadlinePassed
        if mode is GenerationMode.POSITIVE:
            case.body = capped(case.body)
        if (problem := live.substitute(case)) is not None:
            summary.findings.append(Finding(label, mode.value, problem, case.as_curl_command()))
        summary.examples += 1
        sent = time.monotonic()
        summary.by_operation[f"{label} {mode.value}"] = summary.by_operation.get(f"{label} {mode.value}", 0) + 1
        try:
            response = case.call(session=session, timeout=config.request_timeout_s)
        except requests.RequestException as exc:
            summary.findings.append(Finding(label, mode.value, f"no answer: {exc}", case.as_curl_command()))
            return
        timeline.append((sent, time.monotonic(), case))
        summary.statuses[str(response.status_code)] = summary.statuses.get(str(response.status_code), 0) + 1
        if mode is GenerationMode.POSITIVE and 400 <= response.status_code < 500:
            refusal = f"{label} {response.status_code}: {response.text[:200]}"
            summary.refused_positive[refusal] = summary.refused_positive.get(refusal, 0) + 1
        problems = []
        if response.status_code >= 400 and (problem := envelope_problem(response)) is not None:
            problems.append(problem)
        try:
            # 414: gunicorn's refusal of a request line past 4,094 bytes, before the app (long metadata values)
            lost = mode is GenerationMode.NEGATIVE and (
                response.status_code == 414 or negation_lost_in_the_query(case, response))
            case.validate_response(response, checks=CHECKS_VALID_AS_SENT if lost else CHECKS)
        except (Failure, FailureGroup) as exc:
            failures = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
            problems += [f"{f.title}: {' '.join(f.message.split())}" for f in failures]
        for problem in problems:
            summary.findings.append(Finding(label, mode.value, problem, case.as_curl_command()))

    try:
        run()
    except DeadlinePassed:
        pass
    except Unsatisfiable:  # no schema-invalid request exists (an operation without parameters or body)
        summary.by_operation.setdefault(f"{label} {mode.value}", 0)


def fuzz(config: FuzzConfig) -> Summary:
    summary = Summary()
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN=str(config.max_model_len))
    log_path = config.out.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with GunicornServer(env, log_path) as srv:
        summary.worker_pid_before = worker_pid(srv.url)
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        if config.paths:
            schema = schema.include(path_regex=config.paths)
        probe = HealthProbe(srv.url, config.health_interval_s)
        probe.start()
        deadline = t0 + config.seconds
        session = requests.Session()
        timeline: list[tuple[float, float, Any]] = []
        live = LiveResponses(srv.url, requests.Session())
        try:
            for result in schema.get_all_operations():
                operation = result.ok()
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    fuzz_operation(operation, mode, config, deadline, summary, session, timeline, live)
        finally:
            probe.stop()
        slowest_s, asked, summary.health_failures = probe.slowest
        summary.max_health_ms = round(slowest_s * 1000, 1)
        in_flight = [case for sent, answered, case in timeline if sent < asked + slowest_s and answered > asked]
        summary.max_health_during = [case.as_curl_command() for case in in_flight]
        if summary.max_health_ms > config.max_stall_ms and in_flight:
            summary.replayed_health_ms = replay(srv.url, in_flight, config, session)
        summary.worker_pid_after = worker_pid(srv.url)
    summary.seconds = round(time.monotonic() - t0, 1)
    summary.load_average = os.getloadavg()
    return summary


REPLAYS = 3


def replay(url: str, cases: list[Any], config: FuzzConfig, session: requests.Session) -> float:
    """/health's slowest answer, in ms, while `cases` are sent again REPLAYS times each."""
    probe = HealthProbe(url, config.health_interval_s)
    probe.start()
    try:
        for case in cases * REPLAYS:
            case.call(session=session, timeout=config.request_timeout_s)
    finally:
        probe.stop()
    return round(probe.slowest[0] * 1000, 1)


def verdict(summary: Summary, config: FuzzConfig) -> list[str]:
    """Every distinct problem of the run, one line each (the findings grouped by operation and first line)."""
    problems = sorted({" | ".join(f.key()) for f in summary.findings})
    # the fuzzer sends one request at a time: a slow /health while none was in flight, or one that the requests in
    # flight do not bring back, is this machine's load, reported in the summary but no finding
    if min(summary.max_health_ms, summary.replayed_health_ms) > config.max_stall_ms:
        problems.append(f"/health took {summary.max_health_ms} ms, {summary.replayed_health_ms} ms again with the "
                        f"requests in flight replayed (the event loop stalled): {summary.max_health_during}")
    if summary.health_failures:
        problems.append(f"/health failed {summary.health_failures} times")
    if summary.worker_pid_after != summary.worker_pid_before:
        problems.append(f"the worker restarted: pid {summary.worker_pid_before} -> {summary.worker_pid_after}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = FuzzConfig()
    parser.add_argument("--max-examples", type=int, default=defaults.max_examples)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--paths", default=defaults.paths, help="only the operations whose path matches this regex")
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--max-stall-ms", type=float, default=defaults.max_stall_ms)
    parser.add_argument("--out", type=Path, default=defaults.out)
    args = parser.parse_args(argv)
    config = FuzzConfig(max_examples=args.max_examples, seconds=args.seconds, seed=args.seed, paths=args.paths,
                        max_model_len=args.max_model_len, max_stall_ms=args.max_stall_ms, out=args.out)
    summary = fuzz(config)
    problems = verdict(summary, config)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
              "problems": problems, **asdict(summary)}
    config.out.write_text(json.dumps(report, indent=2))
    print(f"{summary.examples} examples in {summary.seconds} s, statuses {summary.statuses}, "
          f"/health at most {summary.max_health_ms} ms ({len(summary.max_health_during)} requests in flight; "
          f"{summary.replayed_health_ms} ms replayed), "
          f"worker pid {summary.worker_pid_before} -> {summary.worker_pid_after}, load average "
          f"{summary.load_average}; {len(problems)} problems (summary: {config.out})")
    for problem in problems:
        print(" -", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
