"""`POST /v1/responses` (OpenAI's Responses API) and the stored responses' routes, on top of chat.

A request becomes the chat request it amounts to (ResponseCreateRequest.to_chat), which ChatService
submits; the engine's events become a `response` object (ResponseCollector) or Responses stream
events (ResponseEvents), with chat's reasoning split, reasoning-token count and tool-call parser.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

from flask import Response
from pydantic import TypeAdapter

from nanoqwen.api.chat import ChatService, PromptName
from nanoqwen.api.encode import EncodedList, encode_json
from nanoqwen.api.errors import APIError, generation_error, request_too_large
from nanoqwen.api.metrics import RequestTrace
from nanoqwen.api.responses import SERVICE_TIER, ReasoningTokens, ToolParsing, token_logprobs_json
from nanoqwen.api.responses_background import Background, Run, too_many
from nanoqwen.api.responses_include import INCLUDE_KEYS, query_include, response_with_parts, with_parts
from nanoqwen.api.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    Item,
    MessageItem,
    NamedFunction,
    ReasoningItem,
    ResponseCreateRequest,
    ResponsePromptFields,
    TextJsonSchemaFormat,
    check_items,
    encode_reasoning,
    parse_count_request,
    parse_responses_request,
    referred_id,
)
from nanoqwen.api.responses_store import Entry, Inputs, ResponseStore, Stored
from nanoqwen.api.schemas import ChatCompletionRequest
from nanoqwen.api.serving import Batch, client_probe, lane
from nanoqwen.api.sse import HEADERS, named_event
from nanoqwen.api.stored import check_query, encoded_page
from nanoqwen.api.strict_json import Budget, JSONError, checked_values
from nanoqwen.api.tool_calls import CallDelta, Parsed, ToolCall, ToolCallParser
from nanoqwen.engine.request import Event, SamplingParams, TokenLogprob, Usage

Json = dict[str, Any]
ITEMS = TypeAdapter(list[InputItem])
ITEM = TypeAdapter(InputItem)
# Past this many characters per token of the context a prompt is taken for too long at once (Qwen3's tokenizer:
# ~4 in English prose, 5 for "word word ..."; only long runs of spaces or symbols make more)
LONG_CHARS_PER_TOKEN = 16


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_json(usage: Usage, reasoning_tokens: int) -> Json:
    """`cache_write_tokens`: OpenAI's billed cache writes at breakpoints; the prefix cache here costs nothing."""
    details = {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0}
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": details,
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.total_tokens}


def input_item_json(item: Any) -> Json:
    """An input item as OpenAI lists it back: with an id, a message's content as parts."""
    out = item.model_dump(exclude_none=True, by_alias=True)
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        out["content"] = [{"type": kind, "text": item.content}]
    if "id" not in out:
        out["id"] = _id("fc" if item.type == "function_call" else "rs" if item.type == "reasoning" else "msg")
    return out


@dataclass
class Draft:
    """One response's identity and the request settings it echoes back."""

    req: ResponseCreateRequest
    params: SamplingParams
    model: str
    think_end: int | None
    store: ResponseStore | None  # None: `store: false`
    previous: Stored | None
    inputs: Inputs  # the input items as stored (input_item_json), when stored
    tools: EncodedList  # the request's, as the response echoes them (FunctionTool.echo): echoed_tools'
    begun: bool = False  # in the store from its first event (a stream)
    id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[Json], usage: Json | None, error: Json | None = None) -> Json:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        text_format = {"type": "text"} if fmt is None else fmt.model_dump(exclude_none=True, by_alias=True)
        if isinstance(fmt, TextJsonSchemaFormat):
            text_format.setdefault("strict", False)
        choice = req.tool_choice
        reasoning = req.reasoning
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": req.background is True, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": self.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "prompt_cache_key": req.prompt_cache_key,
            "prompt_cache_retention": req.prompt_cache_retention,
            "reasoning": {"effort": reasoning.effort if reasoning else None,
                          "summary": reasoning.summary if reasoning else None},
            "safety_identifier": req.safety_identifier, "service_tier": SERVICE_TIER, "store": self.store is not None,
            "temperature": self.params.temperature,
            "text": {"format": text_format, "verbosity": "medium"},
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else choice or "auto",
            "tools": self.tools,
            "top_logprobs": req.top_logprobs or 0, "top_p": self.params.top_p,
            "truncation": req.truncation or "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

    def created(self) -> Json:
        """The response as `response.created` says it, and GET answers it until it starts: a background one is
        queued until the engine schedules its prefill (`started`), a foreground one in progress at once."""
        return self.response("queued" if self.req.background else "in_progress", [], None)

    def started(self) -> Json:
        """A background response the engine started on, as `response.in_progress` says it and GET answers it
        from then on."""
        response = self.response("in_progress", [], None)
        if self.store is not None:
            self.store.progress(response)
        return response

    def finish(self, status: str, output: list[Json], usage: Json) -> tuple[Json, bytes | None]:
        """The final response, stored when asked to (unless deleted meanwhile), and its encoding then."""
        response = self.response(status, output, usage)
        if self.store is None:
            return response, None
        return response, self.store.put(response, self.inputs, self.previous, self.begun)

    def reasoning_item(self, item_id: str, text: str) -> Json:
        item: Json = {"id": item_id, "type": "reasoning", "summary": [],
                      "content": [{"type": "reasoning_text", "text": text}]}
        if self.req.wants_encrypted_reasoning:
            item["encrypted_content"] = encode_reasoning(text)
        return item

    def text_part(self, text: str, logprobs: list[Json]) -> Json:
        part: Json = {"type": "output_text", "text": text, "annotations": []}
        if self.req.wants_logprobs:
            part["logprobs"] = logprobs
        return part


