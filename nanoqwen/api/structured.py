"""The grammar a request's output must follow, compiled off the event loop (and cached by the engine's
Grammars): for chat the Hermes tool calls of `tool_choice` "required" or a named function; with "auto", calls that
follow it where the model opens one, beside free text (a strict tool) or the JSON of `response_format`; else that
JSON (json_object / json_schema); for chat and completions vLLM's structured outputs (`structured_outputs`,
`guided_*`). None for free text."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from nanoqwen.api.schema_patterns import ecma_patterns
from nanoqwen.api.schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields, Tool
from nanoqwen.api.serving import invalid_request
from nanoqwen.engine.call_arguments import call_arguments
from nanoqwen.engine.grammar import OverBudget, SchemaBudget, SchemaRefused, ToolSpec, held_json_schema, text_key
from nanoqwen.engine.object_runs import Merges
from nanoqwen.engine.validation import InvalidRequest

if TYPE_CHECKING:
    from nanoqwen.api.serving import Serving
    from nanoqwen.engine.grammar import Grammar, GrammarKey, Grammars
    from nanoqwen.engine.request import SamplingParams


Req = TypeVar("Req", bound=SamplingFields)
ANY_OBJECT: dict[str, Any] = {"type": "object"}
KEY_CHARS = 1 << 16  # about the longest cache key (its JSON) made in the tokenising pool; a longer one, the grammars'


@dataclass(frozen=True)
class JsonAnswer:
    """The JSON an answer must be (response_format's): its schema, strict or lenient, and the field that asks for it
    as the client's request names it (its 400's)."""

    schema: dict[str, Any]
    strict: bool
    param: str

    def key(self) -> list[Any]:
        """What makes its grammar (not its name)."""
        return [self.schema, self.strict]


@dataclass(frozen=True)
class OutputGrammar:
    """A request's output grammar and the field that asked for it, as the client's request names it: the param of the
    request's failure where its output can no longer follow it (Event.error_param). Made by output_grammar (chat) or
    structured_grammar, which know the branch they took: a grammar of calls' is `tools`, as their compile's 400 names
    it, where a call follows a schema of theirs (forced, or a strict tool under "auto", beside a JSON response_format
    too: either may have erred); calls under "auto" that follow no schema of the tools' (any JSON object) leave the
    JSON answer's."""

    grammar: Grammar
    param: str


def compiled(make: Callable[[Serving, Req], OutputGrammar | None], serving: Serving, req: Req,
             params: SamplingParams) -> None:
    """`params`' grammar and grammar_field, from make(serving, req) (output_grammar, structured_grammar): none for free
    text; an invalid one the 400 naming its field."""
    try:
        made = make(serving, req)
    except InvalidRequest as exc:
        raise invalid_request(exc) from None
    if made is not None:
        params.grammar, params.grammar_field = made.grammar, made.param


def output_grammar(serving: Serving, req: ChatCompletionRequest) -> OutputGrammar | None:
    """Raises InvalidRequest (the 400) for a schema the grammar engine refuses."""
    fmt, param = req.response_format, req.named("response_format")
    answer = None if fmt is None or fmt.type == "text" else JsonAnswer(ANY_OBJECT, False, param) \
        if fmt.type == "json_object" else JsonAnswer(fmt.json_schema.schema_, bool(fmt.json_schema.strict), param)
    if req.forces_tool_call:  # the answer is the call: a response_format beside it only checked (_tool_calls)
        return _calls(serving, req, req.forced_tools, answer)
    if req.constrains_calls:
        return _calls(serving, req, req.tools or [], answer)
    if answer is None:
        return structured_grammar(serving, req)
    return OutputGrammar(_json(serving, answer.schema, answer.strict, answer.param), answer.param)


def _calls(serving: Serving, req: ChatCompletionRequest, chosen: list[Tool],
           answer: JsonAnswer | None) -> OutputGrammar:
    """The grammar of calls to the `chosen` tools (Grammars.tool_calls), compiled off the loop. A forced call follows
    its tool's parameters (leniently unless strict); under "auto" an unconstrained tool's (strict: false; chat's
    default) arguments are any JSON object: OpenAI does not constrain them, nor vLLM's strict auto mode, and its schema
    is not compiled. `answer`: a JSON response_format's, the calls' alternative under "auto"; beside a forced call,
    only checked (_tool_calls)."""
    forced = req.forces_tool_call
    chosen = list({t.function.name: t for t in chosen}.values())  # a tool sent twice (the same: _check_tool_names)
    follows = [forced or t.function.constrained for t in chosen]  # a call to it follows its parameters
    tools = [ToolSpec(t.function.name, t.function.parameters if schema else ANY_OBJECT, bool(t.function.strict))
             for t, schema in zip(chosen, follows, strict=True)]
    parallel = not isinstance(req.tool_choice, NamedToolChoice) and req.parallel_tool_calls is not False
    grammar = _grammar(serving, _tool_calls_key, _tool_calls, tools, parallel, answer, not forced)
    return OutputGrammar(grammar, answer.param if answer is not None and not any(follows) else "tools")


