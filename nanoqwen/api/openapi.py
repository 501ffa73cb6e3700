"""`GET /openapi.json`: the OpenAPI 3.1 document, its request schemas generated from the very
pydantic models that validate the requests, so it cannot drift from what the server accepts."""
from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nanoqwen.api.responses_schemas import ResponseCreateRequest
from nanoqwen.api.schemas import ChatCompletionRequest, CompletionRequest
from nanoqwen.api.tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizePromptRequest

REF = "#/components/schemas/{model}"
# (method, path, summary, request models (one of), streams)
ENDPOINTS: list[tuple[str, str, str, tuple[type[BaseModel], ...], bool]] = [
    ("post", "/v1/chat/completions", "OpenAI Chat Completions", (ChatCompletionRequest,), True),
    ("post", "/v1/completions", "OpenAI (legacy) Completions", (CompletionRequest,), True),
    ("post", "/v1/responses", "OpenAI Responses (stored per worker process, bounded)", (ResponseCreateRequest,), True),
    ("get", "/v1/responses/{response_id}", "A stored response", (), False),
    ("delete", "/v1/responses/{response_id}", "Deletes a stored response", (), False),
    ("get", "/v1/responses/{response_id}/input_items", "A stored response's input items", (), False),
    ("post", "/tokenize", "vLLM's tokenize: a prompt or chat messages to token ids",
     (TokenizePromptRequest, TokenizeChatRequest), False),
    ("post", "/detokenize", "vLLM's detokenize: token ids to text", (DetokenizeRequest,), False),
    ("get", "/v1/models", "The served model, as a list", (), False),
    ("get", "/v1/models/{model}", "One model", (), False),
    ("get", "/health", "Liveness and model info (503 while loading)", (), False),
    ("get", "/stats", "Serving statistics", (), False),
    ("get", "/metrics", "Prometheus metrics", (), False),
    ("get", "/openapi.json", "This document", (), False),
]
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _operation(summary: str, models: tuple[type[BaseModel], ...], streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string", "description": "`data: <chunk JSON>` events, then "
                                                                                "`data: [DONE]` (none for responses)"}}
    error = {"description": "OpenAI-style error",
             "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    operation: dict[str, Any] = {"summary": summary,
                                 "responses": {"200": {"description": "OK", "content": ok}, "4XX": error, "5XX": error}}
    if models:
        refs = [{"$ref": REF.format(model=m.__name__)} for m in models]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}}}
    return operation


@cache
def openapi_document(title: str, version: str) -> dict[str, Any]:
    models = sorted({m for *_, ms, _ in ENDPOINTS for m in ms}, key=lambda m: m.__name__)
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, ms, streams in ENDPOINTS:
        paths.setdefault(path, {})[method] = _operation(summary, ms, streams)
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": {**schemas["$defs"], "Error": ERROR}}}
