"""Request schema of `POST /v1/chat/completions` (OpenAI's fields plus vLLM's extensions).

Strict, as OpenAI is: no type coercion ("5" is not an int, true is not a number; ints are fine
for floats), unknown fields are refused ("Unrecognized request argument supplied"), and fields
that would change the answer but are not implemented (functions, audio, vLLM's guided decoding, ...)
are refused naming the field rather than silently dropped. Harmless metadata is accepted and
ignored. Failures become 400 `invalid_request_error` naming the offending `param` in OpenAI's
notation (`messages.[0].role`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from nanoqwen.api import strict_json
from nanoqwen.api.errors import CHAT_NAMES, APIError, FieldNames, param_name, request_too_large
from nanoqwen.api.strict_json import Budget, JSONError
from nanoqwen.engine.call_arguments import root_chain
from nanoqwen.engine.request import SamplingParams
from nanoqwen.engine.validation import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, shown

NonEmptyStr = Annotated[str, Field(min_length=1)]  # stop's validator checks it first: for the OpenAPI document
# OpenAI's sampling ranges, shared by chat, legacy completions and Responses
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]  # 0: the most likely token alone (OpenAI takes it)
MAX_CHOICES = 128  # n, and n × prompts of a batched completion
INT64 = {"ge": -(2**63), "le": 2**63 - 1}
# Content part types that carry other media than text: OpenAI's, then vLLM's (video_url, audio_url).
MEDIA_PART_TYPES = ("image_url", "input_audio", "file", "video_url", "audio_url")
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
TOKEN_ID = r"^[0-9]+$"  # a logit_bias key
LACKING = ("extra_forbidden", "unsupported")  # the error types of a field this server does not have


class Refusal:
    """Marks a field this server refuses (a 400 naming it) unless absent or "not used": null, or one of `unused`,
    the values besides null that mean so (clients and SDKs often send them explicitly). Its validator and its JSON
    schema (the OpenAPI document's enum) read the same values, so the document does not offer what is refused."""

    def __init__(self, *unused: Any, kept: bool = False) -> None:
        self.unused = unused
        self.kept = kept  # an unused value stays the field's (listed back as sent), else it reads as absent

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "enum": [None, *self.unused]}

    def check(self, value: Any) -> Any:
        if value is None or any(same_json(value, u) for u in self.unused):
            return value if self.kept else None
        if not self.unused:
            raise PydanticCustomError("unsupported", "this server does not implement it")
        raise PydanticCustomError("unsupported", "this server does not implement it; accepted: {accepted}",
                                  {"accepted": ", ".join(json.dumps(u) for u in (None, *self.unused))})


def same_json(value: Any, other: Any) -> bool:
    """Equal as JSON values, at every depth: by type too, as JSON (and the document's enum) tells them apart (0 is not
    false, [0] is not [false]), but 1 is 1.0 (ints are fine for floats); an object's keys in any order."""
    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if isinstance(value, dict):
        return isinstance(other, dict) and value.keys() == other.keys() and all(
            same_json(v, other[k]) for k, v in value.items())
    if isinstance(value, list):
        return isinstance(other, list) and len(value) == len(other) and all(map(same_json, value, other))
    return value == other and (type(value) is type(other) or number(value) and number(other))


def refused(*unused: Any, kept: bool = False) -> Any:
    """The type of a field refused unless absent or one of `unused` (see Refusal): the field accepted at the
    values that change nothing, and read as absent unless `kept`. A validator does not run on a default: an absent
    field costs nothing."""
    return Annotated[Any, Refusal(*unused, kept=kept)]


