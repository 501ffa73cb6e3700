"""Request schema of `POST /v1/responses` (OpenAI's Responses API), strict as chat's is.

A request is translated into the chat request it amounts to (`to_chat`): messages for the input
items, chat's tools, tool_choice and response_format, so that templating, grammars, sampling and
tool-call parsing are chat's. Fields that cannot change the answer are accepted and ignored
(metadata is echoed back); those that would but are not implemented are refused naming them.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nanoqwen.api.errors import APIError, FieldNames
from nanoqwen.api.schemas import (
    FUNCTION_NAME,
    ChatCompletionRequest,
    ChatTemplateKwargs,
    JsonObjectFormat,
    Metadata,
    PromptCacheBreakpoint,
    ReasoningEffort,
    Refused,
    ServiceTier,
    Strict,
    Temperature,
    TextFormat,
    Tool,
    TopP,
    Verbosity,
    _sampling_schema,
    _text_or,
    check_stream_options,
    object_parameters,
    parse_chat_request,
    parsed_once,
    refused,
    same_json,
    tool_choice_of,
    validate_body,
)
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine.validation import MAX_TOP_LOGPROBS

LOGPROBS_INCLUDE = "message.output_text.logprobs"
REASONING_INCLUDE = "reasoning.encrypted_content"
INCLUDES = (LOGPROBS_INCLUDE, REASONING_INCLUDE)
MIN_OUTPUT_TOKENS = 16  # OpenAI's minimum for max_output_tokens
MEDIA_PARTS = ("input_image", "input_file", "input_audio")
# chat's fields as a Responses request names them, in the errors of the chat request it amounts to (to_chat)
RESPONSES_NAMES = FieldNames({"messages": "input", "max_completion_tokens": "max_output_tokens",
                              "response_format": "text.format", "reasoning_effort": "reasoning.effort"})


def _check_part(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") in MEDIA_PARTS:
        raise PydanticCustomError("unsupported", "{type} content parts: this server is text only",
                                  {"type": value["type"]})
    return value


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None  # a caching hint


class OutputText(Strict):
    """An earlier answer's text, as clients resend it (its annotations and logprobs do not reach the prompt)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class OutputRefusal(Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | OutputText | OutputRefusal, Field(discriminator="type"), BeforeValidator(_check_part)]


class MessageItem(Strict):
    """EasyInputMessage and the `type: "message"` items (input messages, and earlier output messages)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: _text_or(Part)
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, OutputRefusal) else p.text for p in self.content)


# a call the model made itself (every call here, as `allowed_callers: ["direct"]`), not a program's; input_items lists
# it back as sent
DirectCaller = refused({"type": "direct"}, kept=True)


class FunctionCallItem(Strict):
    """A call as the model wrote it: OpenAI takes any name and arguments string (a call cut short, `{"b": `)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)  # as an output's: one with "" could never be answered
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    # Refused unless absent or "not used": tool-search namespaces, programmatic and asynchronous calls.
    namespace: Refused = None
    caller: DirectCaller = None
    async_: refused(False) = Field(None, alias="async")

    _decoded = field_validator("arguments", mode="wrap")(parsed_once)


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)  # chat's tool message needs one: refused here, naming this field
    output: _text_or(Annotated[InputText, BeforeValidator(_check_part)])
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    name: str | None = None  # the called function's: the template pairs outputs with calls by order
    namespace: Refused = None
    caller: DirectCaller = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


def encode_reasoning(text: str) -> str:
    """`encrypted_content`: the reasoning text, opaque to the client (not secret), so that a client that stores
    nothing (Codex's `store: false`) can send an answer's reasoning back."""
    return base64.b64encode(text.encode()).decode()


def _reasoning_schema(schema: dict[str, Any]) -> None:
    """ReasoningItem._has_text in the JSON schema (the OpenAPI document's): its text, or the id of a stored one."""
    schema["anyOf"] = [{"required": ["encrypted_content"], "properties": {"encrypted_content": {
        "type": "string", "minLength": 1}}}, {"required": ["id"], "properties": {"id": {"not": {"type": "null"}}}}]
    schema["anyOf"] += [{"required": [name], "properties": {name: {
        "type": "array", "contains": {"properties": {"text": {"minLength": 1}}}}}} for name in ("content", "summary")]


