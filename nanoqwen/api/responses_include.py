"""`include` on `GET /v1/responses/{id}` and its input_items: a stored response's items with the parts it names.

The store keeps a response as create answered it (with the parts create's own `include` named); GET adds the parts
its `include` names. A reasoning item's `encrypted_content` is made from its text, as create makes it. Logprobs are
computed only when create asks for them: an output_text part of a response made without them gets `logprobs: []`
(OpenAI's empty list: none kept), not logprobs made up after the fact.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from werkzeug.datastructures import MultiDict

from nanoqwen.api.encode import encode_json
from nanoqwen.api.errors import APIError
from nanoqwen.api.responses_schemas import (
    INCLUDES,
    LOGPROBS_INCLUDE,
    REASONING_INCLUDE,
    ReasoningItem,
    encode_reasoning,
)

Json = dict[str, Any]
# the openai client's encoding of a list (`include[]=a&include[]=b`: array_format "brackets"), and the bare name
INCLUDE_KEYS = ("include[]", "include")


def query_include(args: Mapping[str, str]) -> frozenset[str]:
    """The `include` values of a GET's query (Flask's MultiDict: each repeated key's values), each one this server
    produces (else a 400 naming `include`)."""
    query = MultiDict(args)
    names = [name for key in INCLUDE_KEYS for name in query.getlist(key)]
    for name in names:
        if name not in INCLUDES:
            raise APIError(400, f"Unsupported parameter 'include': include \"{name}\": this server does not produce it",
                           param="include", code="unsupported_parameter")
    return frozenset(names)


def with_parts(item: Json, include: frozenset[str]) -> Json:
    """`item` (an output or input item, as stored) with the parts `include` names that it lacks. A bare reasoning
    input item (an id only, standing for a stored one: ReasoningItem.bare) has no text of its own to encode: left as
    create stored it, not given an encrypted_content of nothing."""
    if item.get("type") == "reasoning" and REASONING_INCLUDE in include and not item.get("encrypted_content"):
        reasoning = ReasoningItem.model_validate(item)
        if not reasoning.bare:
            item["encrypted_content"] = encode_reasoning(reasoning.text)
    if item.get("type") == "message" and LOGPROBS_INCLUDE in include:
        for part in item["content"]:
            if part.get("type") == "output_text":
                part.setdefault("logprobs", [])
    return item


def response_with_parts(body: bytes, include: frozenset[str]) -> bytes:
    """A stored response's encoding (`body`) with the parts `include` names in its output items."""
    response = json.loads(body)
    for item in response["output"]:
        with_parts(item, include)
    return encode_json(response)
