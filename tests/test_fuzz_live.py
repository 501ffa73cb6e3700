"""fuzz_openapi's live responses (profiles/fuzz_live.py) against a scripted HTTP server: every other case's
`{response_id}` made fresh, each kind in turn, and every way making one can fail (a refusal, a stream without a
`data:` line, a body that is not JSON or not an object, no server) reported as a problem with the case keeping its
random id, never raised (which would end the fuzzing run)."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from scripted_http import ScriptedHandler, ScriptedServer, serving
from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
from fuzz_live import LiveResponses  # noqa: E402

RANDOM_ID = "resp_random"
SSE = "text/event-stream"


@dataclass
class Case:
    """What LiveResponses reads of a schemathesis case."""

    path_parameters: dict[str, Any] | None = field(default_factory=lambda: {"response_id": RANDOM_ID})


OPENAPI = {  # one operation on a {response_id}, which answers 404 (GET below)
    "openapi": "3.0.3", "info": {"title": "scripted", "version": "1"},
    "paths": {"/v1/responses/{response_id}": {"get": {
        "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"404": {"description": "unknown",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }}},
}
NOT_FOUND = {"error": {"message": "no such response", "type": "invalid_request_error", "param": None, "code": None}}


class Scripted(ScriptedServer):
    """Answers each POST with the next of `answers` (status, content type, body), keeping the bodies posted; GET
    /openapi.json with OPENAPI, any other GET with a 404 (`got` keeps their paths)."""

    def __init__(self) -> None:
        super().__init__(Handler)
        self.answers: list[tuple[int, str, bytes]] = []
        self.posted: list[dict[str, Any]] = []
        self.posted_to: list[str] = []
        self.got: list[str] = []


class Handler(ScriptedHandler):
    server: Scripted

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.server.posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.server.posted_to.append(self.path)
        self.reply(*self.server.answers.pop(0))

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/openapi.json":
            self.reply(*answer(OPENAPI))
        else:
            self.server.got.append(self.path)
            self.reply(*answer(NOT_FOUND, status=404))


@pytest.fixture
def server() -> Iterator[Scripted]:
    with serving(Scripted()) as srv:
        yield srv


def live(server: Scripted) -> LiveResponses:
    return LiveResponses(server.url, requests.Session())


def stream(response_id: str) -> tuple[int, str, bytes]:
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": response_id}}
    return 200, SSE, f"event: response.created\ndata: {json.dumps(created)}\n\n".encode()


def answer(body: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


def test_every_other_case_gets_a_fresh_response_of_each_kind_in_turn(server: Scripted) -> None:
    responses = live(server)
    server.answers = [stream("resp_a"), answer({"id": "resp_b"}), answer({"id": "resp_c"}), stream("resp_d")]
    ids = []
    for _ in range(8):
        case = Case()
        assert responses.substitute(case) is None
        ids.append(case.path_parameters["response_id"])
    assert ids == ["resp_a", RANDOM_ID, "resp_b", RANDOM_ID, "resp_c", RANDOM_ID, "resp_d", RANDOM_ID]
    kinds = [(body.get("background"), body.get("stream")) for body in server.posted]
    assert kinds == [(True, True), (True, None), (None, None), (True, True)]
    no_id = Case(path_parameters={})
    assert responses.substitute(no_id) is None and no_id.path_parameters == {} and len(server.posted) == 4


def chunks(completion_id: str) -> tuple[int, str, bytes]:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "choices": []}
    return 200, SSE, f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


def test_every_other_completion_case_gets_a_fresh_stored_completion_of_each_kind_in_turn(server: Scripted) -> None:
    """`{completion_id}` as `{response_id}`: every other case names a chat completion made with `store: true`, in
    turn answered whole, streamed (its id from the first chunk) and of two choices with metadata."""
    responses = live(server)
    server.answers = [answer({"id": "chatcmpl-a"}), chunks("chatcmpl-b"), answer({"id": "chatcmpl-c"})]
    ids = []
    for _ in range(6):
        case = Case(path_parameters={"completion_id": "chatcmpl-random"})
        assert responses.substitute(case) is None
        ids.append(case.path_parameters["completion_id"])
    assert ids == ["chatcmpl-a", "chatcmpl-random", "chatcmpl-b", "chatcmpl-random", "chatcmpl-c", "chatcmpl-random"]
    assert server.posted_to == ["/v1/chat/completions"] * 3 and all(body["store"] is True for body in server.posted)
    assert [(body.get("stream"), body.get("n")) for body in server.posted] == [(None, None), (True, None), (None, 2)]
    server.answers = [answer(["chatcmpl-x"])]
    failed = Case(path_parameters={"completion_id": "chatcmpl-random"})
    problem = responses.substitute(failed)
    assert problem is not None and problem.startswith("making a completion for the case failed")
    assert failed.path_parameters == {"completion_id": "chatcmpl-random"}


FAILURES = {  # what the server answers making a response: the words the problem must say
    "refused": (answer({"error": {"message": "busy"}}, status=429), "429"),
    "stream without data": ((200, SSE, b": keep-alive\n\n"), "without a data: line"),
    "stream data without a response": ((200, SSE, b'data: {"type": "error"}\n\n'), "KeyError"),
    "stream data with a null response": ((200, SSE, b'data: {"response": null}\n\n'), "not an object"),
    "not JSON": ((200, "application/json", b"<html>oops</html>"), "JSONDecodeError"),
    "JSON, not an object": (answer(["resp_x"]), "not an object"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_making_a_response_is_a_problem_and_the_case_keeps_its_id(server: Scripted, failure: str) -> None:
    reply, words = FAILURES[failure]
    responses = live(server)
    if failure.startswith("stream"):
        server.answers = [reply]
    else:  # the polled kind: the stream kind's turn (and an even case) spent first
        server.answers = [stream("resp_a"), reply]
        for _ in range(2):
            responses.substitute(Case())
    case = Case()
    problem = responses.substitute(case)
    assert problem is not None and problem.startswith("making a response for the case failed") and words in problem
    assert case.path_parameters == {"response_id": RANDOM_ID}
    server.answers = [answer({"id": "resp_next"})]
    responses.substitute(Case())  # the even case: kept
    after = Case()
    assert responses.substitute(after) is None and after.path_parameters["response_id"] == "resp_next"  # goes on


def test_no_server_is_a_problem() -> None:
    case = Case()
    problem = LiveResponses("http://127.0.0.1:1", requests.Session()).substitute(case)  # port 1: refused
    assert problem is not None and "ConnectionError" in problem and case.path_parameters["response_id"] == RANDOM_ID


def test_the_fuzzer_reports_a_case_whose_response_could_not_be_made_and_sends_it_anyway(server: Scripted) -> None:
    """fuzz_operation with every fresh response failing (no server to make them at): each odd case is a finding, and
    every case is still sent, with its random id, to the end of its examples (the run not ended by the failure)."""
    import schemathesis
    from schemathesis import GenerationMode

    import fuzz_openapi

    [operation] = [result.ok() for result in schemathesis.openapi.from_url(f"{server.url}/openapi.json")
                   .get_all_operations()]
    config, summary = fuzz_openapi.FuzzConfig(max_examples=6), fuzz_openapi.Summary()
    failing = LiveResponses("http://127.0.0.1:1", requests.Session())
    fuzz_openapi.fuzz_operation(operation, GenerationMode.POSITIVE, config, float("inf"), summary, requests.Session(),
                                [], failing)
    assert summary.examples == len(server.got) == failing.cases >= 2 and summary.statuses == {"404": summary.examples}
    problems = [finding.problem for finding in summary.findings]
    assert len(problems) == (failing.cases + 1) // 2
    assert all(problem.startswith("making a response for the case failed: ConnectionError") for problem in problems)
