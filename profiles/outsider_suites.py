"""Other servers' own test cases, re-expressed against a real `gunicorn -k gevent server:app` (the tiny test checkpoint,
CPU, fp32, a 256-token context, an API key and CORS origins set, as llama.cpp's test_security runs): the parts of
vLLM's `tests/entrypoints/openai` (completion/test_completion_error, test_completion,
chat_completion/test_logprob_token_ids_validation, test_batched_chat_completions, test_extra_content_fields,
test_enable_force_include_usage, test_non_object_body_validation, test_chat_logit_bias_validation,
test_chat_stop_token_ids_validation, test_thinking_token_budget_validation, test_completion_with_function_calling,
test_serving_chat, basic/test_basic, test_tokenization, test_chat_echo, test_chat, completion/test_empty_prompt_list,
test_prompt_validation, test_completion_text_offset, test_metrics, v1/engine/test_output_processor) and llama.cpp's
`tools/server/tests/unit` (test_compat_oai_responses, test_chat_truncate, test_ignore_eos, test_chat_completion,
test_tokenize; test_security and test_tool_call in outsider_checks.py) that do not depend on a real model's words.
Each case says what this server must answer: a field it does not implement is a 400 naming it (vLLM's
`logprob_token_ids`, llama.cpp's `timings_per_token`), as is a malformed value. Prints one line a case; exit status 1
on any mismatch.

    python profiles/outsider_suites.py
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import MODEL, cpu_env, vllm_samples  # noqa: E402
from checkpoints import VOCAB_SIZE, make_checkpoint  # noqa: E402
from outsider_checks import API_KEY, AUTH, BOOK, CHECKS, CORS_ORIGINS  # noqa: E402
from server_process import GunicornServer  # noqa: E402

MAX_MODEL_LEN = 256
USER = [{"role": "user", "content": "hi"}]
# (source, path, body, the status, the error's `param` or a 200 body's check)
Case = tuple[str, str, dict[str, Any], int, str | Callable[[dict[str, Any]], bool]]


def served(body: dict[str, Any]) -> bool:
    """A chat answer generated to its end: an assistant message, a finish reason, the tokens it counted."""
    choice = body["choices"][0]
    return (choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
            and body["usage"]["completion_tokens"] > 0)


def conversation(turns: int) -> list[dict[str, str]]:
    """llama.cpp test_chat_truncate's: a system message, `turns` user/assistant pairs, a last user message."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(1, turns + 1):
        messages += [{"role": "user", "content": f"[U{i:03d}] Please explain topic {i:03d} in detail."},
                     {"role": "assistant", "content": f"[A{i:03d}] Here is my explanation of topic {i:03d}."}]
    return [*messages, {"role": "user", "content": "[U Last]This is the most recent user message."}]


CHAT, COMPLETIONS, RESPONSES, TOKENIZE = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize"
TOOLS = [{"type": "function", "function": {"name": "dummy_function_name", "parameters": {"type": "object"}}}]
MATH = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "what is 1+1?"}]
SERIES = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Who won the world series in 2020?"},
          {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
          {"role": "user", "content": "Where was it played?"}]
SAYING = [{"role": "user", "content": "tell me a common saying"},
          {"role": "assistant", "content": "Here is a common saying about apple. An apple a day, keeps"}]
