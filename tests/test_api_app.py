"""The Flask app around an engine that is not serving (yet): no gunicorn, no model load."""
from __future__ import annotations

import encodings
import io
import re
from pathlib import Path

import flask
import gevent
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

from nanoqwen.api import strict_json
from nanoqwen.api.app import create_app
from nanoqwen.api.body import READ_CHUNK, Body, parse_json, read_body
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError
from nanoqwen.api.strict_json import MAX_SEPARATORS
from nanoqwen.engine import Engine, EngineConfig
from waits import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _client(engine: Engine, **config: object) -> FlaskClient:
    return create_app(engine, ServerConfig(**config)).test_client()


def test_loading(tmp_path: Path) -> None:
    client = _client(Engine(EngineConfig(model=str(tmp_path))))  # never started: still loading
    health = client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "loading"
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.json["error"]["code"] == "model_loading"
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400  # validated first
    assert client.get("/stats").json["active_requests"] == 0
    assert "nanoqwen_model_ready 0.0" in client.get("/metrics").text


def test_load_failure(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    engine.start()
    wait_for(lambda: engine.load_error is not None, 30, 0.01)
    client = _client(engine)
    health = client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "error" and health.json["error"]
    assert str(tmp_path) not in health.text  # /health is public: no local paths
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.json["error"]["code"] == "model_load_failed"
    assert "missing" in response.json["error"]["message"]


def test_api_key_and_cors_apply_before_the_engine(tmp_path: Path) -> None:
    client = _client(Engine(EngineConfig(model=str(tmp_path))), api_key="k", cors_origins=("*",))
    denied = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://x"})
    assert denied.status_code == 401 and denied.json["error"]["code"] == "invalid_api_key"
    assert denied.headers["Access-Control-Allow-Origin"] == "*"  # browsers can read the error
    allowed = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k"})
    assert allowed.status_code == 503  # past the key check; the model is not loaded
    assert client.get("/health").status_code == 503  # open without a key


def test_error_messages_always_encode(tmp_path: Path) -> None:
    """An error quoting a request value with a lone surrogate still becomes a valid JSON response."""
    app = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig())

    @app.get("/echo")
    def echo() -> None:
        raise APIError(400, "bad value 'a\ud800b'", param="x")

    response = app.test_client().get("/echo")
    assert response.status_code == 400 and response.json["error"]["message"] == "bad value 'a?b'"


def test_openapi_documents_every_route_with_the_validating_schemas(tmp_path: Path) -> None:
    import jsonschema

    app = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig())
    doc = app.test_client().get("/openapi.json").json  # served while the model still loads
    routes = {(m.lower(), re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)) for rule in app.url_map.iter_rules()
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == {(m, p) for p, ops in doc["paths"].items() for m in ops}
    jsonschema.Draft202012Validator.check_schema(doc)
    for path, ops in doc["paths"].items():  # OpenAPI requires each path template's parameter declared
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path))
    answer = app.test_client().get("/metrics")  # found by profiles/fuzz_openapi.py: documented as JSON
    assert answer.mimetype in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    event = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert jsonschema.Draft202012Validator(event).is_valid({"data": "[DONE]"})  # each event, as schemathesis reads it
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = {**body, "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert validator.is_valid({**CHAT, "tools": tools, "temperature": 0.5})
    assert not validator.is_valid({**CHAT, "foo": 1})  # extra fields: refused by both
    assert not validator.is_valid({**CHAT, "max_tokens": 0})
    assert not validator.is_valid({**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]})
    json_schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}
    assert validator.is_valid({**CHAT, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}},
                               "logit_bias": {"11": -100}, "reasoning_effort": "none", "response_format": json_schema})
    assert validator.is_valid({**CHAT, "tool_choice": "required", "response_format": {"type": "json_object"}})
    assert not validator.is_valid({**CHAT, "response_format": {"type": "xml"}})
    assert not validator.is_valid({**CHAT, "reasoning_effort": "extreme"})
    assert not validator.is_valid({**CHAT, "logit_bias": {"11": "a"}})
    # found by profiles/fuzz_openapi.py: the document offered what the server refuses
    assert not validator.is_valid({**CHAT, "audio": {"voice": "alloy"}})
    assert validator.is_valid({**CHAT, "function_call": "none", "functions": []})  # "not used": accepted
    assert not validator.is_valid({**CHAT, "messages": [{"role": "user"}]})
    assert not validator.is_valid({**CHAT, "messages": [{"role": "user", "content": []}]})
    assert not validator.is_valid({**CHAT, "messages": [{"role": "tool", "content": "4"}]})  # no tool_call_id
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert not validator.is_valid({**CHAT, "messages": [{"role": "user", "content": "hi", "tool_calls": [call]}]})
    assert validator.is_valid({**CHAT, "model": "qwen3-0.6b"}) and validator.is_valid({**CHAT, "model": None})
    assert not validator.is_valid({**CHAT, "model": "gpt-4"})  # a 404: the document names what is served
    assert not validator.is_valid({**CHAT, "stop": [""]}) and not validator.is_valid({**CHAT, "allowed_token_ids": []})
    legacy = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    legacy_validator = jsonschema.Draft202012Validator({**legacy, "components": doc["components"]})
    assert legacy_validator.is_valid({"prompt": [[1], [2, 3]]}) and not legacy_validator.is_valid({"prompt": [[]]})
    assert validator.is_valid({**CHAT, "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "tool_calls": [call]},
                                                    {"role": "tool", "content": "4", "tool_call_id": "c"}]})