Refused = refused()  # refused unless absent (or null)
Verbosity = refused("medium")  # Qwen3 has no verbosity control: only OpenAI's default, what it does anyway


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def object_parameters(cls: type, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    """A function tool's `parameters` (chat's and Responses'): a call's arguments are a JSON object (Hermes'
    `"arguments": {...}`, OpenAI's), so a schema typed otherwise, at the root or where its `$ref`s lead (root_chain),
    is OpenAI's 400; a call forced to follow it was the markup left in `content`, not a call. An untyped root is
    accepted (OpenAI refuses it; vLLM and llama.cpp take it): the calls' grammar holds it to an object. Not checked
    where the function's name was refused: the name's error is the request's (OpenAI's); checked without a name, its
    error named function 'None'."""
    if value is None or "name" not in info.data:
        return value
    for node in root_chain(value):
        if "type" in node and node["type"] != "object":
            raise PydanticCustomError("invalid_function_parameters", "Invalid schema for function '{name}': schema "
                                      "must be a JSON Schema of 'type: \"object\"', got 'type: {got}'.",
                                      {"name": info.data.get("name"), "got": json.dumps(node["type"])})
    return value


def function_only(cls: type, value: Any) -> Any:
    """A tool's or a history's tool call's `type`: OpenAI's free-form (grammar) tools and their calls, "custom", are
    not implemented (a 400 naming the type, not the `custom` object beside it as an unknown field)."""
    if value == "custom":
        raise PydanticCustomError("unsupported",
                                  "custom tools and their calls are not implemented (type \"function\" only)")
    return value


class FunctionDefinition(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, shown to the model as it is
    strict: bool | None = None
    # The Responses API's: `strict` omitted is OpenAI's default there, a call constrained (leniently: a keyword the
    # grammar engine cannot enforce is ignored); chat's omitted is not strict
    _omitted_constrains: bool = PrivateAttr(False)

    _object_parameters = field_validator("parameters")(object_parameters)

    @model_validator(mode="after")
    def _omitted_default(self, info: ValidationInfo) -> FunctionDefinition:
        """Set as it is validated (validate_body's context), so that a check inside validation sees it as it is."""
        self._omitted_constrains = bool((info.context or {}).get("omitted_strict_constrains"))
        return self

    @property
    def constrained(self) -> bool:
        """A call to it follows its parameters' schema under tool_choice "auto" (OpenAI's strict function calling;
        vLLM's strict auto mode constrains `strict: true` tools alone)."""
        return self.strict is True or (self.strict is None and self._omitted_constrains)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition
    _template: tuple[dict[str, Any], int] | None = PrivateAttr(None)  # template()'s

    def template(self) -> tuple[dict[str, Any], int]:
        """The form the chat template takes, and its JSON's length: made once for a tool that many requests share (a
        Responses truncation's candidates: ResponsePromptFields.to_chat)."""
        if self._template is None:
            form = self.model_dump(exclude_none=True)
            self._template = (form, len(json.dumps(form)))
        return self._template

    _check_type = field_validator("type", mode="before")(function_only)


class FunctionName(Strict):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(Strict):
    """`tool_choice` naming the function the answer must call."""

    type: Literal["function"]
    function: FunctionName


def _string_or_not(value: Any) -> str:
    """The tag of a union of a string form and another: the discriminator reports only the matching form's errors."""
    return "string" if isinstance(value, str) else "other"


def tool_choice_of(named: type[BaseModel]) -> Any:
    """tool_choice's type: "none", "auto", "required", or the `named` object naming the function to call. The
    discriminator sends an object straight to `named`, so its errors are the ones reported."""
    return Annotated[Annotated[Literal["none", "auto", "required"], Tag("string")] | Annotated[named, Tag("other")],
                     Discriminator(_string_or_not)]


ToolChoice = tool_choice_of(NamedToolChoice)


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} = any JSON value
    # true: a keyword the grammar engine cannot enforce is a 400; false (OpenAI's default): it is ignored
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


MAX_REQUEST_ID = 256  # characters: it is repeated in every chunk of a stream
GuidanceBackend = refused("auto", "guidance")  # vLLM's backend names: llguidance's is "guidance"
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_KINDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# OpenAI's reasoning efforts (chat's reasoning_effort, Responses' reasoning.effort): Qwen3 has no levels, see thinks
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# OpenAI's metadata limits (chat's and Responses'): 16 pairs, keys of 64 characters at most, values of 512
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=METADATA_KEY_CHARS)],
                          Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS)]],
                     Field(max_length=METADATA_KEYS)]
# OpenAI's processing tiers, the names its clients send (chat's; "ultrafast" Responses' only, taken on both): one
# tier here, the answer is the same; a name OpenAI does not know is a 400, as there.
ServiceTier = Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"]


def thinks(effort: str) -> bool:
    """Whether a reasoning effort turns Qwen3's thinking on: "none" off (as vLLM maps it), any other on."""
    return effort != "none"


def _loads_counted(text: str, what: str, info: ValidationInfo | None) -> Any:
    """JSON in a string of a request, within a body's limits (a JSONError is a ValueError); its values charged to a
    client body's budget (validate_body's context, in `info`): past it, a 413 as for the body."""
    budget = (info.context or {}).get("budget") if info is not None else None
    try:
        return strict_json.loads(text, what, budget=budget)
    except JSONError as exc:
        if exc.status == 413 and budget is not None:
            raise request_too_large(str(exc)) from None
        raise


def _schema_or_encoded(value: Any, info: ValidationInfo) -> Any:
    """A string decoded within the limits of a request body, which it escaped."""
    if isinstance(value, str):
        value = _loads_counted(value, "the string (a JSON schema's JSON encoding)", info)
    if not isinstance(value, dict):
        raise ValueError("must be a JSON schema: an object, or its JSON encoding")
    return value


# vLLM's `json`: a JSON schema, or its JSON encoding
SchemaOrEncoded = Annotated[dict[str, Any], BeforeValidator(_schema_or_encoded),
                            WithJsonSchema({"anyOf": [{"type": "object"}, {"type": "string"}]})]
Choices = Annotated[list[str], Field(min_length=1)]


@dataclass(frozen=True)
class Constraint:
    """One kind of vLLM structured output, as the request asked for it."""

    kind: str  # one of STRUCTURED_KINDS
    value: Any  # json: the schema; regex, grammar: the text; choice: the strings; json_object: True
    param: str  # the field that holds it: its compile errors' param (`structured_outputs.regex`, `guided_regex`)

    @property
    def field(self) -> str:
        """The request's top-level field."""
        return self.param.split(".")[0]


