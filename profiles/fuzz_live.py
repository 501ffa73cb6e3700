"""The live ids profiles/fuzz_openapi.py puts in its cases' `{response_id}` and `{completion_id}` (requests alone, no
schemathesis: tests/test_fuzz_live.py runs it without the fuzzer's extra)."""
from __future__ import annotations

import json
from typing import Any

import requests

from chat_http import MODEL  # the tests' served model name (tests/ is on the path of both users)


class LiveResponses:
    """Ids of stored objects that exist, for the `{response_id}` or `{completion_id}` of every other case (a random
    one is only ever a 404, which the query parameters' checks come before): a new one each time (a case may delete
    or cancel it). Responses, in turn: a background stream left running (its events kept: GET's
    `stream=true&starting_after=N` follows it), a background response polled, and a stored one answered whole. Chat
    completions (`store: true`), in turn: one answered whole, one streamed (read to its end, when it is stored), and
    one of two choices with metadata."""

    KINDS = ({"background": True, "stream": True}, {"background": True}, {})
    CHAT_KINDS = ({}, {"stream": True}, {"n": 2, "metadata": {"fuzz": "live"}})

    def __init__(self, url: str, session: requests.Session) -> None:
        self.url, self.session = url, session
        self.cases = self.made = self.chats_made = 0

    def substitute(self, case: Any) -> str | None:
        """Every other case's id made fresh; what went wrong making it (the case keeps its random id then: a
        failure here must not end the fuzzing run)."""
        parameters = case.path_parameters or {}
        name = next((name for name in ("response_id", "completion_id") if name in parameters), None)
        if name is not None:
            self.cases += 1
            if self.cases % 2:
                try:
                    parameters[name] = self.fresh() if name == "response_id" else self.fresh_completion()
                # ValueError: not JSON, or JSON that is not an object; KeyError: no id
                except (requests.RequestException, ValueError, KeyError) as exc:
                    return f"making a {name[:-3]} for the case failed: {exc!r}"
        return None

    def fresh(self) -> str:
        kind = self.KINDS[self.made % len(self.KINDS)]
        self.made += 1
        body = {"input": "Hello there", "max_output_tokens": 16, **kind}
        with self.session.post(f"{self.url}/v1/responses", json=body, stream=True, timeout=60) as answer:
            answer.raise_for_status()
            if kind.get("stream"):  # the id from response.created; then the stream is left, the run goes on
                return _object(_object(_first_data(answer))["response"])["id"]
            return _object(answer.json())["id"]

    def fresh_completion(self) -> str:
        kind = self.CHAT_KINDS[self.chats_made % len(self.CHAT_KINDS)]
        self.chats_made += 1
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
                "store": True, **kind}
        with self.session.post(f"{self.url}/v1/chat/completions", json=body, stream=True, timeout=60) as answer:
            answer.raise_for_status()
            if kind.get("stream"):  # stored once the stream has ended: read to [DONE]
                completion_id = _object(_first_data(answer))["id"]
                for _ in answer.iter_lines():
                    pass
                return completion_id
            return _object(answer.json())["id"]


def _first_data(answer: requests.Response) -> Any:
    line = next((line for line in answer.iter_lines() if line.startswith(b"data: ")), None)
    if line is None:
        raise ValueError("a stream's 200 ended without a data: line")
    return json.loads(line[6:])


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"JSON that is not an object: {value!r:.80}")
    return value