def _message(item_id: str, status: str, content: list[Json]) -> Json:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call(item_id: str, call: ToolCall, status: str) -> Json:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _status(finish_reason: str | None) -> str:
    """The response's status. "abort" reaches only a cancelled one: a client gone ends its stream first."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason or "", "completed")


@dataclass
class ResponseCollector:
    """The events of a non-streamed request into one `response`: the stream's (ResponseEvents), so that both have
    the same items in the same order. The last event is handled in build, off the loop for a large answer."""

    draft: Draft
    tools: ToolParsing

    def __post_init__(self) -> None:
        self._events = PolledEvents(self.draft, self.tools)
        self._last: Event | None = None

    def add(self, event: Event) -> None:
        if event.is_last:
            self._last = event
        else:
            self._events.chunks(event)

    def build(self, usage: Usage) -> Json | bytes:
        """The response, encoded when the store encoded it or when it echoes tools (`store: false`): written with
        their encoding made once in ~1 ms, where Flask encoded 4,000 tools of ~300 characters again, ~14 ms on the
        loop."""
        self._events.chunks(self._last)
        events = self._events
        if events.body is None and self.draft.tools:
            return encode_json(events.response)
        return events.body or events.response


@dataclass
class _Open:
    """An output item being streamed: where it is and what it has so far."""

    index: int
    id: str
    text: list[str] = field(default_factory=list)
    logprobs: list[Json] = field(default_factory=list)
    event_logprobs: list[Json] = field(default_factory=list)  # the same without `bytes`, as its `.done` event says
    call: ToolCall | None = None


@dataclass
class ResponseEvents:
    """The Responses stream events of one request, numbered by `sequence_number`; no `[DONE]` after them.

    One item is open at a time, as OpenAI streams them: each is done before the next is added, in the order the
    model wrote them. A message's logprobs are its text's tokens': those of tokens a call took are left out."""

    draft: Draft
    tools: ToolParsing
    ending: ClassVar[str] = ""
    repeats_answer: ClassVar[bool] = True  # `response.completed` and the last item's `.done` events
    sent: ClassVar[bool] = True  # its events are framed and sent: their own logprob lists are built

    def __post_init__(self) -> None:
        self._sequence = 0
        self._output: list[Json] = []  # the finished items
        self._reasoning: _Open | None = None
        self._message: _Open | None = None
        self._call: _Open | None = None
        self._tokens = ReasoningTokens(self.draft.think_end)
        self._parser: ToolCallParser | None = self.tools.parser()
        self._held: list[TokenLogprob] = []  # content logprobs not sent yet: text's, or a call's when one comes
        self._finish_reason: str | None = None
        self.response: Json | None = None  # the final one
        self.body: bytes | None = None  # its encoding, when stored

    def frame(self, chunk: Json, split: bool = False) -> str:
        """An event carrying the response in pieces: its tools written as encoded once (Draft.tools)."""
        return named_event(chunk, split or "response" in chunk)

    def repeats(self, chunk: Json) -> bool:
        """An item's `.done` events repeat its text and logprobs."""
        return chunk["type"].endswith(".done")

    def _event(self, kind: str, **fields: Any) -> Json:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def opening(self) -> list[Json]:
        """A background response is queued until its `admitted` event (OpenAI: `response.queued` in between)."""
        response = self.draft.created()
        second = "response.queued" if response["status"] == "queued" else "response.in_progress"
        return [self._event("response.created", response=response), self._event(second, response=response)]

    def failure(self, message: str, param: str | None = None) -> list[Json]:
        """`response.failed`, with the items so far: after the error's event (chunks: an engine error, or Serving's
        for an exception in the stream's own code), which closed the open one and sent its held text (text that might
        have been a call) as the answer would have ended there, those; where that cut raised, the items done only.
        Its error's code is generation_error's, as a response not streamed is answered."""
        error = generation_error(message, param)
        self.response = self.draft.response("failed", self._output, None, {"code": error.code, "message": message})
        return [self._event("response.failed", response=self.response)]

    def item_ids(self) -> set[str]:
        """The ids of the output items so far, finished or open."""
        opened = (self._reasoning, self._message, self._call)
        return {item["id"] for item in self._output} | {item.id for item in opened if item is not None}

    def chunks(self, event: Event) -> list[Json]:
        if event.admitted:
            return [self._event("response.in_progress", response=self.draft.started())]
        cut = event.error is not None  # the stream fails here (failure follows): what is held goes out first
        self._tokens.add(event)
        self._held += self._tokens.content_logprobs(event, cut)
        out = self._reason(event.reasoning) if event.reasoning else []
        parsed = Parsed(event.text)
        if self._parser is not None:
            parsed = self._parser.feed(event.text)
            if cut or event.finish_reason is not None:
                parsed += self._parser.finish()
        # the open call's tail, then text after it (which closes it), then new calls
        tail = next((i for i, call in enumerate(parsed.calls) if call.id is not None), len(parsed.calls))
        for call in parsed.calls[:tail]:
            out += self._call_delta(call)
        if parsed.content:
            out += self._text(parsed.content)
        for call in parsed.calls[tail:]:
            out += self._call_delta(call)
        if parsed.calls:
            self._held = []
        if event.finish_reason is not None:
            self._finish_reason = event.finish_reason
        if event.usage is not None:
            out += self._finish(event.usage)
        elif cut:
            out += self._close_items("failed")
        return out

    def _open(self, item: Json) -> tuple[_Open, list[Json]]:
        opened = _Open(len(self._output), item["id"])
        return opened, [self._event("response.output_item.added", output_index=opened.index, item=item)]

    def _done(self, opened: _Open, item: Json) -> Json:
        self._output.append(item)
        return self._event("response.output_item.done", output_index=opened.index, item=item)

    def _where(self, opened: _Open) -> Json:
        return {"item_id": opened.id, "output_index": opened.index, "content_index": 0}

    def _reason(self, delta: str) -> list[Json]:
        out = []
        if self._reasoning is None:
            self._reasoning, out = self._open({"id": _id("rs"), "type": "reasoning", "summary": []})
            out.append(self._event("response.content_part.added", **self._where(self._reasoning),
                                   part={"type": "reasoning_text", "text": ""}))
        self._reasoning.text.append(delta)
        return [*out, self._event("response.reasoning_text.delta", **self._where(self._reasoning), delta=delta)]

    def _close_reasoning(self) -> list[Json]:
        opened, self._reasoning = self._reasoning, None
        if opened is None:
            return []
        text = "".join(opened.text)
        part = {"type": "reasoning_text", "text": text}
        return [self._event("response.reasoning_text.done", **self._where(opened), text=text),
                self._event("response.content_part.done", **self._where(opened), part=part),
                self._done(opened, self.draft.reasoning_item(opened.id, text))]

    def _text(self, delta: str) -> list[Json]:
        out = self._close_reasoning()
        if self._message is None:
            out += self._close_call("completed")
            self._message, added = self._open(_message(_id("msg"), "in_progress", []))
            out += [*added, self._event("response.content_part.added", **self._where(self._message),
                                        part=self.draft.text_part("", []))]
        # the text events' logprobs are OpenAI's `ResponseLogProb`, which has no `bytes`
        logprobs = token_logprobs_json(self._held, with_bytes=False) if self.sent else []
        self._message.text.append(delta)
        self._message.logprobs += token_logprobs_json(self._held)
        self._message.event_logprobs += logprobs
        self._held = []
        return [*out, self._event("response.output_text.delta", **self._where(self._message), delta=delta,
                                  logprobs=logprobs)]

    def _close_message(self, status: str) -> list[Json]:
        opened, self._message = self._message, None
        if opened is None:
            return []
        text = "".join(opened.text)
        part = self.draft.text_part(text, opened.logprobs)
        return [self._event("response.output_text.done", **self._where(opened), text=text,
                            logprobs=opened.event_logprobs),
                self._event("response.content_part.done", **self._where(opened), part=part),
                self._done(opened, _message(opened.id, status, [part]))]

    def _call_delta(self, delta: CallDelta) -> list[Json]:
        out = self._close_reasoning()
        if delta.id is not None:
            out += [*self._close_message("completed"), *self._close_call("completed")]
            call = ToolCall(delta.name or "", "", delta.id)
            self._call, added = self._open(_call(_id("fc"), call, "in_progress"))
            self._call.call = call
            out += added
        opened = self._call
        if delta.arguments:
            opened.call.arguments += delta.arguments
            out.append(self._event("response.function_call_arguments.delta", item_id=opened.id,
                                   output_index=opened.index, delta=delta.arguments))
        return out

    def _close_call(self, status: str) -> list[Json]:
        opened, self._call = self._call, None
        if opened is None:
            return []
        call = opened.call
        return [self._event("response.function_call_arguments.done", item_id=opened.id, output_index=opened.index,
                            name=call.name, arguments=call.arguments),
                self._done(opened, _call(opened.id, call, status))]

    def _finish(self, usage: Usage) -> list[Json]:
        """The items closed with the answer's status, then the final response. A cancelled response has no event of
        its own (OpenAI's stream events have none): its stream ends after its items' `.done` events, and GET says
        it."""
        status = _status(self._finish_reason)
        out = self._close_items(status)
        self.response, self.body = self.draft.finish(status, self._output, usage_json(usage, self._tokens.count))
        return out if status == "cancelled" else [*out, self._event(f"response.{status}", response=self.response)]

    def _close_items(self, status: str) -> list[Json]:
        """The open item gets the response's `status` (incomplete when cut short, cancelled or failed), the ones
        before it stay completed; an answer without output gets an empty message, unless cancelled or failed
        (OpenAI's `output: []`)."""
        out = self._close_reasoning()
        if self._message is None and self._call is None and not self._output and status not in ("cancelled", "failed"):
            out += self._text("")
        if self._message is not None and self._held:
            out += self._text("")
        item_status = "completed" if status == "completed" else "incomplete"
        return [*out, *self._close_message(item_status), *self._close_call(item_status)]