def structured_grammar(serving: Serving, req: SamplingFields) -> OutputGrammar | None:
    """vLLM's structured outputs; InvalidRequest naming the field for an invalid schema, regex or grammar.
    A schema keyword the grammar engine cannot enforce is refused (vLLM's guidance backend's rule)."""
    constraint = req.constraint
    if constraint is None:
        return None
    if constraint.kind in ("json", "json_object"):
        schema = constraint.value if constraint.kind == "json" else ANY_OBJECT
        options = req.structured_outputs
        if constraint.kind == "json" and options is not None and options.disable_additional_properties:
            schema = closed_objects(schema)
        no_space = options is not None and bool(options.disable_any_whitespace)
        return OutputGrammar(_json(serving, schema, True, constraint.param, no_space), constraint.param)
    text = json.dumps(constraint.value) if constraint.kind == "choice" else constraint.value
    return OutputGrammar(_grammar(serving, _text_key, _from_text, constraint.kind, text, constraint.param),
                         constraint.param)


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `disable_additional_properties` (its _walk_json_for_additional_properties): a copy of the schema with
    `"additionalProperties": false` in each object, at any depth, that has `properties` or `patternProperties` and
    does not set it; `{"type": "object"}` alone stays open. Iterative: the schema is as deep as a body may be."""
    out = json.loads(json.dumps(schema))
    stack: list[Any] = [out]
    while stack:
        node = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        stack.extend(child for child in children if isinstance(child, (dict, list)))
        if isinstance(node, dict) and ("properties" in node or "patternProperties" in node):
            node.setdefault("additionalProperties", False)
    return out


def _grammar(serving: Serving, key_of: Callable[..., GrammarKey], make: Callable[..., Grammar], *args: Any) -> Grammar:
    """The grammar cached under key_of(*args) (what the request sent), looked up in the tokenising pool where its key is
    short to make (KEY_CHARS): a client re-sending its tools every turn never queues behind another's costly compiles;
    a longer key is made in the grammars' pool (a 10 MB tool list's JSON held a tokenising thread for 88 ms), and on a
    miss make(grammars, *args, key) runs there."""
    grammars = serving.engine.grammars
    key, grammar = serving.off_loop(0, _looked_up, grammars, key_of, *args)
    return grammar if grammar is not None else serving.compile_off_loop(_made, grammars, key, key_of, make, *args)


def _looked_up(grammars: Grammars, key_of: Callable[..., GrammarKey],
               *args: Any) -> tuple[GrammarKey | None, Grammar | None]:
    """(the key, its cached grammar); (None, None) where the key is longer than KEY_CHARS."""
    try:
        key = key_of(*args, limit=KEY_CHARS)
    except _LongKey:
        return None, None
    return key, grammars.cached(key)


def _made(grammars: Grammars, key: GrammarKey | None, key_of: Callable[..., GrammarKey],
          make: Callable[..., Grammar], *args: Any) -> Grammar:
    """In the grammars' pool: a long key made, and looked up (a short one again: a request queued behind one that
    sent the same finds its grammar before its schemas are rewritten and converted), then make(grammars, *args, key)
    on a miss, which compiles without looking it up again."""
    key = key_of(*args) if key is None else key
    if (grammar := grammars.cached(key)) is not None:
        return grammar
    return make(grammars, *args, key)


class _LongKey(Exception):
    pass


def _key(kind: str, value: Any, limit: int | None) -> GrammarKey:
    """(kind, json.dumps(value)); _LongKey where its JSON may pass `limit` characters (_within)."""
    if limit is not None and not _within(value, limit):
        raise _LongKey
    return kind, json.dumps(value)


def _within(value: Any, limit: int) -> bool:
    """Whether `value`'s JSON is at most about `limit` characters (_json_chars each value, dict key and separator): a
    walk that stops as soon as they are passed, where json.dumps of it all took 88 ms at 10 MB."""
    stack = [value]
    while stack:
        node = stack.pop()
        limit -= _json_chars(node)
        if isinstance(node, dict):
            for key, item in node.items():
                limit -= _json_chars(key)
                stack.append(item)
                if limit < 0:
                    return False
        elif isinstance(node, (list, tuple)):
            for item in node:
                limit -= 1
                stack.append(item)
                if limit < 0:
                    return False
        if limit < 0:
            return False
    return True


def _json_chars(value: Any) -> int:
    """About the characters json.dumps writes for `value` alone, erring high: a string's with its quotes and escapes
    (ensure_ascii: each UTF-16 unit of a non-ASCII one or a control character `\\uXXXX`, 6), an int's digits (from its
    bits: str() of one past 4,300 digits raises), a float's longest repr, `false`'s (null, true, a container's
    brackets); and 4 for the separators around it."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable():
            return 6 + len(value) + value.count('"') + value.count("\\")
        return 6 + 3 * len(value.encode("utf-16-le", "surrogatepass"))
    if isinstance(value, int):
        return 6 + value.bit_length() // 3
    return 28 if isinstance(value, float) else 9