def _one_kind_schema(schema: dict[str, Any]) -> None:
    """StructuredOutputs._one_kind in its JSON schema (the OpenAPI document's)."""
    schema["oneOf"] = [{"required": [kind], "properties": {kind: {"not": {"type": "null"}}}}
                       for kind in STRUCTURED_KINDS]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one kind of constraint, and its options."""

    model_config = ConfigDict(json_schema_extra=_one_kind_schema)

    json_: SchemaOrEncoded | None = Field(None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None  # Lark, or llama.cpp's GBNF
    # true: any JSON object. false is a kind (vLLM counts it), one that asks for nothing: always refused
    json_object: Annotated[bool, WithJsonSchema({"const": True})] | None = None
    backend: GuidanceBackend = None
    disable_fallback: bool | None = None  # honoured whatever its value: llguidance never falls back
    # true: JSON's separators "," and ":" (vLLM's guidance backend's); else ", " and ": " (nanoqwen/engine/grammar.py)
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None  # true: `json`'s objects take only the properties it names
    whitespace_pattern: Refused = None
    structural_tag: Refused = None

    def _value(self, kind: str) -> Any:
        return getattr(self, "json_" if kind == "json" else kind)

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = [kind for kind in STRUCTURED_KINDS if self._value(kind) is not None]
        if len(kinds) != 1:
            raise ValueError(f"exactly one kind of constraint is needed ({', '.join(STRUCTURED_KINDS)}), "
                             f"got {', '.join(kinds) or 'none'}")
        if self.json_object is False:
            raise ValueError("json_object false asks for no constraint: send true, or another kind")
        return self

    @property
    def constraint(self) -> Constraint:
        kind = next(kind for kind in STRUCTURED_KINDS if self._value(kind) is not None)
        return Constraint(kind, self._value(kind), f"structured_outputs.{kind}")


def _decode_arguments(arguments: str, info: ValidationInfo | None = None) -> Any:
    """A call's `arguments`, decoded: "" (as clients send a call without any) is {}."""
    return _loads_counted(arguments, "the string", info) if arguments.strip() else {}


class Arguments(str):
    """A call's arguments string with what it decodes to (None: not JSON): parsed once, by the validator (an 8 MB
    string cost its parse again each time it was templated)."""

    parsed: Any


def _as_written(value: str, info: ValidationInfo | None = None) -> Arguments:
    """A call's arguments with what they decode to, None where that is not JSON; their values charged to a client
    body's budget (info's context)."""
    arguments = Arguments(value)
    try:
        arguments.parsed = _decode_arguments(value, info)
    except JSONError:
        arguments.parsed = None
    return arguments


