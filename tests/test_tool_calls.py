"""The Hermes tool-call parser: every split of an answer into deltas gives the same content and calls,
and a call's arguments stream as they are decoded."""
from __future__ import annotations

import json
import random

import pytest

from nanoqwen.api.tool_calls import CLOSE, ToolCallParser, assemble

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
    # ...with the whitespace around them: an answer without calls is the model's text (the collected one is)
    ("Hm.\n\n<tool_call>\n{not json}\n</tool_call>\n\nOk.", "Hm.\n\n<tool_call>\n{not json}\n</tool_call>\n\nOk.", []),
    ('Hm.\n\n<tool_call>\n{"', 'Hm.\n\n<tool_call>\n{"', []),
    ("Hm.\n\n<tool_call>x</tool_call>\n\n" + WEATHER, "Hm.\n\n<tool_call>x</tool_call>",
     [("get_weather", {"city": "Paris", "unit": "°C"})]),
    ("a <tool_ca b", "a <tool_ca b", []),
    ("ends with <tool_c", "ends with <tool_c", []),
    ("x < y and x <= z <", "x < y and x <= z <", []),
    # `<` and a partial closing tag inside the arguments
    ('<tool_call>{"name": "cmp", "arguments": {"expr": "x < y", "tag": "</tool_c"}}</tool_call>', None,
     [("cmp", {"expr": "x < y", "tag": "</tool_c"})]),
    # not in Qwen3's order: judged, and sent whole, when the block closes
    ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', None, [("f", {"x": 1})]),
]


def _raw(parser: ToolCallParser, deltas: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments as sent)])."""
    content, pieces = "", []
    for delta in deltas:
        out = parser.feed(delta)
        content += out.content
        pieces += out.calls
    out = parser.finish()
    content += out.content
    calls = assemble(pieces + out.calls)
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)
    return content or None, [(c.name, c.arguments) for c in calls]


def _run(parser: ToolCallParser, deltas: list[str]) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = _raw(parser, deltas)
    return content, [(name, json.loads(arguments)) for name, arguments in calls]


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
    whole = _raw(ToolCallParser(), [answer])
    for deltas in _splits(answer, rng):
        assert _raw(ToolCallParser(), deltas) == whole, deltas  # the arguments' very text, too
    assert _run(ToolCallParser(), [answer]) == (content, calls)


@pytest.mark.parametrize("block", [
    '<tool_call>{"arguments": {"a": ' + "[" * 1500 + "]" * 1500 + '}, "name": "f"}</tool_call>',  # RecursionError
    '<tool_call>{"arguments": {"a": NaN}, "name": "f"}</tool_call>',  # sent on as `{"a": NaN}`, not JSON
    '<tool_call>{"arguments": {"a": 1}, "name": "f\\ud800"}</tool_call>',  # a name no answer can encode
    '<tool_call>{"name": "f\\udc00", "arguments": {"a": 1}}</tool_call>',
], ids=["deep", "nan", "surrogate-name-last", "surrogate-name-first"])
def test_a_block_that_is_not_strict_json_stays_content(block: str) -> None:
    """What the model writes is held to the request body's JSON rules (json.loads alone raised on the first)."""
    assert _raw(ToolCallParser(), [block]) == (block, [])


def test_streamed_arguments_are_sent_as_written() -> None:
    """A block in Qwen3's key order is a call once its header shows, its arguments unchecked (the documented
    choice: they are out before the object closes); the whole answer and every split of it agree."""
    block = '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'
    for deltas in _splits(block, random.Random(0)):
        assert _raw(ToolCallParser(), deltas) == (None, [("f", '{"a": NaN}')]), deltas


def test_arguments_are_a_json_object_string() -> None:
    (call,) = assemble(ToolCallParser().feed(WEATHER).calls)
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
    content, calls = content + out.content, assemble(calls + out.calls)
    assert content == "\n\nLet me check." and [c.name for c in calls] == ["get_weather", "get_time"]


