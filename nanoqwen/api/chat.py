"""`POST /v1/chat/completions`: validate, template and tokenize off the loop, submit, stream or collect."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import Response

from nanoqwen.api.chat_store import ChatStore, Keeping, KeptCollector, KeptStream, StoredRequest
from nanoqwen.api.request_id import request_id, response_id
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder, ToolParsing
from nanoqwen.api.schemas import ChatCompletionRequest, parse_chat_request
from nanoqwen.api.serving import Batch, Collector, Serving, Streamer, invalid_request, lane
from nanoqwen.api.sse import RunningUsage
from nanoqwen.api.strict_json import Budget
from nanoqwen.api.structured import compiled, output_grammar
from nanoqwen.engine.request import SamplingParams
from nanoqwen.engine.validation import InvalidRequest, PromptTooLongError, context_length_error, prompt_token_limit

Json = dict[str, Any]


@dataclass(frozen=True)
class PromptName:
    """Where a too long prompt is: in words (the context-length error's message) and its request field."""

    words: str = "messages"
    param: str = "messages"


class ChatService:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.store = ChatStore()

    def handle(self, body: Any, budget: Budget, environ: dict[str, Any]) -> Response | dict[str, Any]:
        serving = self.serving
        trace = serving.stats.begin()
        req = serving.validate(parse_chat_request, body, budget)
        serving.check_serving(req.model)
        params = self.params(req)
        prompt = self.encode(req, params.max_tokens, PromptName())
        id_ = response_id("chatcmpl", req.request_id, stored=bool(req.store))
        # before submit: its 503 (the offload lane full) must leave nothing generating
        keeping = self.keeping(req, params, body, budget, id_) if req.store else None
        batch = self.submit(req, params, prompt)
        tools = ToolParsing.of(req)
        model, fp = serving.config.served_model_name, serving.fingerprint
        running = RunningUsage(len(prompt)) if req.continuous_usage else None
        reasoning, think_end = req.include_reasoning is not False, serving.engine.think_ids[1]
        echo, created = req.echo_text, int(time.time())
        chunks = ChunkBuilder(model, fp, req.include_usage, tools, params.n, running, reasoning, think_end, echo,
                              id=id_, created=created, want_logprobs=bool(req.logprobs)) if req.stream else None
        builder = CompletionBuilder(model, fp, params.n, bool(req.logprobs), tools, reasoning, think_end, echo,
                                    id=id_, created=created)
        stream: Streamer | None = chunks
        collect: Collector = builder
        if keeping is not None:
            if chunks is not None:  # a stream's completion is assembled as the collected one
                stream = KeptStream(chunks, builder, keeping)
            else:
                collect = KeptCollector(builder, keeping)
        return serving.respond(batch, stream, collect, trace, environ)

    def keeping(self, req: ChatCompletionRequest, params: SamplingParams, body: Json, budget: Budget,
                completion_id: str) -> Keeping | None:
        """How a `store: true` request's completion is kept (chat_store): what it keeps of the request encoded off the
        loop for a large body (4,000 tools held the loop ~0.2 s); None where that is too large for the store."""
        serving = self.serving
        # what OpenAI's stored completion says of its request besides create's answer
        fields = {"seed": params.seed, "temperature": params.temperature, "top_p": params.top_p,
                  "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
                  "tool_choice": body.get("tool_choice"), "tools": body.get("tools"),
                  "response_format": body.get("response_format"), "input_user": req.user,
                  "request_id": request_id()}
        request = serving.off_loop_if(lane(budget.used), StoredRequest.of, body["messages"], completion_id,
                                      req.metadata or {}, fields)
        return Keeping(self.store, request, serving.encoding.run) if self.store.keeps(request) else None

    def params(self, req: ChatCompletionRequest) -> SamplingParams:
        """The sampling parameters, the output grammar compiled off the loop: before the prompt is templated, so
        that a schema refused is refused whatever the prompt (too long for the context, or long to tokenise)."""
        serving = self.serving
        params = req.sampling_params(serving.engine.sampling_defaults)
        compiled(output_grammar, serving, req, params)
        return params

    def submit(self, req: ChatCompletionRequest, params: SamplingParams, prompt: list[int],
               prompt_name: PromptName = PromptName(), reports_admission: bool = False) -> Batch:
        """Submits the prompt's ids (from `encode`) with the parameters from `params`: the engine's stream."""
        return self.serving.submit([prompt], params, req.split_reasoning, prompt_name.param, reports_admission)

    def encode(self, req: ChatCompletionRequest, max_tokens: int | None, prompt_name: PromptName) -> list[int]:
        """The prompt's ids, templated and tokenised off the loop; a 400 naming `prompt_name` when too long."""
        return self.serving.off_loop(req.template_chars(), self.encode_here, req, max_tokens, prompt_name)

    def encode_here(self, req: ChatCompletionRequest, max_tokens: int | None, prompt_name: PromptName) -> list[int]:
        """`encode`'s work in the calling thread: an offload thread's (a large Responses request's truncation search
        templates its candidates where it runs)."""
        serving = self.serving
        limit = serving.info["max_model_len"]
        try:
            return req.encoded(serving.engine.encode_messages, prompt_token_limit(limit, max_tokens))
        except PromptTooLongError as exc:
            error = context_length_error(limit, exc.num_tokens, max_tokens, prompt_name.words, prompt_name.param)
            raise invalid_request(error) from None
        except InvalidRequest as exc:
            raise invalid_request(exc, prompt_name.param) from None