def parsed_once(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Arguments:
    """Arguments parsed where a body or a stored history is validated; those of a chat request built from Responses
    items (to_chat, once per truncation candidate) come parsed already and pass as they are."""
    return value if isinstance(value, Arguments) else _as_written(handler(value), info)


class FunctionCall(Strict):
    """A call in the history as the model wrote it: OpenAI takes any name and arguments string (a call cut short by
    max_tokens, `{"b": `, as this server answers one too), so a conversation holding one goes on."""

    name: str
    arguments: str
    # What the openai client's `.parse()` decoded them to, as its message object sends it back: not in the prompt.
    parsed_arguments: Any = None

    _decoded = field_validator("arguments", mode="wrap")(parsed_once)

    @property
    def decoded_arguments(self) -> Any:
        """What the arguments decode to; None: not JSON."""
        arguments = self.arguments
        # a model_copy(update=...) or model_construct skips the validator
        return (arguments if isinstance(arguments, Arguments) else _as_written(arguments)).parsed


class ToolCallMessage(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall

    _check_type = field_validator("type", mode="before")(function_only)

    def to_template(self) -> dict[str, Any]:
        """The arguments as an object when they are one (Qwen3's template writes `arguments | tojson`), else as the
        model wrote them: the template writes a string as is."""
        parsed = self.function.decoded_arguments
        arguments = parsed if isinstance(parsed, dict) else self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


Request = TypeVar("Request", bound=Strict)


class PromptCacheBreakpoint(Strict):
    """OpenAI's explicit prompt-cache marker: a caching hint, the answer is the same (the prefix cache is automatic)."""

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class PromptCacheOptions(Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class RefusalPart(Strict):
    """An earlier assistant turn's refusal, as clients resend it: given to the template as text."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


def _text_or(parts: Any) -> Any:
    """A string or a non-empty list of `parts` (OpenAI's minimum)."""
    return Annotated[Annotated[str, Tag("string")] | Annotated[list[parts], Tag("other"), Field(min_length=1)],
                     Discriminator(_string_or_not)]


MessageContent = _text_or(ContentPart)


class Prediction(Strict):
    """OpenAI's predicted output: a latency hint, the answer is the same."""

    type: Literal["content"]
    content: _text_or(TextPart)


REFUSAL_PART = {"type": "object", "required": ["type"], "properties": {"type": {"const": "refusal"}}}


def _message_schema(schema: dict[str, Any]) -> None:
    """ChatMessage._content_required's rules in its JSON schema (the OpenAPI document's), which pydantic cannot
    derive from a model validator."""
    schema["allOf"] = [
        {"if": {"properties": {"role": {"not": {"const": "assistant"}}}},
         "then": {"required": ["content"], "properties": {
             "content": {"not": {"anyOf": [{"type": "null"}, {"type": "array", "contains": REFUSAL_PART}]}},
             "tool_calls": {"type": ["array", "null"], "maxItems": 0},
             "annotations": {"type": ["array", "null"], "maxItems": 0}, "parsed": {"type": "null"}}}},
        {"if": {"properties": {"role": {"const": "assistant"}, "tool_calls": {"type": ["array", "null"], "maxItems": 0},
                               "refusal": {"type": "null"}}},
         "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}},
    ]


def _part_type(part: Any) -> Any:
    """A content part's type; a part without one (as vLLM takes them: `{"image_url": ...}`) by its media key."""
    if not isinstance(part, dict):
        return None
    return part["type"] if "type" in part else next((key for key in MEDIA_PART_TYPES if key in part), None)


class ChatMessage(Strict):
    model_config = ConfigDict(json_schema_extra=_message_schema)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent | None = None
    name: str | None = None  # passed to the template (Qwen3's ignores it)
    # An earlier assistant turn as clients resend it; the template keeps the recent reasoning.
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    # An answer's citations, as the openai client's message object dumps them (null): not part of the prompt.
    annotations: list[dict[str, Any]] | None = None
    # What the openai client's `.parse()` decoded the content to, as its message object sends it back (vLLM takes it
    # too): not in the prompt.
    parsed: Any = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    function_call: Refused = None  # a call: a request's "none" means none, a message's is a call
    audio: Refused = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})")
        if not value:  # OpenAI's minimum length
            raise ValueError("content must not be an empty list")
        media = sorted({kind for part in value if (kind := _part_type(part)) in MEDIA_PART_TYPES})
        if media:
            raise PydanticCustomError("unsupported", "{types} content parts: this server is text only",
                                      {"types": ", ".join(media)})
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if isinstance(self.content, list) and self.role != "assistant" \
                and any(isinstance(part, RefusalPart) for part in self.content):
            raise ValueError("only assistant messages have refusal content parts")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.annotations and self.role != "assistant":
            raise ValueError("only assistant messages have annotations")
        if self.parsed is not None and self.role != "assistant":
            raise ValueError("only assistant messages have parsed content")
        if self.parsed is not None and not isinstance(self.content, str):  # .parse()'s message: the text it decoded
            raise ValueError("parsed is what the client decoded from the message's text content, which is missing")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need the tool_call_id of the call they answer")
        # OpenAI's rule: content unless an assistant's calls (or refusal: a refused answer as the openai client
        # resends it) stand for it
        if self.content is None and (self.role != "assistant" or not self.tool_calls and self.refusal is None):
            raise PydanticCustomError("content_null" if "content" in self.model_fields_set else "content_missing", "")
        return self

    def _text(self) -> str:
        if not isinstance(self.content, list):  # no TextPart built for it: a part's validation cost 3 µs a message
            return self.content or ""
        return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)

    def _reasoning(self) -> str | None:
        """What the template shows of its reasoning: an assistant's only."""
        if self.role != "assistant":
            return None
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    def template_chars(self) -> int:
        """The characters it puts in the template, about: its text, reasoning and calls (their arguments as sent,
        plus ~40 for the call's JSON around them: many small calls are a long prompt too)."""
        calls = sum(len(call.function.arguments) + len(call.function.name) + 40 for call in self.tool_calls or ())
        return len(self._text()) + len(self._reasoning() or "") + calls

    def to_template(self) -> dict[str, Any]:
        """The `{"role", "content": str, ...}` form the chat template takes."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self._text()}
        if (reasoning := self._reasoning()) is not None:
            message["reasoning_content"] = reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of stream chunks: nothing to pad here
    continuous_usage_stats: bool | None = None  # vLLM's: with include_usage, the usage so far on every chunk


class ChatTemplateKwargs(Strict):
    """The variables Qwen3's chat template reads besides `messages` and `tools` (the prompt's ending is
    ChatPrompt's add_generation_prompt / continue_final_message)."""

    enable_thinking: bool | None = None


class ChatPrompt(Strict):
    """What the chat template renders: the fields chat completions and /tokenize share."""

    model: str | None = None  # None = the served model
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # vLLM's: continue_final_message (with add_generation_prompt false) leaves the last assistant
    # message open, so the answer continues it (a prefill)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's, not implemented: accepted at the value that changes nothing (vLLM's default, chat's and /tokenize's
    # alike), else refused
    add_special_tokens: refused(False) = None
    documents: Refused = None
    chat_template: Refused = None
    mm_processor_kwargs: Refused = None
    media_io_kwargs: Refused = None
    _chars: int | None = PrivateAttr(None)  # template_chars'
    _tools: list[dict[str, Any]] | None = PrivateAttr(None)  # template_tools', made once for the template

    @model_validator(mode="after")
    def _measured(self) -> ChatPrompt:
        """template_chars worked out where the request is validated: off the loop for a large body (8 MiB of tools
        took ~20 ms to dump)."""
        self.template_chars()
        return self

    def check_ending(self) -> None:
        """Raises APIError(400) unless the prompt ends one way: a generation prompt, or the last message open."""
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt false",
                           param="continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs an assistant message last",
                           param="continue_final_message")

    @property
    def shows_tools(self) -> bool:
        return bool(self.tools)

    def template_kwargs(self) -> dict[str, Any]:
        """apply_chat_template's keyword arguments: the template's variables and how the prompt ends."""
        kwargs = {} if self.chat_template_kwargs is None else self.chat_template_kwargs.model_dump(exclude_none=True)
        return {**kwargs, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        if self._tools is None and self.shows_tools:
            self._tools = [t.template()[0] for t in self.tools or []]
        return self._tools

    def template_chars(self) -> int:
        """A cheap measure of the prompt's size: its texts and calls' arguments as sent, never encoded again (a
        conversation may be mostly calls), and its tools as JSON. Worked out once, as the request is validated."""
        if self._chars is None:
            # json.dumps(tools)'s length: its tools' and a list's brackets and separators
            tools = sum(t.template()[1] + 2 for t in self.tools or []) if self.shows_tools else 0
            self._chars = sum(m.template_chars() for m in self.messages) + tools
        return self._chars

    def encoded(self, encode: Callable[..., list[int]], limit: int | None) -> list[int]:
        """`encode` (Engine.encode_messages) of the template's inputs, made where it runs: an offload thread, where
        16,000 messages took ~35 ms to turn into them."""
        return encode(self.template_messages(), self.template_kwargs(), limit, self.template_tools())


def _sampling_schema(schema: dict[str, Any]) -> None:
    """The request's rule that pydantic cannot derive, in its JSON schema: stream_options only with stream true."""
    schema["allOf"] = [{"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}]


class SamplingFields(Strict):
    """The sampling fields chat and legacy completions share, OpenAI's and vLLM's."""

    model_config = ConfigDict(json_schema_extra=_sampling_schema)

    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # max_length: as NonEmptyStr's min_length, checked by _check_stop first, for the OpenAPI document
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, **INT64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)  # no EOS, stop id or stop string before this many
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # the only ids that may be sampled
    skip_special_tokens: bool | None = True
    user: str | None = None  # does not change the answer: accepted and ignored
    # token id (a decimal string) -> added to its logit: -100 bans the token, 100 forces it
    logit_bias: dict[Annotated[str, Field(pattern=TOKEN_ID)], Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM's structured outputs (nanoqwen/api/structured.py): structured_outputs or the older guided_* fields
    structured_outputs: StructuredOutputs | None = None
    guided_json: SchemaOrEncoded | None = None
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: GuidanceBackend = None
    guided_whitespace_pattern: Refused = None
    structural_tag: Refused = None
    # vLLM's, not implemented: accepted at the value that changes nothing (vLLM's default), else refused
    use_beam_search: refused(False) = None
    length_penalty: refused(1.0) = None
    include_stop_str_in_output: refused(False) = None
    spaces_between_special_tokens: refused(True) = None
    bad_words: refused([]) = None
    truncate_prompt_tokens: Refused = None
    # vLLM's: each prompt token's logprob and rank, and the top k (-1, the whole vocabulary, is refused)
    prompt_logprobs: int | None = Field(None, ge=-1, le=MAX_TOP_LOGPROBS)
    priority: refused(0) = None
    request_id: str | None = Field(None, max_length=MAX_REQUEST_ID)  # vLLM's: the response's id (request_id.py)
    return_token_ids: refused(False) = None
    return_tokens_as_token_ids: refused(False) = None
    logits_processors: Refused = None
    cache_salt: Refused = None
    kv_transfer_params: Refused = None
    vllm_xargs: Refused = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(stops)}")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias_keys(cls, value: Any) -> Any:
        """Names every key that is not a token id, as vLLM does (the pattern check stops at the first)."""
        if isinstance(value, dict) and (bad := [key for key in value if not re.fullmatch(TOKEN_ID, key)]):
            raise ValueError(f"keys must be token ids (decimal strings), not {shown(bad)}")
        return value

    @property
    def constraints(self) -> list[Constraint]:
        """The structured outputs asked for (check_structured allows one at most)."""
        found = [] if self.structured_outputs is None else [self.structured_outputs.constraint]
        return found + [Constraint(kind, value, name) for name, kind in GUIDED_KINDS.items()
                        if (value := getattr(self, name)) is not None]

    @property
    def constraint(self) -> Constraint | None:
        return next(iter(self.constraints), None)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def _sampling_params(self, model_defaults: Mapping[str, Any] | None, max_tokens: int | None,
                         top_logprobs: int | None) -> SamplingParams:
        """The engine's parameters: the request's, else model_defaults (the checkpoint's
        generation_config, e.g. {"temperature": 0.6}), else the OpenAI defaults.
        top_logprobs None: no logprobs."""
        base = SamplingParams()
        model_defaults = model_defaults or {}

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        def sampling(name: str) -> Any:
            return pick(getattr(self, name), model_defaults.get(name, getattr(base, name)))

        return SamplingParams(
            temperature=sampling("temperature"),
            top_p=sampling("top_p"),
            top_k=sampling("top_k"),
            min_p=sampling("min_p"),
            presence_penalty=pick(self.presence_penalty, base.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, base.frequency_penalty),
            repetition_penalty=sampling("repetition_penalty"),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=pick(self.min_tokens, base.min_tokens),
            ignore_eos=bool(self.ignore_eos),
            stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids or []),
            logprobs=top_logprobs is not None,
            top_logprobs=top_logprobs or 0,
            n=pick(self.n, 1),
            skip_special_tokens=pick(self.skip_special_tokens, True),
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            allowed_token_ids=self.allowed_token_ids,
            # a stream has no field for them: 0, which vLLM takes there too, asks for nothing
            prompt_logprobs=None if self.stream else self.prompt_logprobs,
            prompt_ranks=self.wants_prompt_logprobs,
        )

    @property
    def wants_prompt_logprobs(self) -> bool:
        """vLLM's prompt_logprobs asked for, with their ranks: in a stream (no field for them) it asks for nothing."""
        return self.prompt_logprobs is not None and not self.stream


class ChatCompletionRequest(ChatPrompt, SamplingFields):
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Metadata that does not change the answer: accepted and ignored.
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: ServiceTier | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: Prediction | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # caching hints: the prefix cache is automatic
    prompt_cache_options: PromptCacheOptions | None = None
    # "required" and a named function are enforced by constrained decoding
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    include_reasoning: bool | None = True  # vLLM's: false leaves the reasoning out of the answer (not out of usage)
    reasoning_effort: ReasoningEffort | None = None
    # Would change the answer, not implemented: refused unless absent or "not used".
    functions: refused([]) = None
    function_call: refused("none") = None
    audio: Refused = None
    modalities: refused(["text"]) = None
    verbosity: Verbosity = None
    web_search_options: Refused = None
    moderation: Refused = None
    # vLLM's: the answer starts with the last message's text where that message is the assistant's (what
    # continue_final_message continues), as vLLM's echo; else it adds nothing
    echo: bool | None = False
    _names: FieldNames = PrivateAttr(CHAT_NAMES)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") in ("allowed_tools", "custom"):
            raise PydanticCustomError("unsupported", "tool_choice of type \"{type}\" is not implemented",
                                      {"type": value["type"]})
        if value is None or value in ("none", "auto", "required") or isinstance(value, dict):
            return value
        raise ValueError("tool_choice must be \"none\", \"auto\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")

    @model_validator(mode="after")
    def _named_as(self, info: ValidationInfo) -> ChatCompletionRequest:
        """What the client's request calls chat's fields (validate_body's context, its errors' names too)."""
        self._names = (info.context or {}).get("names", CHAT_NAMES)
        return self

    def named(self, param: str) -> str:
        """Chat's `param` as the client's request names it, for an error about it."""
        return self._names(param)

    @property
    def enable_thinking(self) -> bool | None:
        """The template's enable_thinking: chat_template_kwargs', else reasoning_effort's, else unset."""
        kwargs = self.chat_template_kwargs
        if kwargs is not None and kwargs.enable_thinking is not None:
            return kwargs.enable_thinking
        return None if self.reasoning_effort is None else thinks(self.reasoning_effort)

    def template_kwargs(self) -> dict[str, Any]:
        thinking = self.enable_thinking
        return {**super().template_kwargs(), **({} if thinking is None else {"enable_thinking": thinking})}

    @property
    def split_reasoning(self) -> bool:
        """False when thinking is switched off or the answer continues the final message: the template
        closed the think block already (Qwen3's closes a final assistant message's)."""
        return self.enable_thinking is not False and not self.continue_final_message

    @property
    def json_response(self) -> bool:
        """response_format asks for JSON (json_object or json_schema)."""
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def constrains_answer(self) -> bool:
        """The answer is grammar-constrained: a JSON response_format, a forced tool call, a structured output, or a
        call the model opens (constrains_calls)."""
        return self.forces_tool_call or self.json_response or self.constraint is not None or self.constrains_calls

    @property
    def echo_text(self) -> str:
        """What `echo` puts before the answer's content."""
        last = self.messages[-1]
        return last._text() if self.echo and last.role == "assistant" else ""

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools a forced call may use: all of them, or the named one."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == self.tool_choice.function.name]
        return list(self.tools or []) if self.tool_choice == "required" else []

    @property
    def shows_tools(self) -> bool:
        """Tools are shown to the model and its answers parsed for calls (`tool_choice: "none"`: neither)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrains_calls(self) -> bool:
        """tool_choice "auto" with a constrained tool (FunctionDefinition.constrained) or a JSON response_format: a
        call the model opens is constrained (OpenAI's strict function calling), the answer otherwise free or that
        JSON; vLLM's structured outputs constrain the whole answer instead (no room for a call: vLLM's rule)."""
        return (self.shows_tools and not self.forces_tool_call and self.constraint is None
                and (self.json_response or any(t.function.constrained for t in self.tools or [])))

    @property
    def constrains_any_call(self) -> bool:
        """A call the model opens follows the calls' grammar: a forced one, or one under constrains_calls."""
        return self.forces_tool_call or self.constrains_calls

    @property
    def kept_calls(self) -> int | None:
        """How many calls an answer keeps (Responses' max_tool_calls counts built-in tools only: none here)."""
        return 1 if self.parallel_tool_calls is False else None

    def sampling_params(self, model_defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self._sampling_params(model_defaults, max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        params.stop_token_logprob = False
        return params


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: OpenAI's legacy completions (what lm-eval-harness's `local-completions` sends)."""

    model: str | None = None
    # A text, token ids, or a batch of either: one answer (n choices) per prompt.
    # (the lists' minItems for the OpenAPI document alone: Annotated members would rename the union's, which
    # error locations name)
    prompt: str | list[int] | list[str] | list[list[int]] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, *({"type": "array", "items": item, "minItems": 1} for item in (
            {"type": "integer"}, {"type": "string"}, {"type": "array", "items": {"type": "integer"}, "minItems": 1}))]})
    # OpenAI's default; null = up to the context limit; 0 with `echo`: the prompt (and its logprobs) only
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Refused = None  # insertion needs a fill-in-the-middle prompt format
    add_special_tokens: refused(True) = None  # vLLM's, at its default
    prompt_embeds: Refused = None  # vLLM's

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or ids(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or all(map(ids, value))):
            return value
        raise ValueError("prompt must be a string, a non-empty list of token ids, or a non-empty list of either")

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt

    def sampling_params(self, model_defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        params = self._sampling_params(model_defaults, self.max_tokens, self.logprobs)
        # echo with logprobs: the prompt's too (vLLM's prompt_logprobs, when asked for, the same k: parse_completion_
        # request); max_tokens 0 is the engine's prompt-scoring mode either way
        if self.echo and (self.logprobs is not None or self.max_tokens == 0) and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs or 0
        return params


def check_stream_options(req: Any) -> None:
    """OpenAI's rule (the document's too, see _sampling_schema): stream_options only with stream true."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def check_prompt_logprobs(req: SamplingFields) -> None:
    """vLLM's rules: none in a stream (its chunks have no field for them), -1 (every token of the vocabulary at every
    prompt position) refused here."""
    if req.prompt_logprobs == -1:
        raise APIError(400, "prompt_logprobs -1 (the whole vocabulary at each prompt position) is not supported: ask "
                            f"for at most {MAX_TOP_LOGPROBS}", param="prompt_logprobs", code="unsupported_parameter")
    if req.stream and req.prompt_logprobs:
        raise APIError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")


def check_structured(req: SamplingFields) -> None:
    """One structured output at most (vLLM's rule)."""
    if len(constraints := req.constraints) > 1:
        first, second = constraints[:2]
        raise APIError(400, f"{second.field} cannot be combined with {first.field}: one structured output per "
                            "request", param=second.field)


def parse_completion_request(body: Any, budget: Budget | None) -> CompletionRequest:
    req = validate_body(CompletionRequest, body, budget)
    check_stream_options(req)
    check_prompt_logprobs(req)
    if req.echo and req.logprobs is not None and not req.stream and req.prompt_logprobs not in (None, req.logprobs):
        raise APIError(400, "prompt_logprobs with echo and logprobs must equal logprobs (the echoed prompt's "
                            "top_logprobs are the same ones)", param="prompt_logprobs")
    check_structured(req)
    n = req.n or 1
    if req.best_of is not None and req.best_of not in (1, n):
        raise APIError(400, "best_of other than 1 or n is not supported (it needs the choices ranked by "
                            "their whole logprob)", param="best_of", code="unsupported_parameter")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens")
    if n * len(req.prompts) > MAX_CHOICES:
        raise APIError(400, f"n × the number of prompts must be at most {MAX_CHOICES}", param="prompt")
    return req


def check_tool_answers(messages: list[ChatMessage]) -> None:
    """OpenAI's pairing of calls and answers: the tool messages after an assistant message with tool_calls answer
    those calls, all of them, before any other message (or the end). Its messages and params, word for word (its
    "preceeding" too: clients match on them)."""
    calls: set[str] = set()  # the open turn's call ids: none open while empty
    unanswered: dict[str, None] = {}  # in order
    turn = -1  # the index of the assistant message whose calls are open

    def check_answered() -> None:
        if unanswered:
            raise APIError(400, "An assistant message with 'tool_calls' must be followed by tool messages responding "
                                "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                                + ", ".join(unanswered), param=f"messages.[{turn}].role")

    for i, message in enumerate(messages):
        if message.role == "tool":
            if not calls:
                raise APIError(400, "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                    "message with 'tool_calls'.", param=f"messages.[{i}].role")
            if message.tool_call_id not in calls:
                raise APIError(400, f"Invalid parameter: 'tool_call_id' of '{message.tool_call_id}' not found in "
                                    "'tool_calls' of previous message.", param=f"messages.[{i}].tool_call_id")
            unanswered.pop(message.tool_call_id, None)
            continue
        check_answered()
        unanswered, turn = dict.fromkeys(call.id for call in message.tool_calls or ()), i
        calls = set(unanswered)
    check_answered()


def _check_combinations(req: ChatCompletionRequest) -> None:
    req.check_ending()
    check_stream_options(req)
    check_prompt_logprobs(req)
    if req.tool_choice not in (None, "none") and not req.tools:
        raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                            "specified.",
                       param="tool_choice")
    if req.parallel_tool_calls is not None and not req.tools:
        raise APIError(400, "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when "
                            "'tools' are specified.", param="parallel_tool_calls")
    _check_tool_names(req)
    if isinstance(req.tool_choice, NamedToolChoice) and not req.forced_tools:
        raise APIError(400, f"Invalid value for 'tool_choice': no tool named '{req.tool_choice.function.name}' "
                            "in 'tools'", param="tool_choice")
    check_structured(req)
    if (constraint := req.constraint) is not None and (req.json_response or req.forces_tool_call):
        other = "response_format" if req.json_response else "a forced tool call (tool_choice \"required\" or a " \
                                                               "named function)"
        raise APIError(400, f"{constraint.field} cannot be combined with {other}: one constraint per answer",
                       param=constraint.field)
    if req.continue_final_message and req.constrains_answer:
        raise APIError(400, "continue_final_message cannot be combined with a constrained answer (response_format "
                            "json_object/json_schema, tool_choice \"required\" or a named function, a strict tool, "
                            "structured outputs): the grammar would not take the prefilled text into account",
                       param="continue_final_message")
    kwargs = req.chat_template_kwargs
    if req.reasoning_effort is not None and kwargs is not None and kwargs.enable_thinking is not None \
            and kwargs.enable_thinking != thinks(req.reasoning_effort):
        effort = req.named("reasoning_effort")
        raise APIError(400, f"{effort} \"{req.reasoning_effort}\" contradicts chat_template_kwargs."
                            f"enable_thinking={str(kwargs.enable_thinking).lower()}", param=effort)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "logprobs must be true when top_logprobs is set", param="top_logprobs")


def _check_tool_names(req: ChatCompletionRequest) -> None:
    """Two different tools of one name are a 400: a call, a named tool_choice, a tool's grammar would not say which one
    it means. The same tool sent twice (as a client merging its tool lists may) is one tool (structured._calls)."""
    seen: dict[str, FunctionDefinition] = {}
    for tool in req.tools or ():
        first = seen.setdefault(name := tool.function.name, tool.function)
        if first is not tool.function and _json_text(first) != _json_text(tool.function):  # `==` takes 1 for true
            tools = req.named("tools")
            raise APIError(400, f"Invalid value for '{tools}': function names must be unique ('{name}' names two "
                                "different functions)", param=tools)


def _json_text(function: FunctionDefinition) -> str:
    return json.dumps(function.model_dump(mode="json"), sort_keys=True)


def _members(annotation: Any, tags: frozenset[str] = frozenset()) -> list[tuple[Any, frozenset[str]]]:
    """The types a value of `annotation` may take (Annotated and Optional unwrapped, unions flattened),
    each with the tags a discriminator gives it (`Tag`s on the way to it)."""
    if get_origin(annotation) is Annotated:
        annotation, *metadata = get_args(annotation)
        return _members(annotation, tags | {m.tag for m in metadata if isinstance(m, Tag)})
    if get_origin(annotation) in (Union, UnionType):
        return [m for arg in get_args(annotation) if arg is not type(None) for m in _members(arg, tags)]
    return [(annotation, tags)]


def _names(member: tuple[Any, frozenset[str]]) -> frozenset[str]:
    """What pydantic may name a union member in an error's location: its tag, its `type` literal
    (a `type`-discriminated union), or its type's name (a smart union: `str`, `list[int]`)."""
    annotation, tags = member
    names = {*tags, annotation.__name__ if isinstance(annotation, type) else str(annotation)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and "type" in annotation.model_fields:
        names.update(str(v) for v in get_args(annotation.model_fields["type"].annotation))
    return frozenset(names)


def _child(annotation: Any, part: int | str) -> Any | None:
    """The annotation at `part` (a field, list index or dict key) inside a value of `annotation`; None: no such part."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = {f.alias or name: f for name, f in annotation.model_fields.items()}
        return fields[part].annotation if part in fields else None
    args = get_args(annotation)
    if get_origin(annotation) is list and isinstance(part, int):
        return args[0]
    if get_origin(annotation) is dict and args:
        return args[1]
    return None


def public_loc(schema: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A validation error's location as the client wrote it: without the tags pydantic inserts after a
    union (`response_format.json_schema.json_schema.name` -> `response_format.json_schema.name`)."""
    out: list[int | str] = []
    members = _members(schema)
    tagged = False
    for part in loc:
        if len(members) > 1 and not tagged:  # pydantic names the union member before going into it
            members = [m for m in members if part in _names(m)] or members  # the named one, where it can be told
            tagged = True
            continue
        out.append(part)
        members = [m for parent, _ in members if (child := _child(parent, part)) is not None for m in _members(child)]
        members, tagged = members or [(Any, frozenset())], False
    return tuple(out)


CONTENT_ERRORS = {"content_null": "Invalid value for 'content': expected a string, got null.",
                  "content_missing": "Missing required parameter: '{param}'."}


def _api_error(schema: type[BaseModel], err: Any, names: FieldNames) -> APIError:
    loc = err["loc"] if err["loc"][-1:] == ("[key]",) else public_loc(schema, err["loc"])
    err = {**err, "loc": loc}
    param = names(param_name(loc))
    if err["type"] == "extra_forbidden":
        if err["loc"][0] == "chat_template_kwargs" and len(err["loc"]) > 1:  # a key inside it, not the field
            accepted = ", ".join(ChatTemplateKwargs.model_fields)
            return APIError(400, f"'{param}' is not a variable of this model's chat template (accepted: {accepted})",
                            param=param)
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] in CONTENT_ERRORS:  # OpenAI's messages, at the message's content
        return APIError(400, CONTENT_ERRORS[err["type"]].format(param=f"{param}.content"), param=f"{param}.content")
    if err["type"] == "unsupported":
        return APIError(400, f"Unsupported parameter '{param}': {err['msg']}", param=param,
                        code="unsupported_parameter")
    if err["type"] == "invalid_function_parameters":  # OpenAI's message and code
        return APIError(400, err["msg"], param=param, code=err["type"])
    message = err["msg"].removeprefix("Value error, ")
    if err["loc"][-1:] == ("[key]",):  # a dict's key: the dict is the parameter
        param = names(param_name(err["loc"][:-2]))
        return APIError(400, f"Invalid key {err['loc'][-2]!r} in '{param}': {message}", param=param)
    return APIError(400, f"Invalid value for '{param}': {message}" if param else message, param=param or None)


def validate_body(schema: type[Request], body: Any, budget: Budget | None,
                  omitted_strict_constrains: bool = False, names: FieldNames = CHAT_NAMES) -> Request:
    """A decoded JSON body as `schema`; raises APIError(400) naming the first bad parameter. The JSON in its
    strings is charged to `budget`: what a client's body left of the request's values (body.parse_json's); None
    for one no client sent (each string within the limits alone). `omitted_strict_constrains`: a tool that omits
    `strict` has its calls constrained (the Responses API's default: FunctionDefinition.constrained). `names`: what
    the client's request calls the parameter named (FieldNames), in these errors and in later ones
    (ChatCompletionRequest.named)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    context = {"budget": budget, "omitted_strict_constrains": omitted_strict_constrains, "names": names}
    try:
        return schema.model_validate(body, context=context)
    except ValidationError as exc:
        # A field this server lacks first: the request's other errors may only follow from it
        # (vLLM's `prompt_token_ids` with empty `messages`)
        errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] not in LACKING)
        raise _api_error(schema, errors[0], names) from None


def parse_chat_request(body: Any, budget: Budget | None, omitted_strict_constrains: bool = False,
                       answers_paired: bool = False, names: FieldNames = CHAT_NAMES) -> ChatCompletionRequest:
    """`answers_paired`: the tool messages were paired with the calls already, by other rules than chat's (a
    Responses request's items: check_call_outputs). `names`: what the client's request calls chat's fields, in the
    errors of this request's checks and of those that follow (its grammar's: ChatCompletionRequest.named)."""
    req = validate_body(ChatCompletionRequest, body, budget, omitted_strict_constrains, names)
    if not answers_paired:
        check_tool_answers(req.messages)
    _check_combinations(req)
    return req
