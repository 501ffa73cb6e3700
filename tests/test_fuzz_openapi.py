"""fuzz_openapi's verdict on a negative case negated in a deepObject query (`GET /v1/chat/completions?metadata[k]=v`),
against a scripted server that reads the query as chat_stored_api does: a generated null, boolean or number reaches
the server as the text "null", "true", "5", which the document allows, so accepting it is no finding; a wrong `limit`
accepted still is one, alone or beside such a metadata value."""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from nanoqwen.api.openapi import openapi_document
from scripted_http import ScriptedHandler, ScriptedServer, serving
from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import fuzz_openapi  # noqa: E402
from fuzz_live import LiveResponses  # noqa: E402

PATH = "/v1/chat/completions"
SERVED = openapi_document("nanoqwen", "test", ("qwen3-0.6b",))
# the served document with its stored-completions listing alone (`metadata` a deepObject of strings, `limit` ...)
OPENAPI = {**SERVED, "paths": {PATH: {"get": SERVED["paths"][PATH]["get"]}}}
QUERY = [p for p in OPENAPI["paths"][PATH]["get"]["parameters"] if p["in"] == "query"]


class Scripted(ScriptedServer):
    """GET /v1/chat/completions, with no completion stored, reads its query as chat_stored_api does: `limit` an
    integer in [1, 100] (any text, if `lenient`), `order` asc or desc, `model` any text, `metadata[key]` at most 16
    pairs of keys of at most 64 characters and no bracket, values of at most 512; `after`
    (naming no completion), any other parameter or one given twice is a 400; a request line past 4,094 bytes is
    gunicorn's 414."""

    def __init__(self) -> None:
        super().__init__(Handler)
        self.lenient = False


class Handler(ScriptedHandler):
    server: Scripted

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if len(self.requestline) > 4094:  # gunicorn's limit_request_line: its 414 before the app
            return self._send(414, {"error": {"message": "request line too long", "type": "invalid_request_error",
                                              "param": None, "code": None}})
        if url.path == "/openapi.json":
            return self._send(200, OPENAPI)
        pairs = parse_qsl(url.query, keep_blank_values=True)
        query = dict(pairs)
        unknown = [k for k in query if k not in ("limit", "order", "model") and not re.fullmatch(r"metadata\[.*\]", k)]
        limit = query.get("limit", "20")
        bad_limit = not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100) and not self.server.lenient
        metadata = {k[len("metadata["):-1]: v for k, v in query.items() if k.startswith("metadata[")}
        bad_metadata = len(metadata) > 16 or any(
            len(k) > 64 or "[" in k or "]" in k or len(v) > 512 for k, v in metadata.items())
        if url.path != PATH or unknown or len(query) < len(pairs) or bad_limit or bad_metadata or query.get(
                "order", "asc") not in ("asc", "desc"):
            return self._send(400, {"error": {"message": "bad query", "type": "invalid_request_error",
                                              "param": None, "code": None}})
        self._send(200, {"data": []})

    def _send(self, status: int, body: Any) -> None:
        self.reply(status, "application/json", json.dumps(body).encode())


@pytest.fixture
def server() -> Iterator[Scripted]:
    with serving(Scripted()) as srv:
        yield srv


def fuzz_negative(server: Scripted) -> tuple[fuzz_openapi.Summary, list[Any]]:
    """fuzz_operation's negative cases of the listing (seeded): the summary and the cases sent."""
    import schemathesis
    from schemathesis import GenerationMode

    [operation] = [r.ok() for r in schemathesis.openapi.from_url(f"{server.url}/openapi.json").get_all_operations()]
    config, summary = fuzz_openapi.FuzzConfig(max_examples=150, seed=3201), fuzz_openapi.Summary()
    timeline: list[tuple[float, float, Any]] = []
    fuzz_openapi.fuzz_operation(operation, GenerationMode.NEGATIVE, config, float("inf"), summary, requests.Session(),
                                timeline, LiveResponses(server.url, requests.Session()))
    return summary, [case for *_, case in timeline]


def not_text(case: Any) -> bool:
    """Whether a metadata value of the case was generated as no string (a sent case's query holds the deepObject
    serialized: `metadata[key]` entries)."""
    query = case.query or {}
    values = [v for k, v in query.items() if k.startswith("metadata[")]
    if isinstance(query.get("metadata"), dict):
        values += query["metadata"].values()
    return any(not isinstance(v, str) for v in values)


def test_a_deep_object_value_the_wire_makes_text_is_no_finding(server: Scripted) -> None:
    summary, cases = fuzz_negative(server)
    assert any(not_text(case) for case in cases) and summary.statuses.get("200", 0) > 0
    assert summary.findings == []


def test_a_wrong_limit_accepted_is_still_a_finding(server: Scripted) -> None:
    server.lenient = True
    summary, cases = fuzz_negative(server)
    accepted = [f for f in summary.findings if "Schema-violating request accepted" in f.problem]
    assert accepted and all("limit" in f.request for f in accepted)
    assert any(not_text(case) for case in cases)


def test_query_as_read_gathers_deep_objects_from_the_url_and_keeps_the_rest_as_generated() -> None:
    url = f"http://h{PATH}?metadata%5Bk%5D=null&metadata%5Bj%5D=5&limit=abc"
    assert fuzz_openapi.query_as_read(QUERY, {"metadata": {"k": None, "j": 5}, "limit": "abc"}, url) == {
        "metadata": {"k": "null", "j": "5"}, "limit": "abc"}
    assert fuzz_openapi.query_as_read(QUERY, {"metadata": "x"}, f"http://h{PATH}?metadata=x") == {"metadata": "x"}
