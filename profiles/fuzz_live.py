"""The live responses profiles/fuzz_openapi.py puts in its cases' `{response_id}` (requests alone, no schemathesis:
tests/test_fuzz_live.py runs it without the fuzzer's extra)."""
from __future__ import annotations

import json
from typing import Any

import requests


class LiveResponses:
    """Ids of responses that exist, for the `{response_id}` of every other case (a random one is only ever a 404, which
    the query parameters' checks come before): a new one each time (a case may delete or cancel it), in turn a
    background stream left running (its events kept: GET's `stream=true&starting_after=N` follows it), a background
    response polled, and a stored one answered whole."""

    KINDS = ({"background": True, "stream": True}, {"background": True}, {})

    def __init__(self, url: str, session: requests.Session) -> None:
        self.url, self.session = url, session
        self.cases = self.made = 0

    def substitute(self, case: Any) -> str | None:
        """Every other case's id made fresh; what went wrong making it (the case keeps its random id then: a
        failure here must not end the fuzzing run)."""
        if "response_id" in (case.path_parameters or {}):
            self.cases += 1
            if self.cases % 2:
                try:
                    case.path_parameters["response_id"] = self.fresh()
                # ValueError: not JSON, or JSON that is not an object; KeyError: no id
                except (requests.RequestException, ValueError, KeyError) as exc:
                    return f"making a response for the case failed: {exc!r}"
        return None

    def fresh(self) -> str:
        kind = self.KINDS[self.made % len(self.KINDS)]
        self.made += 1
        body = {"input": "Hello there", "max_output_tokens": 16, **kind}
        with self.session.post(f"{self.url}/v1/responses", json=body, stream=True, timeout=60) as answer:
            answer.raise_for_status()
            if kind.get("stream"):  # the id from response.created; then the stream is left, the run goes on
                line = next((line for line in answer.iter_lines() if line.startswith(b"data: ")), None)
                if line is None:
                    raise ValueError("a background stream's 200 ended without a data: line")
                return _object(_object(json.loads(line[6:]))["response"])["id"]
            return _object(answer.json())["id"]


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"JSON that is not an object: {value!r:.80}")
    return value
