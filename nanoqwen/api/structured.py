"""The grammar a request's output must follow, compiled off the event loop (and cached by the engine's
Grammars): for chat the Hermes tool calls of `tool_choice` "required" or a named function, else the JSON
of `response_format` json_object / json_schema; for chat and completions vLLM's structured outputs
(`structured_outputs`, `guided_*`). None for free text."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nanoqwen.api.schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields
from nanoqwen.engine.grammar import ToolSpec

if TYPE_CHECKING:
    from nanoqwen.api.serving import Serving
    from nanoqwen.engine.grammar import Grammar


def output_grammar(serving: Serving, req: ChatCompletionRequest) -> Grammar | None:
    """Raises InvalidRequest (the 400) for a schema the grammar engine refuses."""
    grammars = serving.engine.grammars
    if req.forces_tool_call:
        tools = [ToolSpec(t.function.name, t.function.parameters, bool(t.function.strict)) for t in req.forced_tools]
        parallel = not isinstance(req.tool_choice, NamedToolChoice) and req.parallel_tool_calls is not False
        size = len(json.dumps([t.parameters for t in tools]))
        return serving.off_loop(size, grammars.tool_calls, tools, parallel, "tools")
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return structured_grammar(serving, req)
    if fmt.type == "json_object":
        return _json(serving, {"type": "object"}, False, "response_format")
    return _json(serving, fmt.json_schema.schema_, bool(fmt.json_schema.strict), "response_format")


def structured_grammar(serving: Serving, req: SamplingFields) -> Grammar | None:
    """vLLM's structured outputs; InvalidRequest naming the field for an invalid schema, regex or grammar.
    A schema keyword the grammar engine cannot enforce is refused (vLLM's guidance backend's rule)."""
    constraint = req.constraint
    if constraint is None:
        return None
    if constraint.kind in ("json", "json_object"):
        schema = constraint.value if constraint.kind == "json" else {"type": "object"}
        if req.structured_outputs is not None and req.structured_outputs.disable_additional_properties:
            schema = closed_objects(schema)
        return _json(serving, schema, True, constraint.param)
    text = json.dumps(constraint.value) if constraint.kind == "choice" else constraint.value
    return serving.off_loop(len(text), serving.engine.grammars.from_text, constraint.kind, text, constraint.param)


# JSON Schema's keywords whose value is a schema, a list of schemas, or a map of them ("items": either of the first two)
SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
             "propertyNames")
SUBSCHEMA_LISTS = ("items", "anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """vLLM's `disable_additional_properties`: the schema with `"additionalProperties": false` in each object
    schema that does not set it (llguidance, as JSON Schema, allows other properties by default)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed_objects(sub) for sub in value]
        elif key in SUBSCHEMA:
            out[key] = closed_objects(value)
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _json(serving: Serving, schema: dict[str, Any], strict: bool, param: str) -> Grammar:
    return serving.off_loop(len(json.dumps(schema)), serving.engine.grammars.json_schema, schema, strict, param)
