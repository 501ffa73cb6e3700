"""`GET /openapi.json`: the OpenAPI 3.1 document, its request schemas generated from the very
pydantic models that validate the requests, so it cannot drift from what the server accepts."""
from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nanoqwen.api.chat_stored_api import ChatCompletionUpdateRequest
from nanoqwen.api.metrics import NAME_FILTER
from nanoqwen.api.responses_include import INCLUDE_KEYS
from nanoqwen.api.responses_schemas import INCLUDES, ResponseCountRequest, ResponseCreateRequest
from nanoqwen.api.schemas import (
    METADATA_KEY_CHARS,
    METADATA_KEYS,
    METADATA_VALUE_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)
from nanoqwen.api.stored import MAX_LIST_LIMIT
from nanoqwen.api.tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizePromptRequest

REF = "#/components/schemas/{model}"
JSON = {"application/json": {"schema": {"type": "object"}}}
# Per event (what schemathesis and OpenAPI 3.2's itemSchema validate): `data: <chunk JSON>`, `data: [DONE]` last.
STREAM = {**JSON, "text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chunk's JSON, then `[DONE]`"}}}}}
# Responses' events are named (`event: <type>`) and end with the terminal event, no `[DONE]`.
RESPONSE_STREAM = {**JSON, "text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "description": "the event's type"},
        "data": {"type": "string", "description": "the event's JSON"}}}}}
PROMETHEUS = {"text/plain": {"schema": {"type": "string", "description": "Prometheus' text format"}}}
# `include` under both the names the server reads (responses_include.query_include): `include[]`, as the openai
# client sends it, and the bare `include` of other clients (curl, OpenAI's documentation); their values together
INCLUDE = {"type": "array", "items": {"type": "string", "enum": list(INCLUDES)},
           "description": "parts added where create left them out (with stream=true: only those create named)"}
