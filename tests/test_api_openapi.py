"""The OpenAPI document agrees with the validators it is generated from, where pydantic cannot derive it."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from nanoqwen.api.app import create_app
from nanoqwen.api.chat_store import ChatStore, StoredRequest
from nanoqwen.api.chat_stored_api import ChatStoredService
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError
from nanoqwen.api.openapi import openapi_document
from nanoqwen.api.responses_api import ResponsesService
from nanoqwen.api.responses_schemas import INCLUDES, parse_count_request, parse_responses_request
from nanoqwen.api.schemas import (
    MAX_STOP_STRINGS,
    METADATA_KEY_CHARS,
    METADATA_KEYS,
    METADATA_VALUE_CHARS,
    parse_chat_request,
    parse_completion_request,
    same_json,
)
from nanoqwen.api.stored import MAX_LIST_LIMIT, list_page
from nanoqwen.api.strict_json import Budget
from nanoqwen.api.tokenize import parse_tokenize_request
from nanoqwen.engine import Engine, EngineConfig

DOC = openapi_document("nanoqwen", "0", ("qwen3-0.6b",))
SCHEMAS = DOC["components"]["schemas"]
HI = [{"role": "user", "content": "hi"}]
CALL = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
# A valid request putting `fields` in the model named by the key, and the server's validator of its endpoint.
PLACES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ChatCompletionRequest": lambda f: parse_chat_request({"messages": HI, **f}, Budget()),
    "ChatMessage": lambda f: parse_chat_request({"messages": [{"role": "assistant", "content": "x", **f}]}, Budget()),
    "CompletionRequest": lambda f: parse_completion_request({"prompt": "x", **f}, Budget()),
    "TokenizeChatRequest": lambda f: parse_tokenize_request({"messages": HI, **f}, Budget()),
    "StructuredOutputs": lambda f: parse_chat_request({"messages": HI, "structured_outputs": {"regex": "a", **f}},
                                                      Budget()),
    "ResponseCreateRequest": lambda f: parse_responses_request({"input": "hi", **f}, Budget()),
    "ResponseCountRequest": lambda f: parse_count_request({"input": "hi", **f}, Budget()),
    "FunctionCallItem": lambda f: parse_responses_request({"input": [{**CALL, **f}]}, Budget()),
    "FunctionCallOutputItem": lambda f: parse_responses_request(
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "4", **f}]}, Budget()),
    "FunctionTool": lambda f: parse_responses_request({"input": "hi", "tools": [{"type": "function", "name": "f",
                                                                                  **f}]}, Budget()),
    "TextConfig": lambda f: parse_responses_request({"input": "hi", "text": f}, Budget()),
    "ResponsePromptCacheOptions": lambda f: parse_responses_request({"input": "hi", "prompt_cache_options": f},
                                                                    Budget()),
}
# Beside a field's documented values: each is refused unless it is one of them (JSON tells 0 from false, not 1
# from 1.0).
OUTSIDE: tuple[Any, ...] = (0, 1, 1.0, 1.5, True, False, "other", "none", [], ["text"], {"x": 1})


def _refused_fields() -> list[tuple[str, str, list[Any]]]:
    """(model, property, documented values) of each field refused unless absent or unused: an enum holding null."""
    return [(model, name, prop["enum"]) for model, schema in SCHEMAS.items()
            for name, prop in schema.get("properties", {}).items() if None in prop.get("enum", [])]


def test_every_model_with_refused_fields_is_placed() -> None:
    assert {model for model, _, _ in _refused_fields()} == set(PLACES)
    for model in ("FunctionCallItem", "FunctionTool"):
        assert (model, "async", [None, False]) in _refused_fields()  # by its alias


def test_a_message_has_no_unused_values_of_a_request() -> None:
    """A request's `function_call: "none"` means no function call; a message's function_call is a call."""
    assert ("ChatMessage", "function_call", [None]) in _refused_fields()


@pytest.mark.parametrize("model,name,documented", _refused_fields(), ids=lambda v: str(v))
def test_the_document_allows_exactly_what_the_validator_accepts(model: str, name: str, documented: list[Any]) -> None:
    for value in documented:
        PLACES[model]({name: value})
    for value in OUTSIDE:
        if not any(same_json(value, d) for d in documented):
            with pytest.raises(APIError) as refused:
                PLACES[model]({name: value})
            assert refused.value.status == 400 and refused.value.param.endswith(name), (value, refused.value.param)


def _validator(path: str) -> jsonschema.Draft202012Validator:
    body = DOC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**body, "components": DOC["components"]})


# What the server does with a body, past the model's validation, before generating.
SERVER: dict[str, Callable[[dict[str, Any]], Any]] = {
    "/v1/chat/completions": lambda body: parse_chat_request(body, Budget()),
    "/v1/completions": lambda body: parse_completion_request(body, Budget()),
    "/v1/responses": lambda body: (req := parse_responses_request(body, Budget())).to_chat(req.input_items),
    "/v1/responses/input_tokens": lambda body: (req := parse_count_request(body, Budget())).to_chat(req.input_items),
}


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HI, "stop": ["s"] * MAX_STOP_STRINGS}),
    ("/v1/chat/completions", {"messages": HI, "stop": ["s"] * (MAX_STOP_STRINGS + 1)}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    # found by profiles/fuzz_openapi.py: schema-valid, refused
    ("/v1/responses", {}),
    ("/v1/responses", {"instructions": "be brief"}),
    ("/v1/responses", {"input": "hi", "include": [""]}),
    ("/v1/responses", {"input": "hi", "include": list(INCLUDES)}),
    ("/v1/responses", {"input": "hi", "stream_options": {}}),
    ("/v1/responses", {"input": "hi", "stream": True, "stream_options": {}}),
    ("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "x", "stream": False, "stream_options": {}}),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {}}),
    *[(path, {**base, "structured_outputs": so}) for path, base in (
        ("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})) for so in (
        {}, {"regex": "a"}, {"regex": None}, {"regex": "a", "choice": ["a"]}, {"json_object": False},
        {"json_object": True}, {"json": {}, "json_object": False}, {"grammar": "start: \"a\"", "json_object": True},
        {"regex": "a", "json_object": False})],
    ("/v1/responses", {"input": [{"type": "function_call_output", "call_id": "", "output": "4"}]}),
    ("/v1/responses/input_tokens", {}),
    ("/v1/responses/input_tokens", {"instructions": "be brief", "truncation": "auto"}),
    ("/v1/responses/input_tokens", {"input": "hi", "stream": False}),  # create's fields are not the count's
    ("/v1/responses/input_tokens", {"input": "hi", "personality": "friendly"}),
    *[(path, {**base, "metadata": metadata}) for path, base in (
        ("/v1/responses", {"input": "hi"}), ("/v1/chat/completions", {"messages": HI})) for metadata in (
        {f"k{i}": "v" for i in range(METADATA_KEYS)}, {f"k{i}": "v" for i in range(METADATA_KEYS + 1)},
        {"k" * METADATA_KEY_CHARS: "v" * METADATA_VALUE_CHARS}, {"k" * (METADATA_KEY_CHARS + 1): "v"},
        {"k": "v" * (METADATA_VALUE_CHARS + 1)})],
])
def test_the_document_encodes_the_validators_rules(path: str, body: dict[str, Any]) -> None:
    assert _validator(path).is_valid(body) == (_status(SERVER[path], body) == 200)


@pytest.mark.parametrize("path,parse", [("/v1/responses", parse_responses_request),
                                        ("/v1/responses/input_tokens", parse_count_request)])
@pytest.mark.parametrize("ref", [{"id": "msg_1"}, {"id": ""}, {"type": "item_reference", "id": "msg_1"},
                                 {"type": "item_reference"}])
def test_the_document_allows_an_item_reference_without_its_type(path: str, parse: Callable[..., Any],
                                                                 ref: dict[str, Any]) -> None:
    """OpenAI's item reference may leave its type out, and the server takes one so (the reference resolved later, by
    the store): found by profiles/fuzz_openapi.py, `{"id": ""}` naming an item a fuzzed response stored."""
    body = {"input": [ref]}
    assert _validator(path).is_valid(body) == (_status(parse, body, Budget()) == 200)


def test_a_served_name_equal_to_the_model_id_is_listed_once() -> None:
    model = openapi_document("nanoqwen", "0", ("m", "m"))["components"]["schemas"]["ChatCompletionRequest"]
    assert model["properties"]["model"]["anyOf"][0]["enum"] == ["m"]


def _query(path: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["schema"] for p in DOC["paths"][path]["get"]["parameters"] if p["in"] == "query"}


def _status(call: Callable[..., Any], *args: Any) -> int:
    try:
        call(*args)
    except APIError as exc:
        return exc.status
    return 200


def test_input_items_query_parameters_are_declared_as_list_page_reads_them() -> None:
    query = _query("/v1/responses/{response_id}/input_items")
    assert set(query) == {"limit", "order", "after", "before", "include[]", "include"}
    items = [{"id": f"i{n}"} for n in range(3)]
    limit = query["limit"]
    for value, valid in [(limit["minimum"], True), (limit["maximum"], True), (limit["minimum"] - 1, False),
                         (limit["maximum"] + 1, False)]:
        assert _status(list_page, items, {"limit": str(value)}) == (200 if valid else 400)
    for order in query["order"]["enum"]:
        assert _status(list_page, items, {"order": order}) == 200
    assert _status(list_page, items, {"order": "up"}) == 400
    assert _status(list_page, items, {"after": "i1", "before": "i0"}) == 200
    assert _status(list_page, items, {"after": "missing"}) == 400


def test_stored_chat_list_query_parameters_are_declared_as_the_service_reads_them() -> None:
    store = ChatStore()
    store.put({"id": "c0", "model": "m", "created": 0, "choices": []}, StoredRequest(b"[]", {"k": "v"}))
    service = ChatStoredService(store, lambda where, fn, *args: fn(*args))  # no offload threads: here
    listed, messages = _query("/v1/chat/completions"), _query("/v1/chat/completions/{completion_id}/messages")
    assert set(listed) == {"limit", "order", "after", "model", "metadata"}
    assert set(messages) == {"limit", "order", "after"}
    assert listed["metadata"]["type"] == "object"  # sent as metadata[key]=value (deepObject)
    for query in (listed, messages):
        assert query["limit"]["maximum"] == MAX_LIST_LIMIT and query["order"]["default"] == "asc"
    for args in ({"limit": "100", "order": "desc", "after": "c0", "model": "m"}, {"metadata[k]": "v"}):
        assert _status(service.list, args) == 200
    for refused in ({"limit": "101"}, {"order": "up"}, {"after": "c9"}, {"before": "c0"}, {"metadata": "k"}):
        assert _status(service.list, refused) == 400
    assert _status(service.messages, "c0", {"limit": "1", "order": "desc"}) == 200
    assert _status(service.messages, "c0", {"before": "x"}) == 400 and _status(service.messages, "c9", {}) == 404


@pytest.mark.parametrize("metadata", [
    {"k": "v" * 512}, {"k" * 64: "a"}, {f"k{i}": "v" for i in range(16)}, {"": "x"},
    {"k": "v" * 513}, {"k" * 65: "a"}, {f"k{i}": "v" for i in range(17)}, {"k][x": "a"}, {"k[": "a"}, {"]": "a"}])
def test_the_documents_metadata_filter_allows_exactly_what_the_list_accepts(metadata: dict[str, str]) -> None:
    """A filter no metadata could hold is a 400: the document must not offer it (fuzz_openapi generates from it)."""
    service = ChatStoredService(ChatStore(), lambda where, fn, *args: fn(*args))
    documented = jsonschema.Draft202012Validator(_query("/v1/chat/completions")["metadata"]).is_valid(metadata)
    assert documented == (_status(service.list, {f"metadata[{key}]": value for key, value in metadata.items()}) == 200)


def test_retrieve_query_parameters_are_declared_as_retrieve_reads_them() -> None:
    query = _query("/v1/responses/{response_id}")
    assert set(query) == {"stream", "starting_after", "include_obfuscation", "include[]", "include"}
    assert query["starting_after"]["minimum"] == 0
    service = ResponsesService(chat=None)
    for stream in query["stream"]["enum"]:  # past the query check: the id is unknown
        assert _status(service.retrieve, "resp_x", {"stream": stream}, {}) == 404
    assert _status(service.retrieve, "resp_x", {"stream": "true", "starting_after": "0"}, {}) == 404
    for obfuscated in query["include_obfuscation"]["enum"]:
        assert _status(service.retrieve, "resp_x", {"stream": "true", "include_obfuscation": obfuscated}, {}) == 404
    included = query["include[]"]["items"]["enum"]
    assert query["include"] == query["include[]"]
    for name, stream in itertools.product(included, ("false", "true")):  # with stream=true: create's own, if kept
        for key in ("include[]", "include"):
            assert _status(service.retrieve, "resp_x", {key: name, "stream": stream}, {}) == 404
    for refused in ({"stream": "1"}, {"stream": "true", "starting_after": "-1"}, {"starting_after": "0"},
                    {"include_obfuscation": "false"}, {"stream": "true", "include_obfuscation": "0"},
                    {"include[]": "x"}, {"include": "x"}):
        assert _status(service.retrieve, "resp_x", refused, {}) == 400


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/qwen3-0.6b", "/stats", "/metrics", "/openapi.json"])
def test_the_informational_routes_read_the_query_they_declare(tmp_path: Path, path: str) -> None:
    """Each declared query parameter is read (not a 400), any other is a 400 naming it."""
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig(served_model_name="qwen3-0.6b"))
    operation = DOC["paths"][path.replace("qwen3-0.6b", "{model}")]["get"]
    declared = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
    assert declared == (["name[]"] if path == "/metrics" else []), declared
    for name in declared:
        assert client.test_client().get(path, query_string={name: "x"}).status_code == 200
    refused = client.test_client().get(path, query_string={"x": "1"})
    assert refused.status_code == 400 and refused.json["error"]["param"] == "x", refused.text


def test_an_empty_call_id_is_refused_naming_it() -> None:
    """Found by profiles/fuzz_openapi.py: it passed, and chat's tool message then refused it as 'messages.[0]'."""
    with pytest.raises(APIError) as refused:
        parse_responses_request({"input": [{"type": "function_call_output", "call_id": "", "output": "4"}]}, Budget())
    assert refused.value.param == "input.[0].call_id"
