"""Builders for OpenAI's `chat.completion` and `chat.completion.chunk` objects from engine events."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nanoqwen.api.sse import DoneFraming, RunningUsage
from nanoqwen.api.tool_calls import Parsed, ToolCallParser, assemble
from nanoqwen.engine.request import Event, PromptLogprobs, TokenLogprob, TopLogprob, Usage

if TYPE_CHECKING:
    from nanoqwen.api.schemas import ChatCompletionRequest

Json = dict[str, Any]
# The tier that served the request, which OpenAI names in every answer and chunk: "default" for `auto`, none, or any
# tier asked for (one model, one queue: no tier is faster or cheaper than another).
SERVICE_TIER = "default"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def fingerprint(info: dict[str, Any]) -> str:
    """`system_fingerprint`: changes whenever the model or the execution mode does."""
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()
    return f"fp_{digest[:10]}"


def logprobs_json(logprobs: list[TokenLogprob]) -> Json:
    """A chat choice's `logprobs`, answer or chunk: OpenAI's always says `refusal` (the refusal's tokens): none here."""
    return {"content": token_logprobs_json(logprobs), "refusal": None}


def token_logprobs_json(logprobs: list[TokenLogprob], with_bytes: bool = True) -> list[Json]:
    """Each token's logprob, its bytes and its alternatives'; without bytes as OpenAI's `ResponseLogProb` (the
    Responses text events')."""
    def entry(lp: TopLogprob) -> Json:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes} if with_bytes else {
            "token": lp.token, "logprob": lp.logprob}

    return [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top_logprobs]} for lp in logprobs]


def prompt_logprobs_json(prompt: PromptLogprobs) -> list[Json | None]:
    """vLLM's `prompt_logprobs`: per prompt position (the first, which nothing predicts, null) the prompt token's
    logprob, rank and text, then the top k's (ranks 1..k), keyed by token id. Built as vLLM's dict is: the prompt
    token first, its entry replaced by its top-k one when it is among them; -inf clamped to -9999.0 as vLLM's is."""
    positions: list[Json | None] = [None]
    for lp in prompt.tokens:
        entries = [(lp.token_id, lp.logprob, lp.rank, lp.token)]
        entries += [(t.token_id, t.logprob, rank, t.token) for rank, t in enumerate(lp.top_logprobs, 1)]
        positions.append({str(token_id): {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": token}
                          for token_id, logprob, rank, token in entries})
    return positions


def usage_json(usage: Usage, reasoning_tokens: int = 0) -> Json:
    """OpenAI's usage object with every detail it sends today; no audio and no predicted output here
    (`prediction` is only a hint). `reasoning_tokens`: a chat answer's; 0 in legacy completions,
    which do not split the reasoning off."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


@dataclass
class ReasoningTokens:
    """One choice's reasoning tokens: those through its `</think>` token (`end_id`), the think tags
    included, when it reasoned at all (0 otherwise). Content text before any `</think>` token ends
    the count too (a tag the model wrote in pieces)."""

    end_id: int | None = None
    _count: int = 0
    _closed: bool = False
    _reasoned: bool = False
    _held: list[TokenLogprob] = field(default_factory=list)
    _listed: int = 0  # logprobs seen so far: they may come after their tokens (output.released_logprobs)

    def add(self, event: Event) -> None:
        """Counts the event's tokens before the content (reasoning, if the choice reasoned)."""
        self._reasoned = self._reasoned or bool(event.reasoning)
        if self._closed:
            return
        ids = event.token_ids
        counted = len(ids)
        if self.end_id in ids:
            counted, self._closed = ids.index(self.end_id) + 1, True
        elif event.text:
            counted, self._closed = 0, True
        self._count += counted

    @property
    def count(self) -> int:
        return self._count if self._reasoned else 0

    def content_logprobs(self, event: Event, ends: bool | None = None) -> list[TokenLogprob]:
        """The event's logprobs less the reasoning tokens' (the first `_count` listed; after `add`), as
        `include_reasoning: false` streams them: those of tokens not yet known to be reasoning or
        content are held until the choice shows which (its first reasoning, content or end; `ends`: the choice ends
        here, by default when the event finishes it; a failed stream's choices end unfinished)."""
        logprobs = event.logprobs or []
        before = min(len(logprobs), max(0, self._count - self._listed))
        self._listed += len(logprobs)
        self._held += logprobs[:before]
        out = logprobs[before:]
        if self._reasoned:
            self._held = []
        elif self._closed or (event.finish_reason is not None if ends is None else ends):
            out, self._held = self._held + out, []
        return out


def _with_reasoning(obj: Json, reasoning: str) -> Json:
    # Both names: `reasoning_content` (DeepSeek/vLLM) and `reasoning` (the newer one).
    if reasoning:
        obj["reasoning_content"] = reasoning
        obj["reasoning"] = reasoning
    return obj


@dataclass(frozen=True)
class ToolParsing:
    """Whether a request's answers are parsed for tool calls, and how many are kept."""

    enabled: bool = False
    max_calls: int | None = None
    forced: bool = False  # tool_choice "required" or named: the answer is calls only
    constrained: bool = False  # a call the model opens follows the grammar (forced, or a strict tool under "auto")

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> ToolParsing:
        """A chat request's (also the one a Responses request amounts to)."""
        return cls(req.shows_tools, req.kept_calls, req.forces_tool_call, req.constrains_any_call)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.max_calls, self.constrained) if self.enabled else None