def _json(serving: Serving, schema: dict[str, Any], strict: bool, param: str, no_space: bool = False) -> Grammar:
    return _grammar(serving, _json_key, _json_schema, schema, strict, param, no_space)


def _json_key(schema: dict[str, Any], strict: bool, _param: str, no_space: bool,
              limit: int | None = None) -> GrammarKey:
    return _key("json_schema", [schema, strict, no_space], limit)


def _json_schema(grammars: Grammars, schema: dict[str, Any], strict: bool, param: str, no_space: bool,
                 key: GrammarKey) -> Grammar:
    """Off the loop: the schema prepared (_prepared: a copy as large as the schema) and compiled."""
    prepared, merges = _prepared(schema, param)
    return grammars.json_schema(prepared, strict, param, no_space, key, merges)


def _prepared(schema: Any, param: str, budget: SchemaBudget | None = None) -> tuple[Any, Merges]:
    """A schema as its grammar is given it: its patterns ECMA's (ecma_patterns' copy, its 400s naming `param`), charged
    to the request's `budget` (none: the schema alone); and what those checks merged, for the copy's weighing
    (held_json_schema's, Grammars.json_schema's) to merge each object once."""
    merges = Merges()
    return ecma_patterns(schema, param, budget, merges), merges


def _text_key(kind: str, text: str, _param: str, limit: int | None = None) -> GrammarKey:
    """The text is its own key: nothing to make, whatever `limit`."""
    return text_key(kind, text)


def _from_text(grammars: Grammars, kind: str, text: str, param: str, _key: GrammarKey) -> Grammar:
    return grammars.from_text(kind, text, param)


def _tool_calls_key(tools: list[ToolSpec], parallel: bool, answer: JsonAnswer | None, auto: bool,
                    limit: int | None = None) -> GrammarKey:
    return _key("tool_calls", [[(t.name, t.parameters, t.strict) for t in tools], parallel, answer and answer.key(),
                               auto], limit)


def _tool_calls(grammars: Grammars, tools: list[ToolSpec], parallel: bool, answer: JsonAnswer | None, auto: bool,
                key: GrammarKey) -> Grammar:
    """Off the loop, on a miss of `key` (what the request sent): the tools' parameters as held (_held) and the JSON
    answer's (_checked_answer), their sizes one SchemaBudget, and their calls' grammar compiled. `auto`: tool_choice
    "auto", where the answer is free text (no `answer`) or that JSON, and a call the model opens follows the grammar;
    else the call is forced, and an `answer` beside it only checked (_forced_beside). Where the calls' grammar's
    compile is refused (llguidance's lexer limit, which each schema's check alone does not reach: 40,000 enum
    strings), every lenient tool gives way as _held's do, its calls free, and the grammar is compiled once more: the
    refusal names the line where the lexer crossed its limit, not the schema that took it there (a lenient tool sent
    before a strict one had the 400 name the strict one), and freeing one tool a compile took one compile per tool
    (128 lenient tools: 112 compiles, 7.7 s of a compile thread's CPU)."""
    if answer is not None and not auto:
        return _forced_beside(grammars, tools, parallel, answer, key)
    budget = SchemaBudget()
    # what must hold is charged first, whatever the order sent: a lenient tool gives way to it (its calls free)
    firm = {i: _held(tool, auto, budget) for i, tool in enumerate(tools) if not _lenient(tool, auto)}
    checked = _checked_answer(answer, budget) if answer is not None else None
    tools = [firm[i] if i in firm else _held(tool, auto, budget) for i, tool in enumerate(tools)]
    try:
        return _compiled_calls(grammars, tools, parallel, checked, answer, auto, key)
    except SchemaRefused:  # only in the calls' grammar (llguidance's lexer limit): the lenient tools give way
        constrained = [tool.parameters != ANY_OBJECT and _lenient(tool, auto) for tool in tools]
        if not any(constrained):
            raise
    tools = [replace(tool, parameters=ANY_OBJECT, weight=None) if free else tool
             for tool, free in zip(tools, constrained, strict=True)]
    return _compiled_calls(grammars, tools, parallel, checked, answer, auto, key)