class ReasoningItem(Strict):
    model_config = ConfigDict(json_schema_extra=_reasoning_schema)

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("encrypted_content")
    @classmethod
    def _decodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ValueError("not the encrypted_content of one of this server's answers") from None
        return value

    @model_validator(mode="after")
    def _has_text(self) -> ReasoningItem:
        if self.id is None and self.bare:
            raise PydanticCustomError("invalid", "a reasoning item needs its content, encrypted_content or summary, "
                                      "or the id of a stored response's reasoning item")
        return self

    @property
    def bare(self) -> bool:
        """Only an id, no text (as OpenAI's clients send a stored reasoning item back): it stands for that item. `text`
        without decoding: a non-empty encrypted_content that passed _decodes decodes to something."""
        return not (self.encrypted_content or any(part.text for part in [*(self.content or []), *self.summary]))

    @property
    def text(self) -> str:
        """Its content's text, else its encrypted_content's, else its summary's (the first that says anything). An
        empty encrypted_content says nothing, as null: OpenAI's is "populated" only where `include` asks for it (null
        otherwise), OpenAI-compatible servers send "" for one not populated, and vLLM's reads a non-empty one only."""
        if content := "".join(c.text for c in self.content or []):
            return content
        if self.encrypted_content:
            return base64.b64decode(self.encrypted_content).decode()
        return "".join(s.text for s in self.summary)


class ItemReference(Strict):
    """An input or output item of a stored response, by id: replaced by that item before templating."""

    type: Literal["item_reference"] = "item_reference"  # OpenAI's may be left out (_check_item), as the document says
    id: str


def referred_id(item: Any) -> str | None:
    """The id of the stored item an input item stands for: an item reference's, a bare reasoning item's."""
    if isinstance(item, ItemReference) or (isinstance(item, ReasoningItem) and item.bare):
        return item.id
    return None


ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning", "item_reference")


def _check_item(value: Any) -> Any:
    """An item without a type is an EasyInputMessage (with a role or content), else an item reference (OpenAI's type
    is optional for both); other item types are refused by name."""
    if isinstance(value, dict) and "type" not in value:
        return {**value, "type": "message" if "role" in value or "content" in value else "item_reference"}
    if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] not in ITEM_TYPES:
        raise PydanticCustomError("unsupported", "input items of type \"{type}\" are not implemented",
                                  {"type": value["type"]})
    return value


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
InputItem = Annotated[Item | ItemReference, Field(discriminator="type"), BeforeValidator(_check_item)]


CHAT_TOOL_FIELDS = {"name", "description", "parameters", "strict"}


def _check_tool(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] != "function":
        raise PydanticCustomError("unsupported", "{type} tools are not implemented (type \"function\" only)",
                                  {"type": value["type"]})
    return value


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Refused unless absent or "not used": tool search, programmatic and asynchronous calling, a schema for the
    # tool's output.
    defer_loading: refused(False) = None
    allowed_callers: refused(["direct"]) = None
    async_: refused(False) = Field(None, alias="async")
    output_schema: Refused = None
    _object_parameters = field_validator("parameters")(object_parameters)

    def to_chat(self) -> dict[str, Any]:
        """`strict` as sent: omitted, a keyword the grammar engine cannot enforce is ignored, as chat's default;
        the call is constrained all the same (ResponsePromptFields.to_chat's validation decides it): OpenAI's
        Responses default, the schema made strict where it can be, and one no grammar can hold leaving the call free,
        not refused."""
        return {"type": "function", "function": self.model_dump(include=CHAT_TOOL_FIELDS, exclude_none=True)}

    def echo(self) -> dict[str, Any]:
        """As a response lists it: OpenAI's FunctionTool fields (the refused ones accepted as "not used" left out),
        `strict` true when omitted, OpenAI's Responses default."""
        return {**self.model_dump(include={"type", *CHAT_TOOL_FIELDS}), "strict": self.strict is not False}