class PolledEvents(ResponseEvents):
    """A response not streamed (in the background or not): its events make its response, and no one reads their
    frames."""

    sent: ClassVar[bool] = False

    def frame(self, chunk: Json, split: bool = False) -> str:
        return ""


def _stored_inputs(req: ResponseCreateRequest, resent: Mapping[int, str] | None = None) -> Inputs:
    """The input items as stored (input_item_json), none with `store: false`. `req` as sent: the calls it resends
    (Conversation.resent) are listed with the ids of the history's calls they are (an id listed is one an item
    reference finds)."""
    if req.store is False:
        return Inputs()
    resent = resent or {}
    items = [item.model_copy(update={"id": resent[i]}) if i in resent else item
             for i, item in enumerate(req.input_items)]
    return Inputs.of([input_item_json(item) for item in items], resent.keys())


def echoed_tools(req: ResponsePromptFields) -> EncodedList:
    """The request's tools as its response echoes them, encoded once (thousands of tools: made with the prompt, off
    the loop)."""
    return EncodedList([tool.echo() for tool in req.tools or []])


def kept_in_progress(ended: Callable[[], None], respond: Callable[[], Response]) -> Response:
    """The stream of a response begun in the store, found there until it `ended`: on an error (before it streams,
    its request submitted or not), or when the server closes its stream (at its end, failed, its client gone, even
    before its first event)."""
    try:
        answer = respond()
    except BaseException:
        ended()
        raise
    answer.call_on_close(ended)
    return answer