INCLUDE_QUERY = dict.fromkeys(INCLUDE_KEYS, INCLUDE)
LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 20}
# The query parameters' schemas by (method, path), as the server reads them (responses_api.py, chat_stored_api.py,
# list_page).
QUERY: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v1/chat/completions"): {
        "limit": LIMIT,
        "order": {"type": "string", "enum": ["asc", "desc"], "default": "asc", "description": "by `created`"},
        "after": {"type": "string", "description": "a stored chat completion's id"},
        "model": {"type": "string", "description": "only the completions of this model"},
        "metadata": {"type": "object", "maxProperties": METADATA_KEYS,
                     "propertyNames": {"maxLength": METADATA_KEY_CHARS, "pattern": "^[^\\[\\]]*$"},
                     "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_CHARS},
                     "description": "`metadata[key]=value`: only the completions with each of these pairs (a "
                                    "request line past 4,094 bytes is gunicorn's 414)"}},
    ("get", "/v1/chat/completions/{completion_id}/messages"): {
        "limit": LIMIT,
        "order": {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
        "after": {"type": "string", "description": "a message's id"}},
    ("get", "/v1/responses/{response_id}"): {
        **INCLUDE_QUERY,
        "stream": {"type": "string", "enum": ["false", "true"], "default": "false",
                   "description": "true: a background stream's events (background and stream true), kept and live"},
        "starting_after": {"type": "integer", "minimum": 0,
                           "description": "with stream=true: the events after this sequence number"},
        "include_obfuscation": {"type": "string", "enum": ["false", "true"],
                                "description": "with stream=true: accepted, nothing to pad (OpenAI's obfuscation)"}},
    ("get", "/v1/responses/{response_id}/input_items"): {
        **INCLUDE_QUERY,
        "limit": LIMIT,
        "order": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
        "after": {"type": "string", "description": "an input item's id"},
        "before": {"type": "string", "description": "an input item's id"}},
    ("get", "/metrics"): {
        NAME_FILTER: {"type": "array", "items": {"type": "string"},
                      "description": "only the samples of these names (`vllm:num_requests_running`, a histogram's "
                                     "`..._count`): prometheus-client's filter"}},
}
# (method, path, summary, request models (one of), the 200 answer's content)
ENDPOINTS: list[tuple[str, str, str, tuple[type[BaseModel], ...], dict[str, Any]]] = [
    ("post", "/v1/chat/completions", "OpenAI Chat Completions", (ChatCompletionRequest,), STREAM),
    ("get", "/v1/chat/completions", "The chat completions stored (`store: true`; per worker process, bounded)",
     (), JSON),
    ("get", "/v1/chat/completions/{completion_id}", "A stored chat completion", (), JSON),
    ("post", "/v1/chat/completions/{completion_id}", "Replaces a stored chat completion's metadata",
     (ChatCompletionUpdateRequest,), JSON),
    ("delete", "/v1/chat/completions/{completion_id}", "Deletes a stored chat completion", (), JSON),
    ("get", "/v1/chat/completions/{completion_id}/messages", "A stored chat completion's request messages", (), JSON),
    ("post", "/v1/completions", "OpenAI (legacy) Completions", (CompletionRequest,), STREAM),
    ("post", "/v1/responses", "OpenAI Responses (stored per worker process, bounded)", (ResponseCreateRequest,),
     RESPONSE_STREAM),
    ("post", "/v1/responses/input_tokens", "OpenAI Responses input token count: the prompt create would start",
     (ResponseCountRequest,), JSON),
    ("get", "/v1/responses/{response_id}", "A stored response (while generated: as response.created said it), or a "
     "background stream's events", (), RESPONSE_STREAM),
    ("delete", "/v1/responses/{response_id}", "Deletes a stored response (while generated: not kept once finished; "
     "a background one is cancelled)", (), JSON),
    ("post", "/v1/responses/{response_id}/cancel", "Cancels a background response (its output so far kept); one "
     "ended is answered as it is", (), JSON),
    ("get", "/v1/responses/{response_id}/input_items", "A stored response's input items", (), JSON),
    ("post", "/tokenize", "vLLM's tokenize: a prompt or chat messages to token ids",
     (TokenizePromptRequest, TokenizeChatRequest), JSON),
    ("post", "/detokenize", "vLLM's detokenize: token ids to text", (DetokenizeRequest,), JSON),
    ("get", "/v1/models", "The served model, as a list", (), JSON),
    ("get", "/v1/models/{model}", "One model", (), JSON),
    ("get", "/health", "Liveness and model info (503 while loading)", (), JSON),
    ("get", "/stats", "Serving statistics", (), JSON),
    ("get", "/metrics", "Prometheus metrics", (), PROMETHEUS),
    ("get", "/openapi.json", "This document", (), JSON),
]
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _style(schema: dict[str, Any]) -> dict[str, Any]:
    """An object in the query is sent as `name[key]=value` pairs (the openai client's encoding, chat_stored_api's)."""
    return {"style": "deepObject", "explode": True} if schema.get("type") == "object" else {}


def _operation(method: str, path: str, summary: str, models: tuple[type[BaseModel], ...],
               ok: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "OpenAI-style error",
             "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    operation: dict[str, Any] = {"summary": summary,
                                 "responses": {"200": {"description": "OK", "content": ok}, "4XX": error, "5XX": error}}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"\{(\w+)\}", path)]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema, **_style(schema)}
                   for name, schema in QUERY.get((method, path), {}).items()]
    if parameters:
        operation["parameters"] = parameters
    if models:
        refs = [{"$ref": REF.format(model=m.__name__)} for m in models]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}}}
    return operation


@cache
def openapi_document(title: str, version: str, served: tuple[str, ...]) -> dict[str, Any]:
    """`served`: the names a request's `model` may take (any other is a 404)."""
    models = sorted({m for *_, ms, _ in ENDPOINTS for m in ms}, key=lambda m: m.__name__)
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    for schema in schemas["$defs"].values():
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"anyOf": [{"enum": list(dict.fromkeys(served))}, {"type": "null"}],
                                             "default": None,
                                             "description": "the served model (null: the same)"}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, ms, ok in ENDPOINTS:
        paths.setdefault(path, {})[method] = _operation(method, path, summary, ms, ok)
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": {**schemas["$defs"], "Error": ERROR}}}
