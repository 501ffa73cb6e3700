"""outsider_suites.py's checks that take more than one request: llama.cpp `tools/server/tests/unit` test_security,
test_tokenize, test_tool_call and test_chat_completion, vLLM `tests/entrypoints/openai` test_optional_middleware,
test_tokenization and test_tool_choice_null, against the one server outsider_suites starts (with an API key and CORS
origins). Each returns what is wrong, or None.

Differences kept, on purpose: llama.cpp serves `/v1/models` without the key and takes Anthropic's `X-Api-Key`, its 401
says `authentication_error`; ours guards all of `/v1/`, as vLLM, and says OpenAI's `invalid_request_error` /
`invalid_api_key` (vLLM's 401 is `{"error": "Unauthorized"}`) with `WWW-Authenticate: Bearer`. Outside `/v1/`
(`/health`, `/tokenize`, `/detokenize`, `/metrics`, `/stats`) no key is asked, as vLLM; llama.cpp asks it everywhere
but /health and /models. Its `/tokenize` reads `content`, `add_special`, `with_pieces`; ours is vLLM's (`prompt`,
`add_special_tokens`, `return_token_strs`) and names the others in a 400.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import requests

from chat_http import MODEL
from server_process import GunicornServer

API_KEY = "sk-this-is-the-secret-key"  # llama.cpp test_security's
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CORS_ORIGINS = "localhost,web.mydomain.fr"
NO_THINKING = {"enable_thinking": False}  # a random model's thought never ends: the call or the format comes after it
TEST_TOOL = {"type": "function", "function": {"name": "test", "description": "", "parameters": {
    "type": "object", "properties": {"success": {"type": "boolean", "const": True}}, "required": ["success"],
    "additionalProperties": False}}}  # llama.cpp's, closed: random weights otherwise add keys up to max_tokens
WEATHER = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": {"type": "object", "properties": {}}}}]
BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
CODING = [{"role": "system", "content": "You are a coding assistant."}, {"role": "user", "content": "Write an example"}]
Check = Callable[[GunicornServer], "str | None"]


def _post(srv: GunicornServer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
          ) -> requests.Response:
    return requests.post(srv.url + path, json=body, headers=AUTH if headers is None else headers, timeout=120)


def _chat(srv: GunicornServer, **body: Any) -> requests.Response:
    return _post(srv, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, **body})


def _problems(results: dict[str, bool]) -> str | None:
    """The names of the results that are False, or None."""
    failed = [name for name, ok in results.items() if not ok]
    return ", ".join(failed) or None


def _refused_401(response: requests.Response) -> bool:
    error = response.json().get("error") if response.status_code == 401 else None
    return error is not None and error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"


def api_key_routes(srv: GunicornServer) -> str | None:
    """llama.cpp test_access_public_endpoint and vLLM test_optional_middleware: /health needs no key (and gets an
    `X-Request-Id` of 32 characters, a client's own echoed); `/v1/models` needs it (vLLM's rule: llama.cpp serves it
    without), and answers with it."""
    health = requests.get(srv.url + "/health", timeout=30)
    custom = requests.get(srv.url + "/health", headers={"X-Request-Id": "Custom"}, timeout=30)
    return _problems({
        "/health without a key": health.status_code == 200 and "error" not in health.json(),
        "/health's X-Request-Id": len(health.headers.get("X-Request-Id", "")) == 32,
        "a client's X-Request-Id echoed": custom.headers.get("X-Request-Id") == "Custom",
        "/v1/models without a key": _refused_401(requests.get(srv.url + "/v1/models", timeout=30)),
        "/v1/models with it": requests.get(srv.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200,
    })


def api_key_forms(srv: GunicornServer) -> str | None:
    """llama.cpp test_incorrect_api_key / test_correct_api_key / test_correct_api_key_anthropic_header: none or a wrong
    key is a 401 in OpenAI's envelope, the right one served; the scheme in any case and spaces around the key are
    RFC 7235's; Anthropic's `X-Api-Key` (llama.cpp's, for its /v1/messages, which we do not serve), Basic or a bare key
    are refused."""
    body = {"model": MODEL, "prompt": "I believe the meaning of life is", "max_tokens": 2}

    def answer(**headers: str) -> requests.Response:
        return _post(srv, "/v1/completions", body, headers)
    served = {f"Authorization {value!r}": answer(Authorization=value).status_code == 200
              for value in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER  {API_KEY} ")}
    refused = {f"Authorization {value!r} refused": _refused_401(answer(Authorization=value))
               for value in ("Bearer invalid-key", "Bearer", "Bearer ", f"Basic {API_KEY}", API_KEY)}
    return _problems({**served, **refused, "no key refused": _refused_401(answer()),
                      "X-Api-Key refused": _refused_401(answer(**{"X-Api-Key": API_KEY}))})


def openai_library_key(srv: GunicornServer) -> str | None:
    """llama.cpp test_openai_library_correct_api_key: the openai client with the key gets its one choice; with another
    key, its AuthenticationError."""
    messages = [{"role": "system", "content": "You are a chatbot."},
                {"role": "user", "content": "What is the meaning of life?"}]
    answer = srv.openai_client(API_KEY).chat.completions.create(model=MODEL, max_tokens=2, messages=messages)
    try:
        srv.openai_client("sk-wrong").chat.completions.create(model=MODEL, max_tokens=2, messages=WEATHER)
    except openai.AuthenticationError as exc:
        return None if len(answer.choices) == 1 and exc.code == "invalid_api_key" else f"{answer} / {exc}"
    return "a wrong key served"


def cors_preflight(srv: GunicornServer) -> str | None:
    """llama.cpp test_cors_options, with a key set: the preflight needs none and is answered with the origin, the
    methods and the header asked for. Differences: llama.cpp's methods are `GET, POST` (ours add DELETE, OPTIONS for
    the stored objects), its headers `*` (ours: those the preflight asked for), and it sends `Allow-Credentials: true`
    (ours not: the key is a header, never a cookie)."""
    results = {}
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
    for origin in ("localhost", "web.mydomain.fr"):
        answer = requests.options(srv.url + "/v1/completions", timeout=30, headers={"Origin": origin, **asked})
        allowed = answer.headers
        results[origin] = (answer.status_code == 200 and allowed.get("Access-Control-Allow-Origin") == origin
                           and "POST" in allowed.get("Access-Control-Allow-Methods", "")
                           and allowed.get("Access-Control-Allow-Headers") == "Authorization")
    other = requests.options(srv.url + "/v1/completions", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    results["an origin not listed gets no CORS headers"] = "Access-Control-Allow-Origin" not in other.headers
    return _problems(results)


def tokenize_round_trip(srv: GunicornServer) -> str | None:
    """llama.cpp test_tokenize_detokenize and test_tokenize_with_pieces, in vLLM's fields: a text's ids detokenize to
    it; `return_token_strs` gives one piece an id, none empty (multi-byte characters split across pieces); a special
    token's text is its one id, and back."""
    results = {}
    for text in ("What is the capital of France ?", "This is a test string with unicode 媽 and emoji 🤗"):
        tokens = _post(srv, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
        back = _post(srv, "/detokenize", {"tokens": tokens["tokens"]}).json()
        ids, pieces = tokens["tokens"], tokens["token_strs"]
        results[text] = (back["prompt"] == text and len(ids) > 5 and tokens["count"] == len(ids) == len(pieces)
                         and all(pieces))
    special = _post(srv, "/tokenize", {"prompt": "<|im_start|>user<|im_end|>", "return_token_strs": True}).json()
    results["special tokens"] = special["token_strs"] == ["<|im_start|>", "user", "<|im_end|>"] and _post(
        srv, "/detokenize", {"tokens": special["tokens"]}).json()["prompt"] == "<|im_start|>user<|im_end|>"
    return _problems(results)


def tokenize_chat_prompts(srv: GunicornServer) -> str | None:
    """vLLM test_tokenize_chat_with_tools: the chat form with tools counts what the chat completion's prompt counts;
    llama.cpp test_chat_template_assistant_prefill, in vLLM's form (`continue_final_message`): the prompt ends with
    the assistant's text, given as a string or as text parts."""
    tools = [{"type": "function", "function": {"name": "get_current_weather", "description": "Get the weather",
                                               "parameters": {"type": "object", "properties": {
                                                   "location": {"type": "string"}}, "required": ["location"]}}}]
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    counted = _post(srv, "/tokenize", {"model": MODEL, "messages": messages, "tools": tools,
                                       "add_generation_prompt": True}).json()["count"]
    prompt = _chat(srv, messages=messages, tools=tools).json()["usage"]["prompt_tokens"]
    results = {f"tools: /tokenize {counted} = the chat's prompt {prompt}": counted == prompt}
    for prefill in ("Whill", [{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]):
        ids = _post(srv, "/tokenize", {"messages": [*BOOK, {"role": "assistant", "content": prefill}],
                                       "continue_final_message": True, "add_generation_prompt": False}).json()
        text = _post(srv, "/detokenize", {"tokens": ids["tokens"]}).json()["prompt"]
        results[f"prefill {prefill!r}"] = text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nWhill")
    return _problems(results)



def tool_choice_null(srv: GunicornServer) -> str | None:
    """vLLM test_tool_choice_null: an explicit null is an absent key (auto where tools are given: their prompt and
    greedy answer are the same as without it; with no tools, or beside a response_format, served); `bogus`, and
    `auto` without tools, are still refused. llama.cpp's do_test_completion_without_tool_call sends `tools: null,
    tool_choice: null`."""
    answers = {name: _chat(srv, messages=WEATHER, tools=WEATHER_TOOLS, max_tokens=8, temperature=0.0, **extra).json()
               for name, extra in (("absent", {}), ("null", {"tool_choice": None}), ("auto", {"tool_choice": "auto"}))}
    prompt = {name: answer["usage"]["prompt_tokens"] for name, answer in answers.items()}
    return _problems({
        f"null with tools is auto {prompt}": prompt["null"] == prompt["absent"] == prompt["auto"],
        # `required` has the same prompt: the greedy answer (its text or call, its finish) tells them apart
        "null answers as absent": answers["null"]["choices"] == answers["absent"]["choices"],
        "null without tools": _chat(srv, messages=WEATHER, tool_choice=None).status_code == 200,
        "tools and tool_choice null": _chat(srv, messages=WEATHER, tools=None, tool_choice=None).status_code == 200,
        "null beside json_object": _chat(srv, messages=WEATHER, tool_choice=None,
                                         response_format={"type": "json_object"}).status_code == 200,
        "none with tools": _chat(srv, messages=WEATHER, tools=WEATHER_TOOLS, tool_choice="none").status_code == 200,
        "bogus refused":
            _param(_chat(srv, messages=WEATHER, tools=WEATHER_TOOLS, tool_choice="bogus")) == "tool_choice",
        "auto without tools refused": _param(_chat(srv, messages=WEATHER, tool_choice="auto")) == "tool_choice",
    })


def _param(response: requests.Response) -> str | None:
    return response.json()["error"]["param"] if response.status_code == 400 else f"status {response.status_code}"


def required_tool_call(srv: GunicornServer) -> str | None:
    """llama.cpp test_tool_call do_test_completion_with_required_tool_tiny: `tool_choice: required` with
    `parallel_tool_calls: false` gives exactly one call of the tool, no content, its arguments a JSON string holding
    the required key; streamed, the call's first delta has its id, type and name, the arguments' deltas join to the
    same kind of object, and the finish reason is `tool_calls`."""
    body = {"model": MODEL, "messages": CODING, "tools": [TEST_TOOL], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0.0, "top_p": 1.0,
            "extra_body": {"top_k": 1, "chat_template_kwargs": NO_THINKING}}
    client = srv.openai_client(API_KEY)
    choice = client.chat.completions.create(**body).choices[0]
    calls = choice.message.tool_calls or []
    results = {"one call": len(calls) == 1 and choice.finish_reason == "tool_calls",
               "no content": choice.message.content in (None, ""),
               "the tool, its key": all(call.function.name == "test" and _has_key(call.function.arguments, "success")
                                        and call.id and call.type == "function" for call in calls)}
    deltas = [call for chunk in client.chat.completions.create(**body, stream=True) for chunk_choice in chunk.choices
              if chunk_choice.delta.tool_calls for call in chunk_choice.delta.tool_calls]
    first = deltas[0] if deltas else None
    results["streamed: id, type and name first"] = (first is not None and bool(first.id) and first.type == "function"
                                                    and first.function.name == "test")
    results["streamed: one call's arguments"] = {d.index for d in deltas} == {0} and _has_key(
        "".join(d.function.arguments or "" for d in deltas), "success")
    return _problems(results)


def _has_key(arguments: str, key: str) -> bool:
    try:
        value = json.loads(arguments)
    except ValueError:
        return False
    return isinstance(value, dict) and key in value


def tool_history(srv: GunicornServer) -> str | None:
    """llama.cpp test_tool_call do_test_calc_result's conversation: an assistant message with `content: null` and a
    call, the tool's answer with its `name`, served; a `code_interpreter` tool (llama.cpp's) is not OpenAI's chat
    tool type: refused naming it."""
    calc = {"type": "function", "function": {"name": "calculate", "description": "A calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
    call = {"id": "call_6789", "type": "function",
            "function": {"name": "calculate", "arguments": "{\"expression\":\"sin(30 * pi / 180)\"}"}}
    messages = [{"role": "user", "content": "What's the y coordinate of a point on the unit sphere at angle 30?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "name": "calculate", "content": "0.55644242476", "tool_call_id": "call_6789"}]
    served = _chat(srv, messages=messages, tools=[calc])
    return _problems({
        "the history served":
            served.status_code == 200 and served.json()["choices"][0]["message"]["role"] == "assistant",
        "code_interpreter refused": _param(_chat(srv, messages=CODING, tools=[{"type": "code_interpreter"}],
                                                 tool_choice="required")) == "tools.[0].type",
    })


def chat_stream_shape(srv: GunicornServer) -> str | None:
    """llama.cpp test_chat_completion_stream: every chunk has the one id and the model; the role only in the first;
    the finish chunk carries no content; the usage chunk counts the tokens asked for. Difference: llama.cpp's first
    chunk says `content: null`, ours `""` (OpenAI's and vLLM's)."""
    stream = srv.openai_client(API_KEY).chat.completions.create(
        model=MODEL, messages=BOOK, max_tokens=8, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    choices = [chunk.choices[0] for chunk in chunks if chunk.choices]
    finish = [choice for choice in choices if choice.finish_reason]
    usage = chunks[-1].usage
    return _problems({
        "one id": len({chunk.id for chunk in chunks}) == 1 and all(chunk.model == MODEL for chunk in chunks),
        "the role first, only": choices[0].delta.role == "assistant" and not any(c.delta.role for c in choices[1:]),
        "one finish, no content in it": len(finish) == 1 and finish[0].finish_reason == "length"
                                        and not finish[0].delta.content,
        "usage last": usage is not None and not chunks[-1].choices and usage.completion_tokens == 8,
    })


def logit_bias_bans(srv: GunicornServer) -> str | None:
    """llama.cpp test_logit_bias, sharpened for random weights: the greedy answer's first token (its id from
    /tokenize), biased -100, is not the first token any more."""
    body = {"messages": BOOK, "max_tokens": 1, "temperature": 0.0, "chat_template_kwargs": NO_THINKING}
    first = _chat(srv, **body).json()["choices"][0]["message"]["content"]
    ids = _post(srv, "/tokenize", {"prompt": first, "add_special_tokens": False}).json()["tokens"]
    if len(ids) != 1:
        return f"the first token {first!r} tokenizes to {ids}"
    biased = _chat(srv, **body, logit_bias={str(ids[0]): -100}).json()["choices"][0]["message"]["content"]
    return None if biased != first else f"{first!r} again"


CHECKS: list[tuple[str, Check]] = [
    ("llama.cpp test_security test_access_public_endpoint / vLLM test_optional_middleware", api_key_routes),
    ("llama.cpp test_security: the key's header forms", api_key_forms),
    ("llama.cpp test_security test_openai_library_correct_api_key", openai_library_key),
    ("llama.cpp test_security test_cors_options (with a key)", cors_preflight),
    ("llama.cpp test_tokenize: round trips, pieces, special tokens", tokenize_round_trip),
    ("vLLM test_tokenize_chat_with_tools / llama.cpp test_chat_template_assistant_prefill", tokenize_chat_prompts),
    ("vLLM test_tool_choice_null", tool_choice_null),
    ("llama.cpp test_tool_call: a required call, parallel_tool_calls false", required_tool_call),
    ("llama.cpp test_tool_call: a call's history; code_interpreter", tool_history),
    ("llama.cpp test_chat_completion test_chat_completion_stream: the chunks' shape", chat_stream_shape),
    ("llama.cpp test_chat_completion test_logit_bias", logit_bias_bans),
]