INPUT = PromptName("input", "input")
HISTORY = PromptName("input and previous responses' items", "previous_response_id")
Fields = TypeVar("Fields", bound=ResponsePromptFields)


Encode = Callable[[ChatCompletionRequest, PromptName], list[int]]  # a chat request's prompt ids (ChatService.encode)


@dataclass
class Conversation(Generic[Fields]):
    """A request's items, checked, and the chat request they make whole."""

    req: Fields  # its item references resolved
    previous: Stored | None
    name: PromptName
    items: list[Item]  # the previous response's, then the input less the calls it resends
    whole: ChatCompletionRequest
    sent: Fields  # its item references resolved, its input as sent
    resent: dict[int, str]  # the input's calls that are the history's (check_items'): by place, their ids there


@dataclass
class Prompt(Generic[Fields]):
    """What a request's fields make: the prompt create starts, and the count counts."""

    req: Fields  # its item references resolved
    previous: Stored | None
    name: PromptName
    chat: ChatCompletionRequest  # of the items kept
    ids: list[int]
    params: SamplingParams
    # create's, made with the prompt (ResponsesService._prompt): the input items as stored, the tools as echoed
    inputs: Inputs = field(default_factory=Inputs)
    tools: EncodedList = field(default_factory=lambda: EncodedList([]))


@dataclass
class Found:
    """The stored entries a request names, looked up once, on the loop (ResponsesService._found): its item
    references' holders, and its previous response."""

    holders: dict[str, Stored | None]  # item id -> the response holding it (ResponseStore.holder's)
    previous: Entry | None
    chars: int  # about the characters of stored JSON they bring in, each reference its item's


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", code="not_found")


