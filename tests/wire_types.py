"""What a response body or stream event of ours says that the installed `openai` package's own types do not: each
payload validated strictly (JSON mode: no coercion of a mistyped value) into the type the client parses it into, then
every field it holds that the type does not declare (the package keeps unknown fields as extras, silently)."""
from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import pydantic

# (the type's name, the field): ours on purpose, each with its source
KNOWN_EXTRAS = {
    # vLLM's reasoning field, under both its names (README, "Taken from vLLM")
    ("ChatCompletionMessage", "reasoning_content"): "vLLM",
    ("ChatCompletionMessage", "reasoning"): "vLLM",
    ("ChoiceDelta", "reasoning_content"): "vLLM",
    ("ChoiceDelta", "reasoning"): "vLLM",
    # what OpenAI's stored chat completions say of their request (README, "Stored chat completions")
    **{("ChatCompletion", name): "OpenAI" for name in (
        "metadata", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty", "tool_choice", "tools",
        "response_format", "input_user", "request_id")},
    # OpenAI's response object has `store` (its API reference's examples; openai-go's Response.Store); the Python
    # package's Response model has no such field
    ("Response", "store"): "OpenAI",
    # OpenAI's event names the function (openai-go's ResponseFunctionCallArgumentsDoneEvent.Name); the Python
    # package's model has no such field
    ("ResponseFunctionCallArgumentsDoneEvent", "name"): "OpenAI",
}


def unknown_fields(value: Any, path: str, known: Collection[tuple[str, str]] = KNOWN_EXTRAS) -> list[tuple[str, str]]:
    """Where `value` (a parsed openai model) holds a field its type does not declare, `known` (type, field) aside: each
    field's path and its type's name."""
    if isinstance(value, pydantic.BaseModel):
        name = type(value).__name__
        found = [(f"{path}.{key}", name) for key in value.model_extra or {} if (name, key) not in known]
        for field in type(value).model_fields:
            found += unknown_fields(getattr(value, field), f"{path}.{field}", known)
        return found
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in unknown_fields(item, f"{path}[{i}]", known)]
    return []


def _known(error: Any, known: Collection[tuple[str, Any]]) -> bool:
    path = "." + ".".join(map(str, error["loc"]))
    return any(path.endswith("." + end) and error["input"] == value for end, value in known)


def wire_problems(kind: Any, payload: dict[str, Any], known: Collection[tuple[str, Any]] = ()) -> list[str]:
    """The ways `payload` is not a `kind` (an openai type, or a union of them): a field mistyped or missing, or one the
    type does not know and KNOWN_EXTRAS does not list. `known`: (a field's path or its end, a value) the type refuses
    where the API sends it (the caller says why)."""
    try:
        parsed = pydantic.TypeAdapter(kind).validate_json(json.dumps(payload), strict=True)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(map(str, error['loc']))}: {error['msg']} ({error['input']!r:.80})"
                for error in exc.errors() if not _known(error, known)]
    return [f"{field} (on {name})" for field, name in unknown_fields(parsed, "$")]
