"""A large body's JSON parse and its validation run in the offload threads, never on the event loop's: 8 MiB of
JSON took ~130 ms to parse and 16,000 messages ~60 ms to validate there, holding every stream and /health."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpoints import make_checkpoint
from engine_util import load_engine
from nanoqwen.api import chat, completions, responses_api, serving
from nanoqwen.api.app import create_app
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.schemas import ChatPrompt
from nanoqwen.engine import Engine, EngineConfig

MESSAGES = [{"role": "user", "content": "hi"}] * 5000  # ~10,000 values, 125 kB
PAD = "x" * (1 << 17)  # one string: many characters, few values


@pytest.fixture()
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """The thread each parse and validation ran on, by function, recorded while the app serves."""
    seen: dict[str, list[int]] = {}

    def recorded(module: Any, name: str) -> None:
        fn: Callable[..., Any] = getattr(module, name)

        def wrapper(*args: Any) -> Any:
            seen.setdefault(name, []).append(threading.get_ident())
            return fn(*args)

        monkeypatch.setattr(module, name, wrapper)

    recorded(serving, "parse_json")
    recorded(chat, "parse_chat_request")
    recorded(completions, "parse_completion_request")
    recorded(responses_api, "parse_responses_request")
    recorded(responses_api, "parse_count_request")
    yield seen


@pytest.mark.parametrize(("path", "body", "validation"), [
    ("/v1/chat/completions", {"messages": MESSAGES}, "parse_chat_request"),
    ("/v1/completions", {"prompt": [100] * 20000}, "parse_completion_request"),
    ("/v1/responses", {"input": MESSAGES}, "parse_responses_request"),
    ("/v1/responses/input_tokens", {"input": MESSAGES}, "parse_count_request"),
])
def test_a_body_of_many_values_is_parsed_and_validated_off_the_loop(
        tmp_path: Path, threads: dict[str, list[int]], path: str, body: dict[str, Any], validation: str) -> None:
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    small = {k: v[:1] for k, v in body.items()}
    assert client.post(path, json=small).status_code == 503  # validated, then the model is still loading
    assert client.post(path, json=body).status_code == 503
    loop = threading.get_ident()
    assert threads["parse_json"][0] == loop and threads[validation][0] == loop  # a small body: no hand-off
    assert threads["parse_json"][1] != loop and threads[validation][1] != loop


def test_a_long_body_of_few_values_is_parsed_off_the_loop_and_validated_on_it(
        tmp_path: Path, threads: dict[str, list[int]]) -> None:
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PAD}]}).status_code == 503
    loop = threading.get_ident()
    assert len(threads["parse_json"]) == 1 and loop not in threads["parse_json"]
    assert threads["parse_chat_request"] == [loop]


def test_an_everyday_body_is_parsed_and_validated_on_the_loop(tmp_path: Path, threads: dict[str, list[int]]) -> None:
    """1,100 token ids validate in ~0.1 ms: handed to the long prompts' thread they would queue behind long prompts
    (or get its 503 when it is full)."""
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    assert client.post("/v1/completions", json={"prompt": [100] * 1100}).status_code == 503
    loop = threading.get_ident()
    assert threads["parse_json"] == [loop] and threads["parse_completion_request"] == [loop]


def test_a_large_requests_template_inputs_are_made_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its messages and tools turned into the template's inputs, and its tools dumped to weigh the prompt, in the
    threads (16,000 messages: ~35 ms; 8 MiB of tools: ~25 ms on the loop)."""
    seen: list[int] = []
    for name in ("template_messages", "template_tools"):
        fn = getattr(ChatPrompt, name)
        monkeypatch.setattr(ChatPrompt, name, lambda self, fn=fn: (seen.append(threading.get_ident()), fn(self))[1])
    engine = load_engine(make_checkpoint())
    try:
        client = create_app(engine, ServerConfig()).test_client()
        tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d"}} for i in range(1200)]
        answer = client.post("/v1/chat/completions", json={"messages": MESSAGES[:1200], "tools": tools})
    finally:
        engine.shutdown()
    assert answer.status_code == 400 and answer.json["error"]["code"] == "context_length_exceeded"
    assert len(seen) >= 3 and threading.get_ident() not in seen
