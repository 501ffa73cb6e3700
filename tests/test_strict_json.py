"""nanoqwen.api.strict_json: the one home of a request's JSON rules, for its body and the JSON inside its strings."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from nanoqwen.api import strict_json
from nanoqwen.api.body import ParsedBody, parse_json
from nanoqwen.api.errors import APIError
from nanoqwen.api.responses_api import ITEMS
from nanoqwen.api.responses_schemas import parse_responses_request
from nanoqwen.api.schemas import FunctionCall, ToolCallMessage, parse_chat_request
from nanoqwen.api.strict_json import MAX_SEPARATORS, Budget, JSONError


@pytest.mark.parametrize("text, status", [
    ('{"a": 1e309}', 400), ('[-1e400]', 400), ('{"a": NaN}', 400), ('"\\ud800"', 400), ("[" * 3000 + "]" * 3000, 400),
    ("[" + "1," * (MAX_SEPARATORS + 1) + "1]", 413), ('{"a": "' + "," * (2 * MAX_SEPARATORS) + '"}', None),
], ids=["1e309", "-1e400", "nan", "surrogate", "deep", "too-many-values", "commas-in-a-string"])
def test_loads_refuses_what_a_request_may_not_hold(text: str, status: int | None) -> None:
    """1e309 parsed to inf (parse_constant sees only the literals NaN and Infinity)."""
    if status is None:
        assert strict_json.loads(text) == {"a": "," * (2 * MAX_SEPARATORS)}
        return
    with pytest.raises(JSONError) as info:
        strict_json.loads(text)
    assert info.value.status == status


@pytest.mark.parametrize("text, param", [('{"temperature": 1e309}', "temperature"), ('{"a": [0.5, -1e400]}', "a.[1]"),
                                         ("1e309", None)])
def test_a_float_out_of_range_is_refused_naming_its_field(text: str, param: str | None) -> None:
    """A parse_float refused it as "not valid JSON", param null (and made float-heavy bodies ~4x slower to parse)."""
    with pytest.raises(APIError) as info:
        parse_json(text)
    assert (info.value.status, info.value.param) == (400, param), str(info.value)
    assert "out of a float's range" in str(info.value)


def test_arguments_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validator parsed them, and templating (decoded_arguments) parsed them again."""
    calls = []
    loads = strict_json.loads
    monkeypatch.setattr(strict_json, "loads", lambda *args, **kw: calls.append(args) or loads(*args, **kw))
    call = FunctionCall(name="f", arguments='{"city": "Paris"}')
    assert call.decoded_arguments == {"city": "Paris"} and call.decoded_arguments == {"city": "Paris"}
    assert len(calls) == 1 and call.model_dump(exclude_none=True) == {"name": "f", "arguments": '{"city": "Paris"}'}


def test_the_tool_call_parser_imports_no_server() -> None:
    """It imported nanoqwen.api.body (flask, gevent, gunicorn) for one JSON helper."""
    code = "import sys, nanoqwen.api.tool_calls; print(sorted({'flask', 'gevent', 'gunicorn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("make", [
    lambda: FunctionCall(name="f", arguments="{}").model_copy(update={"arguments": '{"city": "Paris"}'}),
    lambda: FunctionCall.model_construct(name="f", arguments='{"city": "Paris"}'),
], ids=["model_copy", "model_construct"])
def test_arguments_the_validator_skipped_are_decoded(make: Callable[[], FunctionCall]) -> None:
    """decoded_arguments asserted the validator's Arguments: an AssertionError for a copy or a construct."""
    assert make().decoded_arguments == {"city": "Paris"}


def _conversation(*arguments: str, users: int = 1) -> dict[str, Any]:
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": a}}
             for i, a in enumerate(arguments)]
    answers = [{"role": "tool", "tool_call_id": call["id"], "content": "ok"} for call in calls]
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}] * users + [
        {"role": "assistant", "tool_calls": calls}, *answers]}


ARGUMENTS_40K = '{"a": [' + "1," * 40_000 + "1]}"


def _sent(body: dict[str, Any]) -> ParsedBody:
    """`body` as a client's: its values charged to the request's budget as the server parses it."""
    return parse_json(json.dumps(body))


@pytest.mark.parametrize("body", [_conversation(ARGUMENTS_40K, ARGUMENTS_40K),
                                  _conversation(ARGUMENTS_40K[:-1], ARGUMENTS_40K[:-1]),
                                  _conversation(ARGUMENTS_40K[:-2] + "1e309]}", ARGUMENTS_40K),
                                  _conversation(ARGUMENTS_40K, users=7_000)],
                         ids=["two-calls", "two-cut-short", "no-json-object", "body-and-call"])
