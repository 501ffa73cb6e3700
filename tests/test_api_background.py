"""The background responses (responses_background), in-process: a stream's events kept, the responses
generating at once, the streams whose events outlive them, how one that fails or is cut off ends in the store."""
from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import gevent
import gevent.event
import pytest

from nanoqwen.api.encode import encode_text
from nanoqwen.api.errors import APIError
from nanoqwen.api.responses import ToolParsing
from nanoqwen.api.responses_api import Draft, ResponseEvents, ResponsesService, input_item_json
from nanoqwen.api.responses_background import KEPT_FINISHED, MAX_EVENT_BYTES, MAX_RUNNING, Background, Run
from nanoqwen.api.responses_schemas import parse_responses_request
from nanoqwen.api.responses_store import ResponseStore, Stored
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine.request import SamplingParams


def _run(response_id: str = "resp_1", keeps_events: bool = True) -> Run:
    return Run(response_id, lambda: None, keeps_events, set)


def test_a_streams_events_are_kept_to_their_bound_and_followed_live() -> None:
    run = _run()
    frame = "x" * (MAX_EVENT_BYTES // 3)
    for _ in range(3):
        run.add(frame)
    assert (run.first, len(run.frames), run.size) == (0, 3, 3 * len(frame))
    run.add("é")  # counted as encoded: 2 bytes
    assert (run.first, len(run.frames), run.size) == (1, 3, 2 * len(frame) + 2)
    assert list(run.follow(-1, lambda: False, 0.01)) == []  # fell behind what is kept: nothing more

    def later() -> None:
        run.add("live")
        gevent.sleep(0.02)
        run.add("last")
        run.end()

    gevent.spawn_later(0.01, later)
    assert list(run.follow(2, lambda: False, 0.01)) == ["é".encode(), b"live", b"last"]
    assert list(run.follow(5, lambda: False, 0.01)) == []  # ended: returns at once


def test_a_follower_gone_stops_following_and_a_poll_not_kept_keeps_nothing() -> None:
    run = _run()
    run.add("a")
    gone = iter([False, True])
    assert list(run.follow(-1, lambda: next(gone), 0.01)) == [b"a"]  # then two polls with nothing new
    unkept = _run(keeps_events=False)
    unkept.add("a")
    assert (len(unkept.frames), unkept.size) == (0, 0)


def _blocked(release: gevent.event.Event) -> Iterator[str]:
    yield "frame"
    release.wait()


def test_past_max_running_a_429_and_ended_streams_events_bounded() -> None:
    background = Background(ResponseStore())
    release = gevent.event.Event()
    ended: list[str] = []
    for i in range(MAX_RUNNING):
        background.start(_run(f"resp_{i}"), _blocked(release), lambda i=i: ended.append(f"resp_{i}"))
    with pytest.raises(APIError) as exc:
        background.check_room()
    assert (exc.value.status, exc.value.code) == (429, "rate_limit_exceeded")
    gevent.sleep(0)
    assert list(background.events("resp_0").frames) == [b"frame"]
    release.set()
    gevent.sleep(0.05)
    background.check_room()
    assert len(ended) == MAX_RUNNING and background._running == {}
    for i in range(MAX_RUNNING, MAX_RUNNING + KEPT_FINISHED):  # as many more end: the first ones' events go
        background.start(_run(f"resp_{i}"), iter(()), lambda: None)
    gevent.sleep(0.05)
    assert len(background._finished) == KEPT_FINISHED and background.events(f"resp_{MAX_RUNNING - 1}") is None
    assert background.events(f"resp_{MAX_RUNNING}") is not None
    assert background.events(f"resp_{MAX_RUNNING + 1}") is not None
    background.forget(f"resp_{MAX_RUNNING}")
    assert background.events(f"resp_{MAX_RUNNING}") is None


def test_cancelling_aborts_and_waits_for_the_end() -> None:
    background = Background(ResponseStore())
    release = gevent.event.Event()
    run = Run("resp_c", release.set, False, set)
    background.start(run, _blocked(release), lambda: None)
    gevent.sleep(0)
    background.cancel("resp_c")
    assert run.ended.is_set() and background._running == {}
    release.clear()
    background.cancel("resp_c")  # ended: nothing to abort
    assert not release.is_set()


def test_a_background_response_that_fails_is_kept_failed_and_one_cut_off_is_let_go() -> None:
    store = ResponseStore()
    service = ResponsesService(SimpleNamespace())
    service.store = store
    failing = _begun(store)
    events = ResponseEvents(failing, ToolParsing())
    events.opening()
    events.failure("internal error during generation")
    service._ended(failing, events)
    stored = store.get(failing.id)
    assert isinstance(stored, Stored) and stored.background and store._running == {}
    response = json.loads(stored.body)
    assert (response["status"], response["error"]["message"]) == ("failed", "internal error during generation")
    cut = _begun(store)  # its greenlet killed before any end (a worker exiting)
    service._ended(cut, ResponseEvents(cut, ToolParsing()))
    assert store.get(cut.id) is None and store._running == {}


def _begun(store: ResponseStore) -> Draft:
    req = parse_responses_request({"input": "Hi", "background": True}, Budget())
    inputs = [input_item_json(item) for item in req.input_items]
    draft = Draft(req, SamplingParams(), "m", None, store, inputs=inputs, input_bytes=encode_text(inputs).encode())
    draft.begun = store.begin(draft.in_progress(), draft.input_bytes)
    assert draft.begun and store.get(draft.id).background
    return draft