class ResponsesService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.store = ResponseStore()
        self.background = Background(self.store)

    def create(self, body: Any, budget: Budget, environ: dict[str, Any]) -> Response | Json:
        serving = self.chat.serving
        trace = serving.stats.begin()
        prompt = self._prompt(serving.validate(parse_responses_request, body, budget), budget, echoes=True)
        req, previous, chat_req, params = prompt.req, prompt.previous, prompt.chat, prompt.params
        draft = Draft(req, params, serving.config.served_model_name, serving.engine.think_ids[1],
                      self.store if self._keeps(req, len(prompt.inputs.listed), previous) else None, previous,
                      prompt.inputs, prompt.tools)
        tools = ToolParsing.of(chat_req)
        kind = ResponseEvents if req.stream else PolledEvents  # a polled background response's: nothing framed
        stream = kind(draft, tools) if req.stream or req.background else None

        submit = partial(self.chat.submit, chat_req, params, prompt.ids, prompt.name, bool(req.background))

        def respond() -> Response | Json:
            return serving.respond(submit(), stream, ResponseCollector(draft, tools), trace, environ)

        if req.background:
            return self._background(draft, stream, submit, trace, environ)
        # only a stream's id is known before it finishes: GET finds it in progress from its first event (the
        # events read draft.store as they open). Begun last: kept_in_progress ends it on every way out.
        if req.stream and draft.store is not None:
            draft.begun = self.store.begin(draft.created(), draft.inputs, stream.item_ids) is not None
            draft.store = self.store if draft.begun else None
        return kept_in_progress(partial(self._ended, draft, stream), respond) if draft.begun else respond()

    def _background(self, draft: Draft, events: ResponseEvents, submit: Callable[[], Batch], trace: RequestTrace,
                    environ: dict[str, Any]) -> Response:
        """Submits the response and generates it in a greenlet of its own; answers its snapshot at once (as the store
        encoded it: Flask encoded 4,000 tools again in 18-40 ms on the loop), or with `stream` its events as they
        come (a disconnect leaves it generating)."""
        if draft.store is None:
            raise APIError(400, "Background mode needs the response stored, and its input and history are too "
                           f"large for the store ({self.store.max_bytes // 4} bytes).", param="background")
        self.background.check_room()
        snapshot = self.store.begin(draft.created(), draft.inputs, events.item_ids)
        draft.begun = snapshot is not None
        if snapshot is None:
            raise too_many("The store holds as many responses in progress as it can")
        try:
            batch = submit()
        except BaseException:
            self.store.end(draft.id)
            raise
        serving = self.chat.serving
        run = Run(draft.id, partial(serving.abort, batch), bool(draft.req.stream), frozenset(draft.req.include or ()))
        self.background.start(run, serving.detached(batch, events, trace), partial(self._ended, draft, events))
        if not draft.req.stream:
            return Response(snapshot, mimetype="application/json")
        return self._following(run, -1, environ)

    def _ended(self, draft: Draft, events: ResponseEvents) -> None:
        """The end of a response begun in the store (a background one, a stream kept): a failed one is kept as failed,
        as OpenAI keeps it (a finished one was kept as it finished); one that never ended (its client gone, its
        greenlet killed, an error before its stream) is let go."""
        response = events.response
        try:
            if response is not None and response["status"] == "failed":
                self.store.put(response, draft.inputs, draft.previous, True)
        finally:
            self.store.end(draft.id)

    def _following(self, run: Run, after: int, environ: dict[str, Any]) -> Response:
        poll_s = self.chat.serving.config.disconnect_poll_s
        frames = run.follow(after, partial(client_probe, environ), poll_s)
        return Response(frames, mimetype="text/event-stream", headers=HEADERS)

    def count(self, body: Any, budget: Budget) -> Json:
        """OpenAI's input token count: the prompt create would start for the same fields (its usage.input_tokens),
        refused where create would refuse them (a text.format schema the grammar engine refuses, too)."""
        prompt = self._prompt(self.chat.serving.validate(parse_count_request, body, budget), budget)
        return {"object": "response.input_tokens", "input_tokens": len(prompt.ids)}

    def _prompt(self, req: Fields, budget: Budget, echoes: bool = False) -> Prompt[Fields]:
        """The prompt of a request's fields, create's and the count's: its item references resolved, the previous
        response's items before its input, and with `truncation: "auto"` its first items dropped as needed; with
        `echoes` (create's), its input items as stored and its tools as echoed too.
        The parameters, the output grammar compiled off the loop, are made before the prompt is templated: they
        depend on the fields besides the items, the same for every candidate of a truncation. `budget`: what the
        body left of the request's values, to the items its references resolve to.
        A large request (its body's values, the stored items it brings in: lane "long") is worked on in the long
        prompts' thread, in two trips around the grammar's compile (made from the loop, in its own pool), its prompts
        templated there too (encode_here): on the loop, 16,000 items took ~200 ms to make a chat request of, a
        truncation's search did it again in part, and their encoding for the store ~270 ms. One of many tools (lane
        "short") is made a chat request of in the tokenising threads (its tools validated as chat's and measured: 300
        small ones 17-34 ms), its prompts templated each in the lane its length picks (encode)."""
        serving = self.chat.serving
        found = self._found(req)
        where = lane(budget.used, found.chars, budget.fields.get("tools", 0))
        conversation = serving.off_loop_if(where, self._conversation, req, budget, found)
        params = self.chat.params(conversation.whole)
        long = where == "long"
        chat_encode = self.chat.encode_here if long else self.chat.encode

        def encode(chat_req: ChatCompletionRequest, prompt_name: PromptName) -> list[int]:
            return chat_encode(chat_req, params.max_tokens, prompt_name)

        def prompt() -> Prompt[Fields]:
            chat_req, ids = self._fitted(conversation, encode)
            made = Prompt(conversation.req, conversation.previous, conversation.name, chat_req, ids, params)
            if echoes:
                made.inputs = _stored_inputs(conversation.sent, conversation.resent)
                made.tools = echoed_tools(conversation.req)
            return made

        return serving.off_loop_if("long" if long else "loop", prompt)

    def _found(self, req: ResponsePromptFields) -> Found:
        """The entries its item references and its previous response name, found or not (an id not found brings
        nothing in: its error comes in its turn). A reference brings in its item each time: resolving it costs its
        size each time (_resolved)."""
        holders: dict[str, Stored | None] = {}
        chars = 0
        for item in req.input_items:
            if (item_id := referred_id(item)) is not None:
                if item_id not in holders:
                    holders[item_id] = self.store.holder(item_id)
                if (stored := holders[item_id]) is not None:
                    chars += stored.item_size(item_id)
        previous = self.store.get(req.previous_response_id) if req.previous_response_id is not None else None
        return Found(holders, previous, chars + (len(previous.history) if isinstance(previous, Stored) else 0))

    def _conversation(self, req: Fields, budget: Budget, found: Found) -> Conversation[Fields]:
        req = self._resolved(req, budget, found.holders)
        previous = self._previous(req.previous_response_id, found.previous)
        history = ITEMS.validate_json(previous.history) if previous is not None else []
        self.chat.serving.check_serving(req.model)
        sent = req
        if resent := check_items([*history, *req.input_items], len(history)):
            req = req.model_copy(update={"input": [item for i, item in enumerate(req.input_items) if i not in resent]})
        items = [*history, *req.input_items]
        return Conversation(req, previous, INPUT if previous is None else HISTORY, items, req.to_chat(items), sent,
                            resent)

    def _fitted(self, conversation: Conversation[Fields], encode: Encode) -> tuple[ChatCompletionRequest, list[int]]:
        """The chat request of the items kept and its prompt's ids (_encoded); a continuation too long for the
        context says which part is (_check_input_alone)."""
        try:
            return self._encoded(conversation.req, conversation.items, conversation.whole, conversation.name, encode)
        except APIError as exc:
            if conversation.previous is not None and exc.code == "context_length_exceeded":
                self._check_input_alone(conversation.req, encode)
            raise

    def _resolved(self, req: Fields, budget: Budget, holders: dict[str, Stored | None]) -> Fields:
        """`req` with its item references replaced by the stored items they name (`holders`, _found's), each parsed
        alone. The items resolved are bounded like a request body: many references to a large item would otherwise
        cost many times its size. Their values, and those of the calls' arguments they hold, are charged to what the
        body left of the request's `budget`, as if the client had sent them in it."""
        if not holders:
            return req
        max_bytes = self.chat.serving.config.max_body_bytes
        items, resolved_bytes = [], 0
        values = {"budget": budget}
        for i, item in enumerate(req.input_items):
            if (item_id := referred_id(item)) is not None:
                stored = holders[item_id]
                if stored is None:
                    raise self._unresolved(item_id, f"input.[{i}].id")
                found = stored.item(item_id)
                if isinstance(item, ReasoningItem) and found["type"] != "reasoning":
                    raise APIError(400, f"Item with id '{item_id}' is a {found['type']} item, not a reasoning item.",
                                   param=f"input.[{i}].id")
                resolved_bytes += stored.item_size(item_id)
                if resolved_bytes > max_bytes:
                    raise APIError(400, f"The items referred to in 'input' are larger than {max_bytes} bytes "
                                   "together.", param="input")
                count = checked_values(found, "an item referred to")  # stored: valid, only its values counted
                try:
                    budget.charge(count)
                except JSONError as exc:
                    raise request_too_large(str(exc)) from None
                item = ITEM.validate_python(found, context=values)
            items.append(item)
        return req.model_copy(update={"input": items})

    def _unresolved(self, item_id: str, param: str) -> APIError:
        """An item reference (or a bare reasoning item) to no finished response's item: OpenAI's 404, word for word
        (clients recover by it: they drop the ids and retry), or, for one in progress (its input or output so far, a
        stream's or a background response's), a 400 naming it, to be referred to once it has finished."""
        running = self.store.running_holder(item_id)
        if running is None:
            return APIError(404, f"Item with id '{item_id}' not found. Items are not persisted when `store` is set to "
                            "false. Try again with `store` set to true, or remove this item from your input.",
                            param="input")
        return APIError(400, f"Item with id '{item_id}' is in response '{running}', still in progress: refer to it "
                        "once that response has finished.", param=param, code="response_in_progress")

    @staticmethod
    def _fitting(chat_req: ChatCompletionRequest, prompt_name: PromptName, encode: Encode) -> list[int] | None:
        """The prompt's ids, or None when it does not fit the context."""
        try:
            return encode(chat_req, prompt_name)
        except APIError as exc:
            if exc.code != "context_length_exceeded":
                raise
            return None

    def _encoded(self, req: ResponsePromptFields, items: list[Item], chat_req: ChatCompletionRequest,
                 prompt_name: PromptName, encode: Encode) -> tuple[ChatCompletionRequest, list[int]]:
        """The chat request of `items` (`chat_req`, or one without its first items) and its prompt's ids; with
        `truncation: "auto"`, one too long for the context is cut to the fewest first items dropped that make it
        fit, whose ids were made finding it. One that looks far too long is searched at once: tokenising it whole
        would be most of the work (a 6 MB conversation: 5.6 of 6 CPU seconds), and where the look is wrong the
        search ends keeping it whole."""
        searched = req.truncation == "auto" and self._looks_too_long(chat_req)
        if searched and (truncated := self._truncated(req, items, prompt_name, encode, whole_tried=False)):
            return truncated
        try:  # after a search that found nothing: the whole's error
            return chat_req, encode(chat_req, prompt_name)
        except APIError as exc:
            if searched or req.truncation != "auto" or exc.code != "context_length_exceeded":
                raise
            truncated = self._truncated(req, items, prompt_name, encode, whole_tried=True)
            if truncated is None:  # not even the fewest items fit: the same error, without templating it all again
                raise
            return truncated

    def _looks_too_long(self, chat_req: ChatCompletionRequest) -> bool:
        limit = self.chat.serving.info["max_model_len"]
        return chat_req.template_chars() > LONG_CHARS_PER_TOKEN * limit

    def _truncated(self, req: ResponsePromptFields, items: list[Item], prompt_name: PromptName, encode: Encode,
                   whole_tried: bool) -> tuple[ChatCompletionRequest, list[int]] | None:
        """The chat request without the fewest first items (never a system or developer message, nor the last
        item) that fits the context, if any, and its prompt's ids. Searched from the end, keeping 0, 1, 3, 7, ...
        of the droppable items, then by bisection: each prompt templated is at most about twice the one that fits,
        however long the conversation (a prompt only gets shorter as items go). `whole_tried`: keeping them all
        is known not to fit, else it is the doubling's last step: a prompt that looked too long but fits costs
        the doubling's candidates then the whole (under 3 times the whole for items of like sizes), not a
        bisection of candidates near the whole."""
        kept_outputs = {item.call_id for item in items[-1:] if isinstance(item, FunctionCallOutputItem)}
        # the last item stays, and so does the call it answers: an output alone would break the pairing
        droppable = [i for i, item in enumerate(items[:-1])
                     if not (isinstance(item, MessageItem) and item.role in ("system", "developer"))
                     and not (isinstance(item, FunctionCallItem) and item.call_id in kept_outputs)]

        def keeping(count: int) -> tuple[ChatCompletionRequest, list[int]] | None:
            dropped = set(droppable[:len(droppable) - count])
            # an output whose call was dropped would reach the template alone: it goes with its call
            calls = {items[i].call_id for i in dropped if isinstance(items[i], FunctionCallItem)}
            dropped |= {i for i in droppable
                        if isinstance(items[i], FunctionCallOutputItem) and items[i].call_id in calls}
            chat_req = req.to_chat([item for i, item in enumerate(items) if i not in dropped])
            ids = self._fitting(chat_req, prompt_name, encode)
            return None if ids is None else (chat_req, ids)

        fits, best = 0, keeping(0)
        if best is None:
            return None
        too_many = len(droppable) + (not whole_tried)  # the fewest kept known not to fit
        while (count := min(2 * fits + 1, too_many - 1)) > fits:
            if (candidate := keeping(count)) is None:
                too_many = count
                break
            fits, best = count, candidate
        while too_many - fits > 1:
            count = (fits + too_many) // 2
            if (candidate := keeping(count)) is None:
                too_many = count
            else:
                fits, best = count, candidate
        return best

    def _check_input_alone(self, req: ResponsePromptFields, encode: Encode) -> None:
        """A continuation too long for the context blames `input` when the new input alone is too long (the
        history aside), else previous_response_id: templated again, on this error only. The input alone may not
        make a prompt (a continuation with no input of its own): then it is not what is too long."""
        try:
            encode(req.to_chat(req.input_items), INPUT)
        except APIError as exc:
            if exc.code == "context_length_exceeded":
                raise

    def _keeps(self, req: ResponseCreateRequest, input_size: int, previous: Stored | None) -> bool:
        """`store` asked for and the store's rule met: decided before the first event, which says it."""
        if req.store is False:
            return False
        return self.store.keeps(input_size + (len(previous.history) if previous is not None else 0))

    def _previous(self, previous_id: str | None, stored: Entry | None) -> Stored | None:
        """The previous response (`stored`, found by `previous_id`), if it can be continued."""
        if previous_id is None:
            return None
        if stored is None:
            raise APIError(400, f"Previous response with id '{previous_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        if not isinstance(stored, Stored):  # its history is not known yet
            raise APIError(400, f"Previous response with id '{previous_id}' is still in progress: continue it once "
                           "it has finished.", param="previous_response_id", code="previous_response_in_progress")
        if len(stored.history) > self.store.max_bytes:  # truncation "auto" would let it grow without bound
            raise APIError(400, f"The conversation of previous response '{previous_id}' is larger than "
                           f"{self.store.max_bytes} bytes: start a new one.", param="previous_response_id")
        return stored

    def _stored(self, response_id: str) -> Entry:
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored

    def retrieve(self, response_id: str, args: Mapping[str, str], environ: dict[str, Any]) -> Response:
        """A stored response, or one in progress as its `response.created` said it, with the parts `include` names
        (responses_include); with `stream=true` a background stream's events kept, after `starting_after` (a
        sequence number), followed until it ends, as they were sent: with parts only `include` values its create
        named too."""
        check_query(args, ("stream", "starting_after", "include_obfuscation", *INCLUDE_KEYS), INCLUDE_KEYS)
        include = query_include(args)
        for name in ("stream", "include_obfuscation"):  # the latter: padding of the events, nothing to pad here
            if args.get(name, "false") not in ("true", "false"):
                raise APIError(400, f"Invalid value for '{name}': expected 'true' or 'false'", param=name)
        if args.get("stream", "false") == "false":
            for name in ("starting_after", "include_obfuscation"):
                if name in args:
                    raise APIError(400, f"'{name}' needs 'stream=true'", param=name)
            body = self._stored(response_id).body
            if include:
                body = self.chat.serving.off_loop_if(lane(chars=len(body)), response_with_parts, body, include)
            return Response(body, mimetype="application/json")
        after = args.get("starting_after")
        if after is not None and not (after.isascii() and after.isdigit()):
            raise APIError(400, "Invalid value for 'starting_after': a sequence number", param="starting_after")
        after_number = -1 if after is None else int(after)  # -1: from the first event
        self._stored(response_id)
        run = self.background.events(response_id)
        if run is None:
            raise APIError(400, f"Response '{response_id}' has no events kept to stream: only a response created "
                           "with background and stream true has, until it is one of the "
                           "last streams ended.", param="stream")
        if missing := sorted(include - run.include):  # the openai client resumes with create's include
            raise APIError(400, f"'include' names {', '.join(missing)}, which the response's create did not: a "
                           "stream's events are replayed as they were sent.", param="include")
        if after_number + 1 < run.first:
            raise APIError(400, f"The events of response '{response_id}' before sequence number {run.first} are "
                           "no longer kept.", param="starting_after")
        if run.ended.is_set() and after_number >= run.first + len(run.frames):
            raise APIError(400, f"Response '{response_id}' ended at sequence number {run.first + len(run.frames) - 1}.",
                           param="starting_after")
        return self._following(run, after_number, environ)

    def cancel(self, response_id: str, args: Mapping[str, str]) -> Response:
        """A background response cancelled (its output so far kept), or as it is once ended."""
        check_query(args, ())
        if not self._stored(response_id).background:
            raise APIError(400, "Responses can only be cancelled if they were created with background=true.",
                           param="response_id")
        self.background.cancel(response_id)
        return Response(self._stored(response_id).body, mimetype="application/json")

    def delete(self, response_id: str, args: Mapping[str, str]) -> Json:
        """A background response still generating is cancelled as it goes."""
        check_query(args, ())
        self.background.cancel(response_id, wait=False)
        self.background.forget(response_id)
        if not self.store.delete(response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, args: Mapping[str, str]) -> Response:
        """A page of a response's input items, with the parts `include` names (responses_include): parsed and encoded
        off the loop where they are large, as a stored chat completion's messages."""
        check_query(args, ("order", "limit", "after", "before", *INCLUDE_KEYS), INCLUDE_KEYS)
        include = query_include(args)
        items = self._stored(response_id).input_items
        page = self.chat.serving.off_loop_if(lane(chars=len(items)), encoded_page, items, args, "desc", "input item",
                                             partial(with_parts, include=include))
        return Response(page + b"\n", mimetype="application/json")