@pytest.mark.parametrize("size,too_large", [(4096, False), (4095, False), (4097, True)])
def test_a_chunked_body_may_fill_the_size_limit(size: int, too_large: bool) -> None:
    """A chunked body has no Content-Length: werkzeug bounds it by the limit, and one more read at the limit
    raises 413 even where the body ended there."""
    app = Flask("t")
    app.config["MAX_CONTENT_LENGTH"] = 4096
    environ = EnvironBuilder(method="POST").get_environ()
    environ.update({"wsgi.input": io.BytesIO(b"x" * size), "wsgi.input_terminated": True,
                    "HTTP_TRANSFER_ENCODING": "chunked"})
    environ.pop("CONTENT_LENGTH", None)
    with app.request_context(environ):
        if too_large:
            with pytest.raises(RequestEntityTooLarge):
                read_body(flask.request, timeout_s=5)
        else:
            assert read_body(flask.request, timeout_s=5).text == "x" * size


def _body(data: bytes, content_type: str) -> Body:
    environ = EnvironBuilder(method="POST", data=data, content_type=content_type).get_environ()
    with Flask("t").request_context(environ):
        return read_body(flask.request, timeout_s=5)


def _read(data: bytes, content_type: str) -> str:
    return _body(data, content_type).text


@pytest.mark.parametrize("charset, data, text", [
    ("ISO-8859-1", "\u00e9t\u00e9 \u20ac".encode(), "\u00e9t\u00e9 \u20ac"),  # UTF-8 mislabelled: was mojibake
    ("windows-1252", "\u00e9t\u00e9".encode(), "\u00e9t\u00e9"),
    ("latin-1", "\u00e9t\u00e9".encode("latin-1"), "\u00e9t\u00e9"),  # not valid UTF-8: latin-1 as labelled
    ("cp1252", "\u20ac".encode("cp1252"), "\u20ac"),
    ("UTF-16LE", "\u00e9t\u00e9".encode("utf-16-le"), "\u00e9t\u00e9"),
    # Python's aliases, which a fixed table of names dropped (a 415)
    ("utf_8", "\u00e9t\u00e9".encode(), "\u00e9t\u00e9"),
    ("utf-16-le", "\u00e9t\u00e9".encode("utf-16-le"), "\u00e9t\u00e9"),
    ("l1", b"\xe9t\xe9", "\u00e9t\u00e9"),
    ("cp819", b"\xe9t\xe9", "\u00e9t\u00e9"),
    ("iso_8859-1:1987", b"\xe9t\xe9", "\u00e9t\u00e9"),
    ("ANSI_X3.4-1968", b"ete", "ete"),
])
def test_a_body_is_read_in_its_charset_or_as_utf8(charset: str, data: bytes, text: str) -> None:
    assert _read(data, f"application/json; charset={charset}") == text