class NamedFunction(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


ToolChoice = tool_choice_of(NamedFunction)


class TextJsonSchemaFormat(Strict):
    """`text.format` json_schema: chat's `response_format.json_schema`, flat."""

    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: Annotated[TextFormat | JsonObjectFormat | TextJsonSchemaFormat, Field(discriminator="type")] | None = None
    verbosity: Verbosity = None


class ReasoningConfig(Strict):
    effort: ReasoningEffort | None = None  # as chat's reasoning_effort
    # No summaries: "auto" lets the model give none (`summary: []`); "concise"/"detailed" ask for one we cannot make.
    summary: Literal["auto"] | None = None
    generate_summary: Literal["auto"] | None = None
    context: Literal["auto"] | None = None
    mode: Literal["standard"] | None = None

    @field_validator("summary", "generate_summary", mode="before")
    @classmethod
    def _no_summaries(cls, value: Any) -> Any:
        if value in ("concise", "detailed"):
            raise PydanticCustomError("unsupported", "reasoning summaries are not implemented (\"auto\" gives none)")
        return value


class ResponsePromptCacheOptions(Strict):
    """Caching hints (the prefix cache is automatic); `prewarm: true` would generate nothing: refused."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m", "12h"] | None = None
    comparison_response_id: str | None = None  # asks for cache diagnostics where offered: none here
    prewarm: refused(False) = None


class ResponseStreamOptions(Strict):
    include_obfuscation: bool | None = None  # padding of the events: nothing to pad here


def _prompt_schema(schema: dict[str, Any]) -> None:
    """to_chat's rule in the JSON schema (the OpenAPI document's): a prompt from the input, the instructions or
    the previous response."""
    schema["anyOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                       for name in ("input", "instructions", "previous_response_id")]


def _request_schema(schema: dict[str, Any]) -> None:
    """parse_responses_request's rules too: stream_options with stream only."""
    _sampling_schema(schema)
    _prompt_schema(schema)


class ResponsePromptFields(Strict):
    """The fields that make a response's prompt: the input token count's body, and create's first."""

    model_config = ConfigDict(json_schema_extra=_prompt_schema)

    model: str | None = None
    input: _text_or(InputItem) = Field(default_factory=list)
    instructions: str | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's extra field, as chat's
    text: TextConfig | None = None
    tools: list[Annotated[FunctionTool, BeforeValidator(_check_tool)]] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # "auto": a prompt past the context loses whole items from the start (never a system or developer message)
    truncation: Literal["auto", "disabled"] | None = None
    conversation: Refused = None  # would add a stored conversation's items: not implemented
    _chat_tools: list[Tool] | None = PrivateAttr(None)  # the tools as its first chat request validated them (to_chat)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise PydanticCustomError("unsupported", "tool_choice of type \"{type}\" is not implemented",
                                      {"type": str(value.get("type"))})
        return value

    @property
    def input_items(self) -> list[Item | ItemReference]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def chat_fields(self) -> dict[str, Any]:
        """The chat request's fields besides its messages (None: unset)."""
        body: dict[str, Any] = {}
        # Without tools Responses takes parallel_tool_calls and tool_choice "auto" (its default; both echoed), which
        # chat refuses: they ask for nothing there (a choice that needs tools was refused: _check_prompt_fields)
        if self.tools:
            body["tools"] = self._chat_tools or [tool.to_chat() for tool in self.tools]
            body["parallel_tool_calls"] = self.parallel_tool_calls
            if isinstance(self.tool_choice, NamedFunction):
                body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
            else:
                body["tool_choice"] = self.tool_choice
        if self.reasoning is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = self.chat_template_kwargs.model_dump(exclude_none=True)
        if self.text is not None and self.text.format is not None:
            fmt = self.text.format
            schema = fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
            body["response_format"] = {"type": fmt.type, **({"json_schema": schema} if schema else {})}
        return body

    def to_chat(self, items: list[Item]) -> ChatCompletionRequest:
        """The chat request this one amounts to for `items` (the earlier items, then its input, references
        resolved)."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        messages += chat_messages(items)
        if not messages:
            raise APIError(400, "input must not be empty", param="input")
        body = {"messages": messages, **self.chat_fields()}
        # no budget: not a client's body (its input was counted as this request's), and a stored history (bounded by
        # the store) may hold more values than a body, a long agent loop's calls' arguments
        chat_req = parse_chat_request({k: v for k, v in body.items() if v is not None}, budget=None,
                                      omitted_strict_constrains=True, answers_paired=True, names=RESPONSES_NAMES)
        # a truncation's candidates share them, as validated (not again) and measured once (Tool.template): 4,000
        # tools made each candidate ~0.9 s
        self._chat_tools = chat_req.tools
        return chat_req


class ResponseCountRequest(ResponsePromptFields):
    """`POST /v1/responses/input_tokens`: OpenAI's body is the prompt's fields; any other field is refused."""

    personality: Refused = None  # a style preset (a system prompt of OpenAI's): not implemented


class ResponseCreateRequest(ResponsePromptFields):
    model_config = ConfigDict(json_schema_extra=_request_schema)

    store: bool | None = True
    stream: bool | None = False
    # generated detached from the request (responses_background): needs `store`, as OpenAI's
    background: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    include: list[str] | None = Field(None, json_schema_extra={"items": {"enum": list(INCLUDES)}})
    max_output_tokens: int | None = Field(None, ge=MIN_OUTPUT_TOKENS)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI's caps calls to built-in tools, of which this server has none: echoed, no function call is dropped by it
    max_tool_calls: int | None = Field(None, ge=1)
    # Accepted, do not change the answer (metadata is echoed back).
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: ResponsePromptCacheOptions | None = None
    service_tier: ServiceTier | None = None
    # Would change what is generated or where it goes, not implemented: refused unless absent or "not used".
    background_options: Refused = None
    prompt: Refused = None
    context_management: refused([]) = None
    image: Refused = None
    access_programs: Refused = None
    moderation: Refused = None

    @field_validator("include")
    @classmethod
    def _check_include(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name not in INCLUDES:
                raise PydanticCustomError("unsupported", "include \"{name}\": this server does not produce it",
                                          {"name": name})
        return value

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    @property
    def wants_encrypted_reasoning(self) -> bool:
        return REASONING_INCLUDE in (self.include or [])

    def chat_fields(self) -> dict[str, Any]:
        return {**super().chat_fields(), "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "logprobs": self.wants_logprobs,
                "top_logprobs": self.top_logprobs if self.wants_logprobs else None}


def chat_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Chat messages for input items: consecutive function calls (and the reasoning and text before them) make
    one assistant turn with tool_calls; a reasoning item is the following assistant turn's reasoning_content. One
    that no assistant item follows before the next message (an answer cut in its reasoning) is a turn of its own with
    no text, as chat's client resends that answer: not a later turn's reasoning, nor dropped. Tool outputs leave it
    pending: a turn between a call and its output would split them."""
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None

    def assistant(calls: bool) -> dict[str, Any]:
        """The assistant turn to add to: the last one, unless reasoning starts a new one or text follows calls."""
        nonlocal reasoning
        last = messages[-1] if messages else None
        if reasoning is None and last is not None and last["role"] == "assistant" \
                and (calls or not last.get("tool_calls")):
            return last
        messages.append({"role": "assistant", "content": ""})
        if reasoning is not None:
            messages[-1]["reasoning_content"], reasoning = reasoning, None
        return messages[-1]

    def unanswered_reasoning() -> None:
        if reasoning is not None:
            assistant(calls=False)  # a turn of its own: reasoning pending starts one

    for item in items:
        if isinstance(item, ReasoningItem):
            if item.text:
                reasoning = (reasoning or "") + item.text
        elif isinstance(item, MessageItem) and item.role == "assistant":
            assistant(calls=False)["content"] += item.text
        elif isinstance(item, MessageItem):
            unanswered_reasoning()
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            assistant(calls=True).setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    unanswered_reasoning()
    return messages