def _compiled_calls(grammars: Grammars, tools: list[ToolSpec], parallel: bool,
                    checked: tuple[dict[str, Any], int] | None, answer: JsonAnswer | None, auto: bool,
                    key: GrammarKey) -> Grammar:
    """The calls' grammar of `tools` (_held's), beside the JSON answer's schema `checked` (_checked_answer's)."""
    if checked is None:
        return grammars.tool_calls(tools, parallel, "tools", auto, key=key)
    schema, weight = checked
    return grammars.tool_calls(tools, parallel, "tools", False, schema, answer.strict, key, weight, answer.param)


def _forced_beside(grammars: Grammars, tools: list[ToolSpec], parallel: bool, answer: JsonAnswer,
                   key: GrammarKey) -> Grammar:
    """Forced calls, and the JSON `answer` beside them only checked: charged first, then compiled as it would be alone
    (its own 400, cached under its own key) once the request's schemas in all are within their bounds, before the
    calls' grammar, so that a request past them compiles nothing. The calls' grammar is the tools' alone, cached under
    their key (the same tools forced without an answer) and `key`: a changed answer beside the same tools recompiled
    them (two tools of 2,000 properties: 0.27 s, where their walk that charges them takes 17 ms)."""
    budget = SchemaBudget()
    alone, merges = _prepared(answer.schema, answer.param, budget)
    calls_key = _tool_calls_key(tools, parallel, None, False)
    calls = grammars.cached(calls_key)
    if calls is None:
        tools = [_held(tool, False, budget) for tool in tools]
    else:  # its tools checked when it compiled: only charged
        for tool in tools:
            ecma_patterns(tool.parameters, "tools", budget)
    answer_key = _json_key(answer.schema, answer.strict, answer.param, False)
    if grammars.cached(answer_key) is None:
        grammars.json_schema(alone, answer.strict, answer.param, key=answer_key, merges=merges)
    if calls is None:
        calls = grammars.tool_calls(tools, parallel, "tools", key=calls_key)
    return grammars.keep(key, calls)


def _lenient(tool: ToolSpec, auto: bool) -> bool:
    """Whether a tool's schema may give way: under "auto", strict not sent (Responses' default), and a schema at all
    (none: no arguments, any grammar holds)."""
    return auto and not tool.strict and bool(tool.parameters)


def _held(tool: ToolSpec, auto: bool, budget: SchemaBudget) -> ToolSpec:
    """A tool as its calls follow it, patterns ECMA's, charged to the request's `budget`, its schema checked and
    weighed here, once (patterns past the budget, too: what was charged before it keeps its schema). Under "auto" a
    lenient tool's (strict not sent: Responses' default) schema that no grammar can hold leaves its calls free, any
    JSON object (OpenAI: strict where it can be), and is charged nothing; a strict or forced tool's is the 400 naming
    tools and the tool: checked alone, its refusal says what in the schema is refused, where the calls' grammar's
    quoted that grammar's text."""
    lenient, before = _lenient(tool, auto), budget.copy()
    try:
        parameters, merges = _prepared(tool.parameters, "tools", budget)
        # the schema the calls' grammar holds (call_arguments; held_json_schema's copy where it cut a cycle of
        # `$ref`s); a firm tool's 400 is that grammar's, naming it (and would name `tools`): llguidance checked it once
        if tool.parameters:
            parameters, weight = held_json_schema(call_arguments(parameters), tool.strict, "tools", lenient, merges)
        else:
            weight = None
    except InvalidRequest as exc:
        if lenient:  # its calls free: its schema, never compiled, charged nothing
            budget.refund(before)
            return replace(tool, parameters=ANY_OBJECT)
        if isinstance(exc, OverBudget):  # the request's schemas in all, naming their largest part, not this tool
            raise
        raise InvalidRequest(f"{exc} (in the parameters of function {tool.name!r})", exc.param, exc.code) from None
    return replace(tool, parameters=parameters, weight=weight)


def _checked_answer(answer: JsonAnswer, budget: SchemaBudget) -> tuple[dict[str, Any], int]:
    """The JSON answer's schema, patterns ECMA's and charged to the request's `budget` after its firm tools', before
    its lenient ones (its 400 names the field with the budget's largest part), checked first for its own 400 naming
    its field; and its weight."""
    schema, merges = _prepared(answer.schema, answer.param, budget)
    return held_json_schema(schema, answer.strict, answer.param, merges=merges)