def test_a_request_has_one_budget_of_values(body: dict[str, Any]) -> None:
    """The limit was per string: 64 calls' arguments of 65k values each fit in 8 MiB (4M values, seconds of loop);
    and past it the answer was a 400 without a code where the body's is a 413 request_too_large. Arguments taken as
    written (cut short, or no JSON object) count too: they escaped the budget, each parsed in full for nothing."""
    assert parse_chat_request(*_sent(_conversation(ARGUMENTS_40K))).messages  # each alone fits
    with pytest.raises(APIError) as info:
        parse_chat_request(*_sent(body))
    assert (info.value.status, info.value.code) == (413, "request_too_large"), str(info.value)
    assert str(info.value).startswith(strict_json.TOO_MANY_VALUES)


def _calls(*arguments: str) -> list[dict[str, Any]]:
    return [item for i, a in enumerate(arguments) for item in (
        {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": a},
        {"type": "function_call_output", "call_id": f"c{i}", "output": "ok"})]


def test_a_responses_body_has_one_budget_of_values() -> None:
    """A Responses body's calls share the body's budget, as a chat body's do."""
    assert parse_responses_request(*_sent({"input": _calls(ARGUMENTS_40K)})).input_items
    with pytest.raises(APIError) as info:
        parse_responses_request(*_sent({"input": _calls(ARGUMENTS_40K, ARGUMENTS_40K)}))
    assert (info.value.status, info.value.code) == (413, "request_too_large"), str(info.value)


def test_a_stored_history_is_not_a_body_and_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A continuation's history comes from the store (bounded there), not from the client: a long agent loop's calls
    may hold more values than a body, and its chat request is not refused for them. Each call's arguments are parsed
    once, where the history is validated, not again for each chat request built from it (truncation's candidates)."""
    calls = []
    loads = strict_json.loads
    monkeypatch.setattr(strict_json, "loads", lambda *args, **kw: calls.append(args) or loads(*args, **kw))
    items = ITEMS.validate_python(_calls(ARGUMENTS_40K, ARGUMENTS_40K))
    req = parse_responses_request({"input": "Hi"}, Budget())
    for _ in range(3):
        chat = req.to_chat(items)
        assert len(chat.messages) == 4 and chat.messages[0].tool_calls[0].to_template()["function"]["arguments"]
    assert len(calls) == 2


def test_arguments_that_are_no_json_object_reach_the_template_as_written() -> None:
    """A call cut short or malformed (the model's own, which this server answers too) was a 400 that stopped the
    conversation for good: OpenAI takes any arguments string."""
    for arguments in ('{"a": "\\ud800"}', '{"b": ', "[1]", '{"a": NaN}'):
        [call] = parse_chat_request(_conversation(arguments), Budget()).messages[1].tool_calls
        assert call.to_template()["function"]["arguments"] == arguments


def test_responses_call_arguments_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Responses call's to_template decoded them each time it was templated: once per truncation candidate."""
    calls = []
    loads = strict_json.loads
    monkeypatch.setattr(strict_json, "loads", lambda *args, **kw: calls.append(args) or loads(*args, **kw))
    call, cut = (ToolCallMessage.model_validate({"id": "c", "type": "function",
                                                 "function": {"name": "f", "arguments": a}})
                 for a in ('{"b": 1}', '{"b": '))
    for _ in range(3):
        assert call.to_template()["function"]["arguments"] == {"b": 1}
        assert cut.to_template()["function"]["arguments"] == '{"b": '
    assert len(calls) == 2


@pytest.mark.parametrize("text, count", [("1", 0), ("[]", 0), ("{}", 0), ('[1, [2, 3], {"a": [4, {"b": ","}]}]', 6),
                                         ('{"a": {"b": {}}, "c": [[], [1]]}', 5), ('{"a": 1, "a": {"b": 2}}', 2)])
def test_a_body_is_charged_the_separators_of_its_text_outside_strings(text: str, count: int) -> None:
    """Charged in the parse's walk (validate_body walked the body again to count them: 0.5-21 ms for 64k-65k values,
    profiles/RESULTS.md's gaps table), less any duplicate keys' (json.loads keeps the last)."""
    assert parse_json(text).budget.left == MAX_SEPARATORS - count