CASES: list[Case] = [
    ("vLLM test_completion_error: json_schema without its schema", COMPLETIONS,
     {"prompt": "Test prompt", "max_tokens": 10, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("vLLM test_completion_error: json_schema without its schema (chat)", CHAT,
     {"messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("vLLM test_completion_error: a negative token id", COMPLETIONS, {"prompt": [-1], "max_tokens": 2}, 400, "prompt"),
    ("vLLM test_completion_error: a negative token id, nested", COMPLETIONS,
     {"prompt": [[-1]], "max_tokens": 2}, 400, "prompt"),
    ("vLLM test_logprob_token_ids_validation: empty", CHAT, {"messages": USER, "logprob_token_ids": []}, 400,
     "logprob_token_ids"),
    ("vLLM test_logprob_token_ids_validation: without logprobs", COMPLETIONS,
     {"prompt": "hi", "logprob_token_ids": [100]}, 400, "logprob_token_ids"),
    ("vLLM test_batched_chat_completions: return_tokens_as_token_ids", CHAT,
     {"messages": USER, "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True}, 400,
     "return_tokens_as_token_ids"),
    ("vLLM test_batched_chat_completions: return_token_ids", CHAT, {"messages": USER, "return_token_ids": True}, 400,
     "return_token_ids"),
    ("vLLM test_extra_content_fields: a content part's extra field", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "source_lang_code": "en"}]}]}, 400,
     "messages.[0].content.[0].source_lang_code"),
    ("llama.cpp test_compat_oai_responses: json_schema without its schema", RESPONSES,
     {"input": "Write an example", "text": {"format": {"type": "json_schema", "name": "test"}}}, 400,
     "text.format.schema"),
    # Qwen3 thinks first (the format holds from its `</think>`, which a random model may never write): thinking off
    ("llama.cpp test_compat_oai_responses: a const schema", RESPONSES,
     {"input": "Write an example", "max_output_tokens": 16, "chat_template_kwargs": {"enable_thinking": False},
      "text": {"format": {"type": "json_schema", "name": "test", "schema": {"const": "foooooo"}}}}, 200,
     lambda body: [item["content"][0]["text"] for item in body["output"]] == ['"foooooo"']),
    ("llama.cpp test_compat_oai_responses: timings_per_token", RESPONSES,
     {"input": "hi", "max_output_tokens": 16, "timings_per_token": True}, 400, "timings_per_token"),
    ("llama.cpp test_compat_oai_responses: return_progress", RESPONSES,
     {"input": "hi", "max_output_tokens": 16, "return_progress": True}, 400, "return_progress"),
    ("llama.cpp test_chat_truncate: past the context", CHAT,
     {"messages": conversation(95), "max_completion_tokens": 1}, 400, "messages"),
    ("llama.cpp test_chat_truncate: past the context, streamed (before any event)", CHAT,
     {"messages": conversation(95), "max_completion_tokens": 1, "stream": True}, 400, "messages"),
    ("llama.cpp test_ignore_eos: every token asked for", COMPLETIONS,
     {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}, 200,
     lambda body: body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"),
    ("vLLM test_chat_logit_bias_validation: the vocabulary's last id", CHAT,
     {"messages": USER, "logit_bias": {str(VOCAB_SIZE - 1): 1.0}}, 200, served),
    ("vLLM test_chat_logit_bias_validation: an id past the vocabulary", CHAT,
     {"messages": USER, "logit_bias": {str(VOCAB_SIZE + 1): 1.0}}, 400, "logit_bias"),
    ("vLLM test_chat_logit_bias_validation: a key not an id", CHAT,
     {"messages": USER, "logit_bias": {"bad1": 50.0, "bad2": 20.0}}, 400, "logit_bias"),
    ("vLLM test_chat_logit_bias_validation: a value not a number", CHAT,
     {"messages": USER, "logit_bias": {"1": "not_a_number"}}, 400, "logit_bias.1"),
    ("vLLM test_chat_stop_token_ids_validation: the vocabulary's last id", CHAT,
     {"messages": USER, "stop_token_ids": [VOCAB_SIZE - 1]}, 200, served),
    ("vLLM test_chat_stop_token_ids_validation: an id past the vocabulary", CHAT,
     {"messages": USER, "stop_token_ids": [VOCAB_SIZE + 1]}, 400, "stop_token_ids"),
    ("vLLM test_chat_stop_token_ids_validation: a negative id", CHAT,
     {"messages": USER, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("vLLM test_thinking_token_budget_validation: chat", CHAT,
     {"messages": USER, "thinking_token_budget": 10}, 400, "thinking_token_budget"),
    ("vLLM test_thinking_token_budget_validation: completions", COMPLETIONS,
     {"prompt": "hello", "thinking_token_budget": 5}, 400, "thinking_token_budget"),
    ("vLLM test_inconsistent_tool_choice_and_tools: a named tool without tools", CHAT,
     {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "dummy_function_name"}}}, 400,
     "tool_choice"),
    ("vLLM test_inconsistent_tool_choice_and_tools: a named tool not among them", CHAT,
     {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nondefined"}}}, 400,
     "tool_choice"),
    ("vLLM test_inconsistent_tool_choice_and_tools: an empty tool_choice", CHAT,
     {"messages": USER, "tools": TOOLS, "tool_choice": {}}, 400, "tool_choice.type"),
    ("vLLM test_completion: legacy logprobs past 5 (OpenAI's bound; vLLM's is 20)", COMPLETIONS,
     {"prompt": [0, 0, 0, 0, 0], "logprobs": 6}, 400, "logprobs"),
    ("vLLM test_completion: prompt_logprobs -1", COMPLETIONS,
     {"prompt": ["A robot may not injure another robot", "My name is"], "prompt_logprobs": -1}, 400,
     "prompt_logprobs"),
    ("vLLM test_tokenize_chat: add_special_tokens at vLLM's default", TOKENIZE,
     {"messages": USER, "add_generation_prompt": True, "add_special_tokens": False}, 200,
     lambda body: body["count"] == len(body["tokens"]) > 0 and body["token_strs"] is None),
    ("vLLM test_tokenize_chat: add_special_tokens true (vLLM's default is false)", TOKENIZE,
     {"messages": USER, "add_special_tokens": True}, 400, "add_special_tokens"),
    ("vLLM test_non_object_body_validation: an empty cache_salt", CHAT, {"messages": USER, "cache_salt": ""}, 400,
     "cache_salt"),
    ("vLLM test_serving_chat test_gpt_oss_tool_message_array_content: a tool result as text parts", CHAT,
     {"messages": [*USER, {"role": "assistant", "tool_calls": [
         {"id": "call_1", "type": "function", "function": {"name": "dummy_function_name", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Weather data: "},
                                                                {"type": "text", "text": "25°C"}]}]}, 200,
     served),
    ("llama.cpp test_invalid_chat_completion_req: a message without a role", CHAT,
     {"messages": [{"role": "system", "content": "test"}, {}]}, 400, "messages.[1].role"),
    ("llama.cpp test_invalid_chat_completion_req: a content not text", CHAT,
     {"messages": [{"role": "system", "content": 123}]}, 400, "messages.[0].content"),
    ("llama.cpp test_invalid_chat_completion_req: messages null", CHAT, {"messages": None}, 400, "messages"),
    ("llama.cpp test_invalid_chat_completion_req: messages a string", CHAT, {"messages": "string"}, 400, "messages"),
    ("llama.cpp test_invalid_chat_completion_req: a message a number", CHAT, {"messages": [123]}, 400,
     "messages.[0]"),
    ("llama.cpp test_invalid_chat_completion_req: a role a number", CHAT, {"messages": [{"role": 123}]}, 400,
     "messages.[0].role"),
    ("llama.cpp test_completion_with_response_format: type sound", CHAT,
     {"messages": USER, "response_format": {"type": "sound"}}, 400, "response_format"),
    # llama.cpp's extensions (a schema inside json_object, top-level json_schema and grammar): not OpenAI's, refused
    ("llama.cpp test_completion_with_response_format: json_object's schema 123", CHAT,
     {"messages": USER, "response_format": {"type": "json_object", "schema": 123}}, 400, "response_format.schema"),
    ("llama.cpp test_completion_with_response_format: json_object's schema of type hiccup", CHAT,
     {"messages": USER, "response_format": {"type": "json_object", "schema": {"type": "hiccup"}}}, 400,
     "response_format.schema"),
    ("llama.cpp test_completion_with_json_schema: a top-level json_schema", CHAT,
     {"messages": USER, "json_schema": {"const": "42"}}, 400, "json_schema"),
    ("llama.cpp test_completion_with_grammar: a top-level grammar", CHAT,
     {"messages": USER, "grammar": 'root ::= "a"{5,5}'}, 400, "grammar"),
    # OpenAI's json_schema needs its name (llama.cpp takes one without)
    ("llama.cpp test_completion_with_response_format: json_schema without a name", CHAT,
     {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}},
     400, "response_format.json_schema.name"),
    ("vLLM test_empty_prompt_list: an empty list", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("vLLM test_prompt_validation test_empty_prompt: prompt_embeds (not implemented)", COMPLETIONS,
     {"prompt": None, "prompt_embeds": []}, 400, "prompt_embeds"),
    ("vLLM test_prompt_validation test_out_of_vocab_token_ids", COMPLETIONS, {"prompt": [999999]}, 400, "prompt"),
    ("vLLM test_prompt_validation: kv_transfer_params (not implemented)", COMPLETIONS,
     {"prompt": "hello", "kv_transfer_params": {"return_last_hidden_state": True}}, 400, "kv_transfer_params"),
    ("vLLM test_prompt_validation: kv_transfer_params (not implemented), chat", CHAT,
     {"messages": USER, "kv_transfer_params": {"return_last_hidden_state": True}}, 400, "kv_transfer_params"),
    ("vLLM test_chat_echo: echo with continue_final_message", CHAT,
     {"messages": SAYING, "echo": True, "continue_final_message": True, "add_generation_prompt": False}, 200,
     lambda body: served(body) and SAYING[1]["content"] in body["choices"][0]["message"]["content"]),
    ("vLLM test_chat_echo: no echo with continue_final_message", CHAT,
     {"messages": SAYING, "echo": False, "continue_final_message": True, "add_generation_prompt": False}, 200,
     lambda body: served(body) and SAYING[1]["content"] not in body["choices"][0]["message"]["content"]),
    # vLLM's lax types read "true" as true and -1 as the whole vocabulary: OpenAI's are strict (a 400 naming it)
    ("vLLM test_chat_echo test_top_logprobs: logprobs \"true\" (a string)", CHAT,
     {"messages": USER, "top_logprobs": -1, "logprobs": "true"}, 400, "logprobs"),
    ("vLLM test_chat_echo test_prompt_logprobs: -1 (the whole vocabulary)", CHAT,
     {"messages": USER, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ("vLLM test_chat test_no_logprobs_chat", CHAT, {"messages": MATH, "logprobs": False}, 200,
     lambda body: served(body) and body["choices"][0]["logprobs"] is None),
    ("vLLM test_chat test_zero_logprobs_chat", CHAT, {"messages": MATH, "logprobs": True, "top_logprobs": 0}, 200,
     lambda body: body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []),
    ("vLLM test_chat test_some_logprobs_chat", CHAT, {"messages": MATH, "logprobs": True, "top_logprobs": 5}, 200,
     lambda body: len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5),
    ("vLLM test_chat test_too_many_chat_logprobs: 21, streamed", CHAT,
     {"messages": MATH, "logprobs": True, "top_logprobs": 21, "stream": True}, 400, "top_logprobs"),
    ("vLLM test_chat test_too_many_chat_logprobs: 30", CHAT,
     {"messages": MATH, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    # vLLM's dict at a position: the k best, and the prompt token's own where it is not among them
    ("vLLM test_chat test_prompt_logprobs_chat / test_more_than_one_prompt_logprobs_chat: 1", CHAT,
     {"messages": SERIES, "prompt_logprobs": 1}, 200,
     lambda body: body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"][3]) in (1, 2)),
    ("vLLM test_chat test_more_than_one_prompt_logprobs_chat: 2", CHAT, {"messages": SERIES, "prompt_logprobs": 2}, 200,
     lambda body: len(body["prompt_logprobs"][3]) in (2, 3)),
    ("vLLM test_chat test_prompt_logprobs_chat: none asked", CHAT, {"messages": SERIES}, 200,
     lambda body: served(body) and body.get("prompt_logprobs") is None),
    ("vLLM test_chat test_chat_completion_stream_options: include_usage null, not streamed", CHAT,
     {"messages": MATH, "stream": False, "stream_options": {"include_usage": None}}, 400,
     "stream_options.include_usage"),
    ("vLLM test_chat test_chat_completion_stream_options: include_usage, not streamed", CHAT,
     {"messages": MATH, "stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("vLLM test_chat test_chat_completion_stream_options: min_characters (not implemented)", CHAT,
     {"messages": MATH, "stream": True, "min_characters": 10}, 400, "min_characters"),
    ("vLLM test_output_processor test_stop_string: include_stop_str_in_output (not implemented)", COMPLETIONS,
     {"prompt": "hi", "stop": ["a"], "include_stop_str_in_output": True}, 400, "include_stop_str_in_output"),
    ("llama.cpp test_chat_completion: the user's content as text parts", CHAT,
     {"messages": [BOOK[0], {"role": "user", "content": [{"type": "text", "text": "What is"},
                                                         {"type": "text", "text": "the best book"}]}],
      "max_tokens": 8, "ignore_eos": True}, 200,
     lambda body: served(body) and "cmpl" in body["id"] and body["usage"]["completion_tokens"] == 8),
    ("llama.cpp test_chat_completions_multiple_choices", CHAT,
     {"messages": BOOK, "n": 2, "max_tokens": 8, "ignore_eos": True}, 200,
     lambda body: [(c["index"], c["message"]["role"], c["finish_reason"]) for c in body["choices"]]
     == [(0, "assistant", "length"), (1, "assistant", "length")]),
    # llama.cpp's error type is its own `exceed_context_size_error` (with n_prompt_tokens, n_ctx); ours OpenAI's
    ("llama.cpp test_context_size_exceeded", CHAT, {"messages": BOOK * 100}, 400, "messages"),
    ("llama.cpp test_chat_completion_with_timings_per_token (not implemented)", CHAT,
     {"messages": USER, "stream": True, "stream_options": {"include_usage": True}, "timings_per_token": True}, 400,
     "timings_per_token"),
    ("llama.cpp test_return_progress (not implemented)", CHAT,
     {"messages": USER, "stream": True, "return_progress": True}, 400, "return_progress"),
    # llama.cpp's /tokenize fields: ours are vLLM's (`prompt`, `add_special_tokens`, `return_token_strs`)
    ("llama.cpp test_tokenize_detokenize: `content`", TOKENIZE, {"content": "What is the capital of France ?"}, 400,
     "content"),
    ("llama.cpp test_tokenize_with_bos: `add_special`", TOKENIZE, {"prompt": "What is", "add_special": True}, 400,
     "add_special"),
    ("llama.cpp test_tokenize_with_pieces: `with_pieces`", TOKENIZE, {"prompt": "媽 🤗", "with_pieces": True}, 400,
     "with_pieces"),
    ("vLLM test_tokenization: a prompt beside messages", TOKENIZE, {"prompt": "x", "messages": USER}, 400, "prompt"),
    ("vLLM test_tokenization: continue_final_message beside add_generation_prompt", TOKENIZE,
     {"messages": SAYING, "continue_final_message": True, "add_generation_prompt": True}, 400,
     "continue_final_message"),
    ("vLLM test_detokenize: an id past the vocabulary", "/detokenize", {"tokens": [1, VOCAB_SIZE]}, 400, "tokens.[1]"),
]


def check_case(url: str, case: Case) -> str | None:
    """What is wrong with the answer to `case`, or None."""
    _, path, body, status, expected = case
    answer = requests.post(url + path, json={"model": MODEL, "max_tokens": 2, **body} if path in (CHAT, COMPLETIONS)
                           else {"model": MODEL, **body}, headers=AUTH, timeout=120)
    if answer.status_code != status:
        return f"{answer.status_code} {answer.text[:300]}"
    if isinstance(expected, str):
        error = answer.json()["error"]
        return None if error["param"] == expected else f"param {error['param']!r}: {error['message']}"
    return None if expected(answer.json()) else f"200 {answer.text[:300]}"


def continuous_usage(srv: GunicornServer) -> str | None:
    """vLLM test_enable_force_include_usage: with `continuous_usage_stats`, every chunk's usage adds up and its count
    never falls, and grows with each chunk of text; the chunk of the finish reason (OpenAI's own, after the last
    token's: vLLM's holds both) and the usage chunk repeat the last count."""
    client = srv.openai_client(API_KEY)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_completion_tokens=10,
        temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": 10, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    last = 0
    for chunk in stream:
        usage = chunk.usage
        if usage is None or usage.total_tokens != usage.prompt_tokens + usage.completion_tokens:
            return f"usage {usage}"
        text = any(choice.delta.content for choice in chunk.choices)
        if usage.completion_tokens < last or (text and usage.completion_tokens == last):
            return f"completion_tokens {usage.completion_tokens} after {last} ({chunk})"
        last = usage.completion_tokens
    return None if last == 10 else f"{last} completion tokens"


def wrong_content_type(srv: GunicornServer) -> str | None:
    """vLLM basic/test_basic's test_request_wrong_content_type: the openai client's body labelled a form is refused
    (vLLM: 400 or 415; here 415), not read as JSON: a web page may send a form to any origin with no preflight."""
    try:
        srv.openai_client(API_KEY).chat.completions.create(
            model=MODEL, messages=USER, max_tokens=2,
            extra_headers={"Content-Type": "application/x-www-form-urlencoded"})
    except openai.APIStatusError as exc:
        if exc.status_code == 415 and exc.code == "unsupported_media_type":
            return None
        return f"{exc.status_code} {exc.code} {exc.message}"
    return "served"


def token_problem(token: Any) -> str | None:
    """llama.cpp test_logprobs' checks of one listed token."""
    return None if token.logprob <= 0.0 and token.bytes is not None and token.top_logprobs else f"token {token}"


def chat_logprobs(srv: GunicornServer) -> str | None:
    """llama.cpp test_chat_completion test_logprobs: the tokens listed spell the content, each with a logprob <= 0,
    its bytes and its alternatives."""
    answer = srv.openai_client(API_KEY).chat.completions.create(
        model=MODEL, temperature=0.0, messages=BOOK, max_tokens=5, logprobs=True, top_logprobs=10)
    choice = answer.choices[0]
    tokens = choice.logprobs.content
    problem = next((p for token in tokens if (p := token_problem(token))), None)
    joined = "".join(token.token for token in tokens)
    return problem or (None if joined == choice.message.content else f"{joined!r} != {choice.message.content!r}")


def chat_logprobs_stream(srv: GunicornServer) -> str | None:
    """llama.cpp test_chat_completion test_logprobs_stream (its older form: the current one skips the role chunk):
    every chunk before the finish has logprobs, as OpenAI's recorded streams do; the tokens listed spell the content."""
    stream = srv.openai_client(API_KEY).chat.completions.create(
        model=MODEL, temperature=0.0, messages=BOOK, max_tokens=5, logprobs=True, top_logprobs=10, stream=True)
    text, joined = "", ""
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.finish_reason is None:
            if choice.logprobs is None or choice.logprobs.content is None:
                return f"a chunk without logprobs: {chunk}"
            text += choice.delta.content or ""
            for token in choice.logprobs.content:
                joined += token.token
                if problem := token_problem(token):
                    return problem
    return None if joined == text else f"{joined!r} != {text!r}"


def text_offsets_with_stop(srv: GunicornServer) -> str | None:
    """vLLM test_completion_text_offset: with a stop string holding text back, the streamed `text_offset`s are the
    collected ones (here the stop string is the free answer's, to hold text back and then cut there)."""
    client = srv.openai_client(API_KEY)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": 0.0, "logprobs": 0}
    free = client.completions.create(**body).choices[0].text
    stop = free[len(free) // 2 :][:3]
    collected = client.completions.create(**body, stop=[stop]).choices[0]
    offsets = [offset for chunk in client.completions.create(**body, stop=[stop], stream=True)
               for choice in chunk.choices if choice.logprobs for offset in choice.logprobs.text_offset]
    if collected.finish_reason != "stop" or offsets != collected.logprobs.text_offset:
        return f"{collected.finish_reason}: streamed {offsets}, collected {collected.logprobs.text_offset}"
    return None


# vLLM test_metrics's EXPECTED_METRICS_V1 but those we do not serve (README, "vLLM's metric names": the deprecated
# GPU names, time_per_output_token_seconds), and the other series we serve: those observed once a choice (vLLM's
# child requests of an n > 1 request), then those once a prompt (vLLM's parent request), then once a request
CHOICE_HISTOGRAMS = ("request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens",
                     "e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                     "request_prefill_time_seconds", "request_decode_time_seconds",
                     "request_time_per_output_token_seconds")
PROMPT_HISTOGRAMS = ("request_params_n", "request_max_num_generation_tokens")
REQUEST_HISTOGRAMS = ("time_to_first_token_seconds",)
VLLM_METRICS = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions_total",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                "vllm:cache_config_info",
                *(f"vllm:{name}_{part}" for name in (*CHOICE_HISTOGRAMS, *PROMPT_HISTOGRAMS, *REQUEST_HISTOGRAMS,
                                                      "inter_token_latency_seconds", "iteration_tokens_total")
                  for part in ("sum", "bucket", "count"))]


def _by_name(text: str) -> dict[str, float]:
    """`vllm:` samples but buckets, a name's summed over its label sets (request_success over finished_reason)."""
    return {name: value for (name,), value in vllm_samples(text).items()}


def vllm_metrics(srv: GunicornServer) -> str | None:
    """vLLM test_metrics test_metrics_exist and test_metrics_counts (the grown counts, other checks sharing this
    server: 3 completions of a token-id prompt, 10 tokens each, then one with n=2: its choices counted as vLLM's child
    requests; then two of ours: two prompts with n=2, a parent request each, as vLLM's completions endpoint makes
    them; and `echo` with max_tokens 0, its tokenless choice observed in each per-choice series all the same) and
    test_abort_metrics_reset's idle gauges: nothing running or waiting, no KV block held once they are done."""
    prompt, max_tokens = [9707, 847, 829, 374, 8359, 323, 358, 2948, 10963], 10
    asked = [(1, 1, max_tokens), (1, 1, max_tokens), (1, 1, max_tokens), (1, 2, max_tokens), (2, 2, max_tokens),
             (1, 1, 0)]  # (prompts, n, max_tokens): the last echoed
    before = _by_name(requests.get(srv.url + "/metrics", timeout=30).text)
    for prompts, n, most in asked:
        srv.openai_client(API_KEY).completions.create(model=MODEL, prompt=[prompt] * prompts, max_tokens=most, n=n,
                                                      echo=not most, extra_body={"ignore_eos": True})
    text = requests.get(srv.url + "/metrics", timeout=30).text
    after = _by_name(text)
    grown = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    choices = sum(prompts * n for prompts, n, _ in asked)
    generating = [(prompts, n) for prompts, n, most in asked if most]
    tokens = sum(prompts * n for prompts, n in generating) * max_tokens
    parents = sum(prompts for prompts, _, _ in asked)
    expected = {**{f"vllm:{name}_count": choices for name in CHOICE_HISTOGRAMS},
                **{f"vllm:{name}_count": parents for name in PROMPT_HISTOGRAMS},
                **{f"vllm:{name}_count": len(generating) for name in REQUEST_HISTOGRAMS},
                "vllm:request_prompt_tokens_sum": choices * len(prompt),
                "vllm:request_generation_tokens_sum": tokens,
                "vllm:request_params_n_sum": choices, "vllm:request_params_max_tokens_sum": tokens,
                "vllm:request_max_num_generation_tokens_sum": sum(prompts for prompts, _ in generating) * max_tokens,
                "vllm:prompt_tokens_total": parents * len(prompt),  # each prompt once, as `usage` (README)
                "vllm:generation_tokens_total": tokens, "vllm:request_success_total": choices,
                "vllm:inter_token_latency_seconds_count": tokens // max_tokens * (max_tokens - 1)}  # none a first
    missing = [name for name in VLLM_METRICS if name not in text]
    wrong = {name: grown.get(name) for name, value in expected.items() if grown.get(name) != value}
    seconds = {phase: grown.get(f"vllm:request_{phase}_time_seconds_sum", -1.0)
               for phase in ("queue", "prefill", "decode", "inference")}
    e2e = grown.get("vllm:e2e_request_latency_seconds_sum", -1.0)
    # each phase taken, and a choice's queued and running time within its e2e latency (submitted after its arrival,
    # its last token before its finish was read)
    if min(seconds.values()) <= 0 or seconds["queue"] + seconds["inference"] > e2e:
        wrong["queue, prefill, decode, inference, e2e seconds"] = [*seconds.values(), e2e]
    # the engine's steps: each choice's decode steps' tokens at least, and its prompt's (some cached)
    steps = [grown.get(f"vllm:iteration_tokens_total_{part}", 0.0) for part in ("count", "sum")]
    decoded = tokens // max_tokens * (max_tokens - 1)
    if not decoded < steps[1] <= decoded + choices * len(prompt):
        wrong["iteration_tokens_total count, sum"] = steps
    idle = {name: after[name] for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                           "vllm:kv_cache_usage_perc") if after.get(name) != 0.0}
    return f"missing {missing}, counts {wrong}, idle {idle}" if missing or wrong or idle else None


SERVER_CHECKS: list[tuple[str, Callable[[GunicornServer], str | None]]] = [
    ("vLLM test_enable_force_include_usage: continuous usage", continuous_usage),
    ("vLLM test_basic: test_request_wrong_content_type", wrong_content_type),
    ("llama.cpp test_chat_completion: test_logprobs", chat_logprobs),
    ("llama.cpp test_chat_completion: test_logprobs_stream", chat_logprobs_stream),
    ("vLLM test_completion_text_offset: streamed offsets with a stop string's holdback", text_offsets_with_stop),
    ("vLLM test_metrics: test_metrics_exist, test_metrics_counts, test_abort_metrics_reset's idle gauges",
     vllm_metrics),
    *CHECKS,
]


def main(out: Path = REPO / "profiles" / "out") -> int:
    """Every case against one server (its log in `out`): 0 where each is as expected."""
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN=str(MAX_MODEL_LEN), NANOQWEN_API_KEY=API_KEY,
                  NANOQWEN_CORS_ORIGINS=CORS_ORIGINS)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with GunicornServer(env, out / "outsider_suites.log") as srv:
        checks = [(case[0], lambda case=case: check_case(srv.url, case)) for case in CASES]
        checks += [(name, lambda check=check: check(srv)) for name, check in SERVER_CHECKS]
        for name, check in checks:
            try:
                problem = check()
            except Exception as exc:  # an answer not of the shape a check reads (no envelope, no content) is its FAIL
                problem = repr(exc)
            failures += problem is not None
            print(f"{'ok  ' if problem is None else 'FAIL'} {name}" + ("" if problem is None else f": {problem}"))
    print(f"{len(checks) - failures} of {len(checks)} as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
