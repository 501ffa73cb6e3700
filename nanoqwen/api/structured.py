"""The grammar a chat request's output must follow, compiled off the event loop (and cached by the
engine's Grammars): the Hermes tool calls of `tool_choice` "required" or a named function, else the
JSON of `response_format` json_object / json_schema; None for free text."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from nanoqwen.api.schemas import ChatCompletionRequest, NamedToolChoice
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
        return None
    if fmt.type == "json_object":
        schema, strict = {"type": "object"}, False
    else:
        schema, strict = fmt.json_schema.schema_, bool(fmt.json_schema.strict)
    return serving.off_loop(len(json.dumps(schema)), grammars.json_schema, schema, strict, "response_format")