def test_arguments_stream_as_they_are_decoded() -> None:
    """Token by token: the call's id and name as soon as they are known, then its arguments in many
    pieces, all before the block closes; the pieces make up the non-streamed arguments exactly."""
    arguments = json.dumps({"query": "a long question about the weather " * 4, "days": [1, 2, 3]})
    answer = f'Sure.\n<tool_call>\n{{"name": "search", "arguments": {arguments}}}\n</tool_call>'
    parser = ToolCallParser()
    events = []  # (pieces, whether the closing tag had been fed)
    fed = ""
    for i in range(0, len(answer), 3):
        fed += answer[i:i + 3]
        events.append((parser.feed(answer[i:i + 3]).calls, CLOSE in fed))
    events.append((parser.finish().calls, True))
    pieces = [(piece, closed) for calls, closed in events for piece in calls]
    assert pieces[0][0].name == "search" and pieces[0][0].id and not pieces[0][1]
    fragments = [piece.arguments for piece, _ in pieces[1:]]
    assert len(fragments) > 10 and all(not closed for _, closed in pieces)
    assert "".join(fragments) == arguments == assemble([p for p, _ in pieces])[0].arguments
    assert _raw(ToolCallParser(), [answer])[1] == [("search", arguments)]


@pytest.mark.parametrize("max_calls, constrained, called",
                         [(None, False, False), (None, True, False), (1, False, True)])
def test_a_second_call_cut_before_its_name_is_no_content(max_calls: int | None, constrained: bool,
                                                         called: bool) -> None:
    """Cut (a stop string, EOS, max_tokens) after `<tool_call>` but before the name of a call past the first: markup
    of a cut call, dropped (it was content), and the answer not "tool_calls" (`called`): its last call is not whole.
    Past max_calls the block was to be dropped whole, so the kept call is."""
    answer = WEATHER + '\n<tool_call>\n{"na'
    for deltas in _splits(answer, random.Random(2)):
        parser = ToolCallParser(max_calls, constrained)
        assert _raw(parser, deltas) == (None, [("get_weather", '{"city": "Paris", "unit": "°C"}')]), deltas
        assert parser.called is called


@pytest.mark.parametrize("constrained", [False, True])
def test_a_constrained_first_call_cut_before_its_name_is_no_content(constrained: bool) -> None:
    """A first call cut before its name, the answer's calls constrained (a strict tool under "auto"): the markup of a
    call cut short, dropped; the content is the text before it (it was the markup too). Unconstrained, it may be prose
    that spelled the tag: content, as written."""
    answer = 'Sure. <tool_call>\n{"na'
    for deltas in _splits(answer, random.Random(4)):
        parser = ToolCallParser(constrained=constrained)
        assert _raw(parser, deltas) == ("Sure." if constrained else answer, []), deltas
        assert not parser.called


def test_prose_that_spells_the_tag_after_a_call_stays_content() -> None:
    """Only a call's start (`{"name": "...`) after `<tool_call>` is a call cut short: prose that spells the tag after
    a whole call was dropped from the tag on, and the answer ended "stop" though its call is whole."""
    prose = "I called it above; the <tool_call> tag wraps each call."
    for deltas in _splits(WEATHER + "\n" + prose, random.Random(3)):
        parser = ToolCallParser()
        assert _raw(parser, deltas) == (prose, [("get_weather", '{"city": "Paris", "unit": "°C"}')]), deltas
        assert parser.called


def test_a_call_cut_short_keeps_its_arguments_so_far() -> None:
    """Cut by max_tokens inside the arguments: streamed pieces cannot be taken back, so the whole
    answer has the call too, with the arguments as far as they got (as OpenAI's may be)."""
    answer = '<tool_call>\n{"name": "f", "arguments": {"a": [1, "x<'
    for deltas in _splits(answer, random.Random(1)):
        assert _raw(ToolCallParser(), deltas) == (None, [("f", '{"a": [1, "x<')]), deltas