def test_an_unknown_charset_reads_utf8_and_is_not_remembered() -> None:
    """A label we do not decode was a 415 before the body was read; vLLM ignores it and parses the bytes: read as
    UTF-8, a 415 naming the label only where the body is not UTF-8. codecs.lookup cached every name it was asked
    for, failed ones too (an 8 KB name leaked 8 KB a request): it is never asked."""
    cached = len(encodings._cache)  # type: ignore[attr-defined]
    for i in range(3):
        assert _read("{\"\u00e9\": 1}".encode(), f"application/json; charset={i}{'x' * 8000}") == "{\"\u00e9\": 1}"
        with pytest.raises(APIError) as info:
            _read(b'{"\xe9": 1}', f"application/json; charset={i}{'x' * 8000}")
        assert info.value.status == 415 and f"'{i}{'x' * 99}'" in info.value.message
    for name in ("idna", "punycode", "unicode_escape", "rot13", "utf-8-sig"):  # codecs, but no charsets: never used
        assert _read(b'{"a": "xn--"}', f"application/json; charset={name}") == '{"a": "xn--"}'
        with pytest.raises(APIError) as info:
            _read(b"\xff{}", f"application/json; charset={name}")
        assert info.value.status == 415 and f"'{name}'" in info.value.message
    assert len(encodings._cache) == cached  # type: ignore[attr-defined]


@pytest.mark.parametrize("charset, counted", [("utf-8", bytes), ("latin-1", bytes), ("utf-16", str), ("bogus", bytes)])
def test_a_body_s_values_are_counted_on_its_bytes_where_they_are_ascii(monkeypatch: pytest.MonkeyPatch, charset: str,
                                                                       counted: type) -> None:
    """They were counted on the decoded str: one emoji makes it 4 bytes a character, an 8 MiB body's copies
    32 MB each."""
    encoding = "utf-16" if charset == "utf-16" else "utf-8"  # UTF-8 labelled latin-1 is read as UTF-8
    seen: list[type] = []
    count = strict_json.too_many_values
    monkeypatch.setattr(strict_json, "too_many_values", lambda text, *a: seen.append(type(text)) or count(text, *a))
    fits = '{"a": ["\u00e9\U0001f600", ' + "1," * 1000 + '1], "b": "' + "," * (2 * MAX_SEPARATORS) + '"}'
    assert parse_json(*_body(fits.encode(encoding), f"application/json; charset={charset}")).value["b"][0] == ","
    too_many = '["\U0001f600", ' + "1," * MAX_SEPARATORS + "1]"
    with pytest.raises(APIError) as info:
        parse_json(*_body(too_many.encode(encoding), f"application/json; charset={charset}"))
    assert info.value.status == 413 and seen == [counted, counted]


@pytest.mark.parametrize("chunks, turns", [(1, 0), (3, 2)])
def test_a_body_is_read_with_a_turn_of_the_loop_between_chunks_only(chunks: int, turns: int) -> None:
    """The loop runs between two reads of a long body (a read of data already there never yields), not after a body's
    last: a turn of the loop a request, its epoll call included, for a body of one read (nearly every request)."""
    ran: list[int] = []
    data = b"x" * (READ_CHUNK * chunks)

    def count_turns() -> None:
        while True:
            ran.append(1)
            gevent.sleep(0)

    counter = gevent.spawn(count_turns)
    gevent.sleep(0)  # the counter waits for its next turn
    try:
        ran.clear()
        assert _read(data, "application/json") == data.decode()
        assert len(ran) == turns
    finally:
        counter.kill()


def test_every_route_refuses_a_query_it_does_not_read(tmp_path: Path) -> None:
    """One check before every route (app.py's refuse_an_unread_query), so that a route added later does not ignore its
    query again: each method of each rule with `?zz=1` is a 400 naming it (the stored items' services check theirs),
    but /health's (any query) and OPTIONS (a CORS preflight carries its request's query)."""
    app = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig())
    client = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<path:model>", "m").replace("<completion_id>", "c").replace("<response_id>", "r")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            answer = client.open(f"{path}?zz=1", method=method, json={} if method == "POST" else None)
            if rule.endpoint == "health":
                assert answer.status_code != 400, (method, path, answer.text)
                continue
            assert answer.status_code == 400 and answer.json["error"]["param"] == "zz", (method, path, answer.text)
            checked += 1
        assert client.options(f"{path}?zz=1").status_code == 200, path
    assert checked >= 20, checked