def check_items(items: list[Item], first_input: int) -> dict[int, str]:
    """A conversation's items (a previous response's, then the input from `first_input` on) as OpenAI checks them,
    once, before any is dropped to fit the context; the calls the input resends (resent_calls), by their place in the
    input, with the ids of the history's calls they are."""
    check_unique_ids(items)
    resent = resent_calls(items, first_input)
    check_call_outputs(items, first_input, resent.keys())
    return {i - first_input: call_id for i, call_id in resent.items()}


def resent_calls(items: list[Item], first_input: int) -> dict[int, str]:
    """The input's function_calls sent again without their id (optional in OpenAI's input item) beside the
    previous_response_id whose history left them unanswered (that response's own calls): the same call_id and name,
    arguments the same JSON (a client's re-serialisation, JSON.stringify's compact one, is the same call). A client
    sending the calls of the response it answers, with their outputs, got "Duplicate function_call"; with the id, it
    is OpenAI's duplicate item (check_unique_ids). Each is dropped once: a call the history answered, or one resent
    twice, is a second call of its call_id (check_call_outputs refuses it), not an input that vanishes. By place,
    with the id of the history's call (stored items have ids)."""
    answered = {item.call_id for item in items[:first_input] if isinstance(item, FunctionCallOutputItem)}
    pending = {item.call_id: item for item in items[:first_input]
               if isinstance(item, FunctionCallItem) and item.call_id not in answered}
    resent = {}
    for i, item in enumerate(items[first_input:], first_input):
        if isinstance(item, FunctionCallItem) and item.id is None and (call := pending.get(item.call_id)) is not None \
                and call.name == item.name and _same_arguments(call.arguments, item.arguments):
            del pending[item.call_id]
            resent[i] = str(call.id)
    return resent