def finish_reason(reason: str, called: bool) -> str:
    """"tool_calls" for an answer that ended with its calls whole (ToolCallParser.called), else the engine's reason."""
    return "tool_calls" if called and reason == "stop" else reason


@dataclass
class Choice:
    """One choice's output, accumulated event by event."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    reasoning_tokens: ReasoningTokens = field(default_factory=ReasoningTokens)

    def add(self, event: Event) -> None:
        self.reasoning_tokens.add(event)
        self.text.append(event.text)
        self.reasoning.append(event.reasoning)
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


@dataclass
class CompletionBuilder:
    """Accumulates a whole request's events into one `chat.completion`."""

    model: str
    fingerprint: str
    n: int
    want_logprobs: bool
    tools: ToolParsing = ToolParsing()
    include_reasoning: bool = True  # vLLM's `include_reasoning: false`: the model reasons, the answer omits it
    think_end: int | None = None  # `</think>`'s token id: reasoning tokens are counted through it
    echo: str = ""  # vLLM's echo: the text before each choice's content (ChatCompletionRequest.echo_text)
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._choices = [Choice(reasoning_tokens=ReasoningTokens(self.think_end)) for _ in range(self.n)]
        self._prompt: PromptLogprobs | None = None  # vLLM's prompt_logprobs, when asked for

    def add(self, event: Event) -> None:
        self._choices[event.index].add(event)
        self._prompt = event.prompt_logprobs or self._prompt

    def _choice(self, index: int, choice: Choice) -> Json:
        text = "".join(choice.text)
        # OpenAI's message always has a refusal and its annotations (url citations): none here
        message: Json = {"role": "assistant", "content": self.echo + text, "refusal": None, "annotations": []}
        reason = choice.finish_reason
        parser = self.tools.parser()
        if parser is not None:
            parsed = parser.feed(text) + parser.finish()  # its content the text but for a call's markup
            message["content"] = self.echo + parsed.content
            if parsed.calls:
                message["content"] = message["content"] or None
                message["tool_calls"] = [call.to_json() for call in assemble(parsed.calls)]
                reason = finish_reason(reason, parser.called) if reason is not None else None
        # vLLM's include_reasoning false: the reasoning tokens' logprobs are left out too (they carry its text)
        logprobs = choice.logprobs if self.include_reasoning else choice.logprobs[choice.reasoning_tokens.count:]
        return {
            "index": index,
            "message": _with_reasoning(message, "".join(choice.reasoning) if self.include_reasoning else ""),
            "logprobs": logprobs_json(logprobs) if self.want_logprobs else None,
            "finish_reason": reason,
        }

    def build(self, usage: Usage) -> Json:
        completion = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "service_tier": SERVICE_TIER,
            "system_fingerprint": self.fingerprint,
            "choices": [self._choice(i, c) for i, c in enumerate(self._choices)],
            "usage": usage_json(usage, sum(c.reasoning_tokens.count for c in self._choices)),
        }
        if self._prompt is not None:
            completion["prompt_logprobs"] = prompt_logprobs_json(self._prompt)
        return completion


