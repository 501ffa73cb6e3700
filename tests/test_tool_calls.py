"""The Hermes tool-call parser: every split of an answer into deltas gives the same content and calls."""
from __future__ import annotations

import json
import random

import pytest

from nanoqwen.api.tool_calls import ToolCallParser

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "nested": {"a": [1, "}"]}}}\n</tool_call>'

# (answer, content, [(name, arguments)])
CASES = [
    ("Just an answer, no tools.\n", "Just an answer, no tools.\n", []),
    (WEATHER, None, [("get_weather", {"city": "Paris", "unit": "°C"})]),
    ("Let me check.\n\n" + WEATHER, "Let me check.", [("get_weather", {"city": "Paris", "unit": "°C"})]),
    (WEATHER + "\n" + TIME + "\n", None,
     [("get_weather", {"city": "Paris", "unit": "°C"}),
      ("get_time", {"tz": "Europe/Paris", "nested": {"a": [1, "}"]}})]),
    (WEATHER + "\nDone.", "Done.", [("get_weather", {"city": "Paris", "unit": "°C"})]),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', None, [("f", {})]),
    # malformed blocks stay content as the model wrote them
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>',
     '<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),  # cut off by max_tokens
    ("a <tool_ca b", "a <tool_ca b", []),
    ("ends with <tool_c", "ends with <tool_c", []),
    ("x < y and x <= z <", "x < y and x <= z <", []),
]


def _run(parser: ToolCallParser, deltas: list[str]) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = "", []
    for delta in deltas:
        out = parser.feed(delta)
        content += out.content
        calls += out.calls
    out = parser.finish()
    content += out.content
    calls += out.calls
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    return content or None, [(c.name, json.loads(c.arguments)) for c in calls]


def _splits(text: str, rng: random.Random) -> list[list[str]]:
    out = [[text], list(text)]  # whole, and one character at a time
    for cut in range(1, len(text)):  # every two-way split
        out.append([text[:cut], text[cut:]])
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


@pytest.mark.parametrize("answer, content, calls", CASES)
def test_every_split_gives_the_same_calls(answer: str, content: str | None, calls: list) -> None:
    rng = random.Random(answer)
    for deltas in _splits(answer, rng):
        assert _run(ToolCallParser(), deltas) == (content, calls), deltas


def test_arguments_are_a_json_object_string() -> None:
    (call,) = ToolCallParser().feed(WEATHER).calls
    assert call.to_json() == {"id": call.id, "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "°C"}'}}


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    for deltas in _splits(WEATHER + "\n" + TIME, random.Random(0)):
        assert _run(ToolCallParser(max_calls=1), deltas) == (None, [("get_weather", {"city": "Paris", "unit": "°C"})])


def test_calls_survive_the_engines_detokenisation() -> None:
    """<tool_call>/</tool_call> are not special tokens in Qwen3: with skip_special_tokens the
    engine's text pipeline (after the think block) still carries them, one token each."""
    from transformers import AutoTokenizer

    from checkpoints import make_checkpoint
    from nanoqwen.text import TextPipeline, TokenBytes

    tokenizer = AutoTokenizer.from_pretrained(make_checkpoint())
    answer = "<think>\nweather\n</think>\n\nLet me check.\n" + WEATHER + "\n" + TIME
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert ids.count(151657) == ids.count(151658) == 2
    pipeline, parser = TextPipeline(TokenBytes(tokenizer), [], skip_special_tokens=True), ToolCallParser()
    content, calls = "", []
    for token_id in [*ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]:
        _, text, _ = pipeline.add(token_id)
        out = parser.feed(text)
        content, calls = content + out.content, calls + out.calls
    out = parser.feed(pipeline.finish()[1]) + parser.finish()
    content, calls = content + out.content, calls + out.calls
    assert content == "\n\nLet me check." and [c.name for c in calls] == ["get_weather", "get_time"]