def _same_arguments(first: str, second: str) -> bool:
    if first == second:
        return True
    try:
        return same_json(json.loads(first), json.loads(second))
    except (ValueError, RecursionError):  # not JSON (a model's call may not be), or nested past the parser's reach
        return False


def check_unique_ids(items: list[Item]) -> None:
    """OpenAI's rule: an item's id once in the conversation (a previous response's items resent with its
    previous_response_id, the same item referred to twice: it would be templated twice)."""
    seen: set[str] = set()
    for item in items:
        if item.id is None:
            continue
        if item.id in seen:
            raise APIError(400, f"Duplicate item found with id {item.id}. Remove duplicate items from your input and "
                                "try again.", param="input")
        seen.add(item.id)


def check_call_outputs(items: list[Item], first_input: int, resent: Collection[int]) -> None:
    """OpenAI's pairing of the items (a previous response's, then the input from `first_input` on): each
    function_call_output answers a function_call before it, and each function_call is answered. Its messages and
    param, word for word. Each call is answered once, as OpenAI's "Each function_call must have exactly one matching
    function_call_output" (reported: a client's per-turn ids, `terminal:0` on two turns, at the second output), and
    so a call_id is one call's: the template would pair a second call or output by order. Those name the repeat (in the
    input: the history before it was checked so): a second output with OpenAI's words, a second call never answered
    with ours. Not chat's stricter order (the answers right after their calls, before any other message:
    check_tool_answers), which OpenAI's Responses API is not known to ask: items between a call and its output (a
    reasoning item between two calls, a message) template as they come."""
    unanswered: dict[str, None] = {}  # call ids, in order
    called: set[str] = set()
    answered: set[str] = set()
    repeats: dict[str, int] = {}  # a call_id's second call, by index
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallItem) and i not in resent:
            if item.call_id in called:
                repeats.setdefault(item.call_id, i)
            called.add(item.call_id)
            unanswered[item.call_id] = None
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise APIError(400, f"No tool call found for function call output with call_id {item.call_id}.",
                               param="input")
            if item.call_id in answered:
                raise APIError(400, f"Duplicate function_call_output for call_id '{item.call_id}'. Each "
                               "function_call must have exactly one matching function_call_output",
                               param=f"input.[{i - first_input}].call_id")
            answered.add(item.call_id)
            unanswered.pop(item.call_id, None)
    if repeats:  # a second call no output after it answered
        call_id, i = next(iter(repeats.items()))
        raise APIError(400, f"Duplicate function_call for call_id '{call_id}'. Each function_call must have a call_id "
                       "of its own.", param=f"input.[{i - first_input}].call_id")
    if unanswered:
        raise APIError(400, f"No tool output found for function call {next(iter(unanswered))}.", param="input")


def _check_prompt_fields(req: ResponsePromptFields) -> None:
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                            "specified.", param="tool_choice")
    if isinstance(req.tool_choice, NamedFunction) and req.tool_choice.name not in {t.name for t in req.tools or []}:
        raise APIError(400, f"Invalid value for 'tool_choice': no tool named '{req.tool_choice.name}' in 'tools'",
                       param="tool_choice")


def parse_responses_request(body: Any, budget: Budget | None) -> ResponseCreateRequest:
    req = validate_body(ResponseCreateRequest, body, budget)
    check_stream_options(req)
    _check_prompt_fields(req)
    if req.background and req.store is False:
        raise APIError(400, "Background mode requires 'store' to be true.", param="background")
    if req.top_logprobs and not req.wants_logprobs:  # OpenAI's answers `logprobs: []`: a silent ignore
        raise APIError(400, f"top_logprobs needs include [\"{LOGPROBS_INCLUDE}\"]: without it no logprobs are "
                       "returned", param="top_logprobs")
    return req


def parse_count_request(body: Any, budget: Budget | None) -> ResponseCountRequest:
    """A count's body is refused where a create's with the same fields would be, so that it counts the prompt
    that create would start."""
    req = validate_body(ResponseCountRequest, body, budget)
    _check_prompt_fields(req)
    return req