@dataclass
class ChunkBuilder(DoneFraming):
    """The `chat.completion.chunk` objects of one stream: one id and one `created` throughout."""

    model: str
    fingerprint: str
    include_usage: bool
    tools: ToolParsing = ToolParsing()
    n: int = 1
    running: RunningUsage | None = None
    include_reasoning: bool = True
    think_end: int | None = None
    echo: str = ""
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    want_logprobs: bool = False

    def __post_init__(self) -> None:
        self._parsers: dict[int, ToolCallParser] = {}  # by choice index, once it has output
        # the choices whose chunks carried logprobs: one with none (an empty answer) says `content: []` at its finish,
        # as its collected answer does, and not nothing (the openai stream helper's choice.logprobs None)
        self._with_logprobs: set[int] = set()
        self._reasoning = [ReasoningTokens(self.think_end) for _ in range(self.n)]
        # With tools and tool_choice auto, a choice's role delta waits for its first chunk: OpenAI's says
        # `content: null` before a call, `""` before text, as the collected message's content is then.
        waits = self.tools.enabled and not self.tools.forced and not self.echo
        # each waiting choice's chunks of logprobs alone so far, sent after its role delta
        self._waiting: dict[int, list[Json]] = {index: [] for index in range(self.n)} if waits else {}
        # no content settled yet: opened before reasoning (no content key sent), or forced (null, until a call comes)
        self._contentless: set[int] = set()
        # the chunks of choices opened while a lower one waits: choices open in index order (the openai client's
        # stream helper takes the first chunk's choices as its list and indexes it: choice 1 first is an IndexError)
        self._held: dict[int, list[Json]] = {}

    def head(self) -> Json:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "service_tier": SERVICE_TIER, "system_fingerprint": self.fingerprint}

    def _chunk(self, choices: list[Json]) -> Json:
        chunk = self.head()
        chunk["choices"] = choices
        if self.include_usage:  # OpenAI sends `usage: null` on every chunk but the last (with_usage: vLLM's so far)
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[Json]:
        """The role deltas known before any output (a forced call's answer has no content: null), then the echoes,
        as vLLM sends them."""
        content = None if self.tools.forced and not self.echo else ""
        opened = [index for index in range(self.n) if index not in self._waiting]
        if content is None:  # a forced answer cut before its call ends with content "", as the collected one
            self._contentless.update(opened)
        echoes = [self._delta(index, {"content": self.echo}) for index in opened] if self.echo else []
        return self.with_usage([self.role(index, content) for index in opened] + echoes)

    def chunks(self, event: Event) -> list[Json]:
        """The chunks one engine event turns into. An error (the server's to send, after them) cuts every choice where
        it is: what each holds back (text that may yet be a tool call, chunks waiting for their role delta or for a
        lower choice's) goes out first, as its answer would end there, with no finish reason."""
        if self.running is not None:
            self.running.add(event)
        if event.error is None:
            out = self._choice_chunks(event)
        else:
            out = [chunk for index in range(self.n) for chunk in self._choice_chunks(Event(index, logprobs=[]), True)]
        self.with_usage(out)
        if event.usage is not None and self.include_usage:
            out.append(self.usage(event.usage))
        return out

    def _choice_chunks(self, event: Event, cut: bool = False) -> list[Json]:
        """The chunks of one choice's event, and those it releases; `cut`: the choice ends here, unfinished."""
        ends = cut or event.finish_reason is not None
        reasoning = self._reasoning[event.index]
        reasoning.add(event)
        if not self.include_reasoning and event.logprobs is not None:
            event = replace(event, logprobs=reasoning.content_logprobs(event, ends))
        out = self.deltas(event, ends)
        if event.index in self._contentless and any(
                key in chunk["choices"][0]["delta"] for chunk in out for key in ("content", "tool_calls")):
            self._contentless.discard(event.index)
        if event.finish_reason is not None:
            if event.index in self._contentless:  # the collected answer's content is "" then: deltas joined say so
                out.append(self._delta(event.index, {"content": ""}))
            out.append(self.finish(event.index, event.finish_reason))
        if (out or ends) and event.index in self._waiting:
            out = self._waiting[event.index] + out
            choices = [chunk["choices"][0] for chunk in out]
            if not ends and all(not choice["delta"] and choice["finish_reason"] is None for choice in choices):
                self._waiting[event.index] = out  # logprobs alone: what the role delta says is not known yet
                out = []
            else:
                del self._waiting[event.index]
                first = choices[0]["delta"] if choices else {}
                if "tool_calls" in first:  # OpenAI's recorded stream: the role in the call's first chunk
                    choices[0]["delta"] = {"role": "assistant", "content": None, **first, "refusal": None}
                else:
                    out.insert(0, self._opened(event.index, choices, ends))
        if out and event.index not in self._waiting and (self._held or self._waiting):
            if event.index in self._held or any(index < event.index for index in self._waiting):
                self._held.setdefault(event.index, []).extend(out)
                out = []
            out += self._released()
        return out

    def _released(self) -> list[Json]:
        """The held chunks of the choices every lower one of which has opened, in index order."""
        out = []
        for index in sorted(self._held):
            if any(lower < index for lower in self._waiting):
                break
            out += self._held.pop(index)
        return out

    def role(self, index: int, content: str | None = "") -> Json:
        return self._delta(index, {"role": "assistant", "content": content, "refusal": None})

    def _opened(self, index: int, first: list[Json], ends: bool) -> Json:
        """The role delta of a choice that waited for its first chunks (`first`, their choices; logprobs-only ones,
        held until something decides, come first; `ends`: the choice ends with them): `content: null` before a call,
        `""` before text or the end; before reasoning what follows is not known yet: no content."""
        role = self.role(index)
        for choice in first:
            if "tool_calls" in choice["delta"]:
                role["choices"][0]["delta"]["content"] = None
                return role
            if "content" in choice["delta"] or choice["finish_reason"] is not None:
                return role
        if ends:  # cut before anything: its answer is "" as at any end
            return role
        del role["choices"][0]["delta"]["content"]
        self._contentless.add(index)
        return role

    def deltas(self, event: Event, ends: bool | None = None) -> list[Json]:
        """The content/reasoning chunk of an event (none when it carries nothing to send), then a
        chunk per piece of a tool call it decodes: a call's index, id, type and name first, then
        each new stretch of its arguments. At the choice's end (`ends`, by default when the event finishes it; a failed
        stream's choices end unfinished) what the parser held is out."""
        parsed = Parsed(event.text)
        if (parser := self._parser(event.index)) is not None:
            parsed = parser.feed(event.text)
            if event.finish_reason is not None if ends is None else ends:
                parsed += parser.finish()
        chunks = []
        reasoning = event.reasoning if self.include_reasoning else ""
        if event.logprobs:
            self._with_logprobs.add(event.index)
        if parsed.content or reasoning or event.logprobs:
            delta = _with_reasoning({"content": parsed.content} if parsed.content else {}, reasoning)
            chunks.append(self._chunk([{"index": event.index, "delta": delta,
                                        "logprobs": self._logprobs(event.logprobs or []), "finish_reason": None}]))
        for call in parsed.calls:
            if call.id is not None:
                chunks.append(self._tool_delta(event.index, {"index": call.index, "id": call.id, "type": "function",
                                                             "function": {"name": call.name, "arguments": ""}}))
            if call.arguments:
                chunks.append(self._tool_delta(event.index, {"index": call.index,
                                                             "function": {"arguments": call.arguments}}))
        return chunks

    def _parser(self, index: int) -> ToolCallParser | None:
        if index not in self._parsers and (parser := self.tools.parser()) is not None:
            self._parsers[index] = parser
        return self._parsers.get(index)

    def _tool_delta(self, index: int, call: Json) -> Json:
        return self._delta(index, {"tool_calls": [call]})

    def _delta(self, index: int, delta: Json) -> Json:
        return self._chunk([{"index": index, "delta": delta, "logprobs": self._logprobs([]), "finish_reason": None}])

    def _logprobs(self, logprobs: list[TokenLogprob]) -> Json | None:
        """A chunk's before the finish: with logprobs asked for, each says its tokens', none for a role or a call's
        delta (as OpenAI's recorded streams in openai-python's tests send on the role chunk)."""
        return logprobs_json(logprobs) if logprobs or self.want_logprobs else None

    def finish(self, index: int, reason: str) -> Json:
        parser = self._parsers.get(index)
        reason = finish_reason(reason, parser is not None and parser.called)
        logprobs = logprobs_json([]) if self.want_logprobs and index not in self._with_logprobs else None
        return self._chunk([{"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": reason}])

    def usage(self, usage: Usage) -> Json:
        chunk = self._chunk([])
        chunk["usage"] = usage_json(usage, sum(r.count for r in self._reasoning))
        return chunk
