"""Requests with many tools, or one whose schema fills a long prompt, through `gunicorn -k gevent server:app` and the
openai client: agent clients send 64 tools and more routinely. Their validation is a small CPU job each, done in the
tokenising threads (many at once): in the long prompts' one thread (8 pending at most), behind a long prompt, such
requests sent together got 503s."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from chat_http import MODEL, cpu_env, post_chat
from checkpoints import make_checkpoint
from server_process import GunicornServer

CONCURRENT = 16
# ~7.5 MB of message: seconds of tokenising in the long prompts' thread, then too long for the context
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "a robot story, " * 500_000}], "max_tokens": 1}
# 64 tools of a few parameters each (~2,000 values): a prompt of ~5,000 tokens
TOOLS = [{"name": f"tool_{i}", "description": "Does a thing.",
          "parameters": {"type": "object", "properties": {f"arg_{j}": {"type": "string"} for j in range(3)}}}
         for i in range(64)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(make_checkpoint(max_position_embeddings=8192), NANOQWEN_MAX_MODEL_LEN="8192")
    with GunicornServer(env, tmp_path_factory.mktemp("many-tools") / "gunicorn.log") as srv:
        yield srv


def _chat(client: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
        tools=[{"type": "function", "function": tool} for tool in TOOLS])


def _responses(client: Any) -> Any:
    return client.responses.with_raw_response.create(
        model=MODEL, input="hi", max_output_tokens=16, store=False,
        tools=[{"type": "function", **tool, "strict": False} for tool in TOOLS])


@pytest.mark.parametrize("create", [_chat, _responses], ids=["chat", "responses"])
def test_requests_of_many_tools_sent_together_are_all_served(server: GunicornServer, create: Any) -> None:
    clients = [server.openai_client(timeout=300) for _ in range(CONCURRENT)]
    together = threading.Barrier(CONCURRENT)

    def send(client: Any) -> int:
        together.wait()
        try:
            return create(client).status_code
        except Exception as exc:  # an APIStatusError: its status, to see all of them
            return getattr(exc, "status_code", -1)

    with ThreadPoolExecutor(CONCURRENT + 1) as pool:
        long = pool.submit(post_chat, server, LONG)
        time.sleep(0.3)  # its body read, its parse and tokenising under way
        statuses = list(pool.map(send, clients))
        assert long.result().json()["error"]["code"] == "context_length_exceeded"
    assert statuses == [200] * CONCURRENT, statuses


def test_a_lenient_tools_patterns_past_their_bound_leave_its_calls_free(server: GunicornServer) -> None:
    """A Responses tool that omits `strict` is constrained under "auto" where a grammar can hold it (OpenAI: strict
    where it can be); past grammar.MAX_PATTERN_CHARS its calls are free, any JSON object, and it is served. Here for
    this module's 8,192-token context: the schema, in the prompt, is some 7,000 tokens (3,500 `\\S`, 66,500
    characters rewritten)."""
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "k": {"type": "string", "pattern": "\\S" * 3_500}}}}
    response = server.openai_client(timeout=300).responses.create(model=MODEL, input="hi", max_output_tokens=16,
                                                                  tools=[tool], tool_choice="auto")
    assert response.status in ("completed", "incomplete") and response.tools[0].strict is True, response
