"""The background responses (responses_background), in-process: a stream's events kept, the responses
generating at once, the streams whose events outlive them, how one that fails or is cut off ends in the store."""
from __future__ import annotations

import gc
import itertools
import json
import weakref
from collections.abc import Iterator
from functools import partial
from types import SimpleNamespace

import gevent
import gevent.event
import pytest

from nanoqwen.api.errors import APIError
from nanoqwen.api.responses import ToolParsing
from nanoqwen.api.responses_api import (
    Draft,
    PolledEvents,
    ResponseEvents,
    ResponsesService,
    _stored_inputs,
    echoed_tools,
)
from nanoqwen.api.responses_background import (
    KEPT_FINISHED,
    MAX_EVENT_BYTES,
    MAX_LAG_BYTES,
    MAX_RUNNING,
    Background,
    Run,
)
from nanoqwen.api.responses_schemas import parse_responses_request
from nanoqwen.api.responses_store import Inputs, ResponseStore, Stored
from nanoqwen.api.serving import ClientGone
from nanoqwen.api.sse import PROBE
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine.request import Event, SamplingParams, Usage
from responses_util import failed_stream


def _there() -> bool:
    return False


def _run(response_id: str = "resp_1", keeps_events: bool = True) -> Run:
    return Run(response_id, lambda: None, keeps_events)


def test_a_streams_events_are_kept_to_their_bound_and_followed_live() -> None:
    run = _run()
    frame = "x" * (MAX_EVENT_BYTES // 3)
    for _ in range(3):
        run.add_all([frame])
    assert (run.first, len(run.frames), run.size) == (0, 3, 3 * len(frame))
    run.add_all(["é"])  # counted as encoded: 2 bytes
    assert (run.first, len(run.frames), run.size) == (1, 3, 2 * len(frame) + 2)
    (dropped,) = run.follow(-1, _there, 0.01)  # starts before what is kept: told so, and nothing more
    assert _error(dropped)["sequence_number"] == 0 and "from sequence number 0 to 0" in _error(dropped)["message"]

    def later() -> None:
        run.add_all(["live"])
        gevent.sleep(0.02)
        run.add_all(["last"])
        run.end()

    gevent.spawn_later(0.01, later)
    assert list(run.follow(2, _there, 0.01)) == ["é".encode(), b"live", b"last"]
    assert list(run.follow(5, _there, 0.01)) == []  # ended: returns at once


def _error(frame: bytes) -> dict:
    name, data = frame.decode().split("\n", 1)
    event = json.loads(data.removeprefix("data: "))
    assert name == "event: error" and set(event) == {"type", "code", "message", "param", "sequence_number"}
    assert (event["type"], event["code"], event["param"]) == ("error", "events_dropped", None)
    return event


def _following(run: Run, after: int = -1) -> tuple[list[bytes], gevent.Greenlet]:
    """A follower of `run` attached (and caught up), reading into the list as the loop lets it."""
    got: list[bytes] = []
    follower = gevent.spawn(lambda: got.extend(run.follow(after, _there, 0.01)))
    gevent.sleep(0)
    return got, follower


def test_a_last_burst_over_the_lag_limit_reaches_a_follower_that_keeps_up() -> None:
    background = Background(ResponseStore())
    _begin(background.store, "resp_1")
    run = _run()
    got, follower = _following(run)
    burst = ["x" * (3 * MAX_EVENT_BYTES)] * 3 + ["y" * (MAX_EVENT_BYTES + 1)]  # `.done` events and the last
    background.start(run, _engine_paced([["delta"], burst]), lambda: None)
    follower.join(timeout=5)
    assert sum(map(len, burst)) > MAX_LAG_BYTES and [len(frame) for frame in got] == [5, *map(len, burst)]
    assert (run.first, len(run.frames), run._cursors) == (4, 1, set())  # its follower gone: back to the cap


def _engine_paced(events: list[list[str]]) -> Iterator[list[str]]:
    """Each event's frames as Serving.detached gives them: the loop runs while the engine computes the next."""
    for frames in events:
        yield frames
        gevent.sleep(0.001)


def test_a_follower_is_sent_one_frame_at_a_time_from_the_newest_end() -> None:
    run = _run()
    quarter = "x" * (MAX_EVENT_BYTES // 4)
    for frame in ("a", quarter, quarter, quarter):
        run.add_all([frame])
    stalled = run.follow(-1, _there, 0.01)
    assert next(stalled) == b"a"  # its client then reads no more: what it was not sent stays unsent
    run.add_all([quarter * 2])
    assert (run.first, [cursor.next for cursor in run._cursors]) == (1, [1])
    assert list(itertools.islice(stalled, 3)) == [quarter.encode()] * 3
    stalled.close()


def test_two_followers_at_different_places_each_get_the_rest_and_hold_back_only_the_unsent() -> None:
    run = _run()
    quarter = "x" * (MAX_EVENT_BYTES // 4)
    for _ in range(4):
        run.add_all([quarter])
    ahead, behind = run.follow(-1, _there, 0.01), run.follow(1, _there, 0.01)
    assert [len(next(ahead)) for _ in range(4)] == [len(quarter)] * 4 and len(next(behind)) == len(quarter)
    run.add_all([quarter] * 4)  # past the cap: the frames both were sent go, not those `behind` was not
    assert (run.first, len(run.frames)) == (3, 5)
    run.end()
    assert list(ahead) == [quarter.encode()] * 4 and list(behind) == [quarter.encode()] * 5
    assert (run.first, run._cursors, run.size) == (4, set(), MAX_EVENT_BYTES)


def test_a_follower_killed_while_waiting_or_closed_lets_go_of_its_frames() -> None:
    run = _run()
    half = "x" * (MAX_EVENT_BYTES // 2)
    for _ in range(2):
        run.add_all([half])
    closed = run.follow(-1, _there, 0.01)
    next(closed)
    got, waiting = _following(run)
    run.add_all([half, half])  # `closed` was not sent these: kept past the cap
    gevent.sleep(0.001)
    assert (run.first, len(run.frames), len(got)) == (1, 3, 4)
    waiting.kill()  # while it waits for more, as a worker kills a connection's greenlet
    assert len(run._cursors) == 1 and run.first == 1
    closed.close()  # as the server closes a response its client left
    assert (run._cursors, run.size, run.first) == (set(), MAX_EVENT_BYTES, 2)


def test_a_run_let_go_goes_back_to_the_cap_and_a_stalled_follower_gets_the_error_event() -> None:
    background = Background(ResponseStore())
    half = "x" * (MAX_EVENT_BYTES // 2)
    runs, stalled = [], []
    for i in range(KEPT_FINISHED + 2):
        _begin(background.store, f"resp_{i}")
        run = _run(f"resp_{i}")
        follower = run.follow(-1, _there, 0.01)
        run.add_all(["first"])
        next(follower)  # a client that took one event, then stopped reading
        background.start(run, iter([[half]] * 8), lambda: None)
        runs.append(run)
        stalled.append(follower)
    gevent.sleep(0.05)
    background.forget(runs[-1].id)  # deleted
    assert [run.id for run in runs if run.id not in background._finished] == ["resp_0", "resp_1", runs[-1].id]
    # let go, back to the cap: past their followers (each sent the first frame), which hold nothing back then
    assert [run.size for run in runs] == [0] * 2 + [8 * len(half)] * (KEPT_FINISHED - 1) + [0]
    (dropped,) = stalled[0]
    assert _error(dropped)["sequence_number"] == 1 and "from sequence number 1 to 8" in _error(dropped)["message"]
    assert len(list(stalled[2])) == 8  # one still kept: its follower sent the rest


def test_a_follower_lagging_past_the_hard_limit_gets_an_error_event_and_ends() -> None:
    run = _run()
    got, follower = _following(run)
    quarter = "x" * (MAX_EVENT_BYTES // 4)
    for _ in range(MAX_LAG_BYTES // len(quarter) + 3):  # no switch: its follower reads none of them
        run.add_all([quarter])
    # past MAX_LAG_BYTES behind at the 33rd: left behind, it holds nothing back, back to the cap at once
    assert (run.size, run.first) == (MAX_EVENT_BYTES, 31)
    run.end()
    follower.join(timeout=5)
    (error,) = got
    assert _error(error)["sequence_number"] == 0 and "from sequence number 0 to 30" in _error(error)["message"]
    assert run._cursors == set()


def test_a_follower_left_behind_holds_no_frame_back_for_itself_or_the_others() -> None:
    """A follower past MAX_LAG_BYTES behind whose client reads nothing more (its greenlet blocked writing one frame,
    as a real socket's does) will be sent only the error event: the run goes back to the cap at once, and a follower
    keeping up still gets every frame; let go, the run keeps none for it."""
    run = _run()
    stalled = run.follow(-1, _there, 0.01)
    run.add_all(["first"])
    assert next(stalled) == b"first"  # then blocked in its write
    got, keeping_up = _following(run, after=0)
    quarter = "x" * (MAX_EVENT_BYTES // 4)
    frames = MAX_LAG_BYTES // len(quarter) + 2
    for i in range(frames):
        run.add_all([quarter])
        gevent.sleep(0)  # the follower keeping up sends each
        assert run.size <= (MAX_LAG_BYTES if i < frames - 2 else MAX_EVENT_BYTES), i  # left behind at frames - 2
    assert run.first > 1 and len(got) == frames
    run.release()
    run.end()
    keeping_up.join(timeout=5)
    assert got == [quarter.encode()] * frames and (len(run.frames), run.size) == (0, 0)
    (error,) = stalled
    assert _error(error)["sequence_number"] == 1


def test_a_follower_gone_stops_following_and_a_poll_not_kept_keeps_nothing() -> None:
    """A follower whose client's end of stream came while nothing new did is probed (once: client_probe says so
    once), and stops once its client is gone."""
    run = _run()
    run.add_all(["a"])
    states = iter([False, True, False, None])

    def probe() -> bool:
        if (state := next(states)) is None:
            raise ClientGone
        return state

    assert list(run.follow(-1, probe, 0.01)) == [b"a", PROBE.encode()]  # then polls with nothing new
    unkept = _run(keeps_events=False)
    unkept.add_all(["a"])
    assert (len(unkept.frames), unkept.size) == (0, 0)


def _blocked(release: gevent.event.Event) -> Iterator[list[str]]:
    yield ["frame"]
    release.wait()


def test_past_max_running_a_429_and_ended_streams_events_bounded() -> None:
    background = Background(ResponseStore())
    release = gevent.event.Event()
    ended: list[str] = []
    for i in range(MAX_RUNNING):
        _begin(background.store, f"resp_{i}")
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
        _begin(background.store, f"resp_{i}")
        background.start(_run(f"resp_{i}"), iter(()), lambda: None)
    gevent.sleep(0.05)
    assert len(background._finished) == KEPT_FINISHED and background.events(f"resp_{MAX_RUNNING - 1}") is None
    assert background.events(f"resp_{MAX_RUNNING}") is not None
    assert background.events(f"resp_{MAX_RUNNING + 1}") is not None
    background.forget(f"resp_{MAX_RUNNING}")
    assert background.events(f"resp_{MAX_RUNNING}") is None


def test_an_ended_run_lets_go_of_what_only_a_running_one_needs() -> None:
    store = ResponseStore()
    background = Background(store)

    class Held:  # stands for its ResponseEvents and Batch: the response, its request, its history
        def item_ids(self) -> set[str]:
            return {"msg_1"}

    held = Held()
    run = Run("resp_h", partial(setattr, held, "aborted", True), True)
    assert store.begin({"id": run.id, "background": True}, Inputs(), output_ids=held.item_ids)
    background.start(run, iter([["frame"]]), lambda: store.end(run.id))
    assert store.running_holder("msg_1") == run.id
    gone = weakref.ref(held)
    del held
    gevent.sleep(0.01)
    gc.collect()
    assert gone() is None and store.running_holder("msg_1") is None


def test_a_stream_deleted_while_it_generates_is_not_kept_once_it_ends() -> None:
    background = Background(ResponseStore())
    release = gevent.event.Event()
    for response_id in ("resp_deleted", "resp_kept"):
        _begin(background.store, response_id)
        background.start(_run(response_id), _blocked(release), lambda: None)
    gevent.sleep(0)
    assert background.store.delete("resp_deleted")  # as ResponsesService.delete does
    background.forget("resp_deleted")
    release.set()
    gevent.sleep(0.01)
    assert background.events("resp_deleted") is None and list(background._finished) == ["resp_kept"]


def _begin(store: ResponseStore, response_id: str) -> None:
    assert store.begin({"id": response_id, "background": True}, Inputs())


def test_cancelling_aborts_and_waits_for_the_end() -> None:
    background = Background(ResponseStore())
    release = gevent.event.Event()
    run = Run("resp_c", release.set, False)
    background.start(run, _blocked(release), lambda: None)
    gevent.sleep(0)
    background.cancel("resp_c")
    assert run.ended.is_set() and background._running == {}
    release.clear()
    background.cancel("resp_c")  # ended: nothing to abort
    assert not release.is_set()


def _failing(events: ResponseEvents) -> list[dict]:
    """The events of a response whose engine failed mid-answer, its text partly held by the tool parser."""
    return failed_stream(events, [Event(text="Par", token_ids=[1]), Event(text="is.\n", token_ids=[2])],
                         "internal error during generation")


def test_a_background_response_that_fails_is_kept_failed_and_one_cut_off_is_let_go() -> None:
    """Kept with its output so far (it had only the items done: none here), that a stream failing the same way
    sends, the held text too."""
    store = ResponseStore()
    service = ResponsesService(SimpleNamespace())
    service.store = store
    failing = _begun(store)
    events = PolledEvents(failing, ToolParsing(enabled=True))
    _failing(events)
    service._ended(failing, events)
    stored = store.get(failing.id)
    assert isinstance(stored, Stored) and stored.background and store._running == {}
    response = json.loads(stored.body)
    assert (response["status"], response["error"]["message"]) == ("failed", "internal error during generation")
    (message,) = response["output"]
    assert (message["status"], message["content"][0]["text"]) == ("incomplete", "Paris.\n")
    streamed = _failing(ResponseEvents(_begun(ResponseStore()), ToolParsing(enabled=True)))[-1]["response"]
    assert [{**item, "id": ""} for item in streamed["output"]] == [{**message, "id": ""}]
    cut = _begun(store)  # its greenlet killed before any end (a worker exiting)
    service._ended(cut, ResponseEvents(cut, ToolParsing()))
    assert store.get(cut.id) is None and store._running == {}


def test_a_failed_response_the_store_refuses_still_ends_there(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResponseStore()
    service = ResponsesService(SimpleNamespace())
    service.store = store
    failing = _begun(store)
    events = ResponseEvents(failing, ToolParsing())
    events.failure("internal error during generation")

    def refused(*args: object) -> bytes:
        raise MemoryError

    monkeypatch.setattr(store, "put", refused)
    with pytest.raises(MemoryError):
        service._ended(failing, events)
    assert store._running == {}


def test_resuming_before_the_events_kept_is_a_400_naming_starting_after() -> None:
    service = ResponsesService(SimpleNamespace())
    _begin(service.store, "resp_r")
    run = _run("resp_r")
    for frame in ("x" * (MAX_EVENT_BYTES // 2),) * 3:
        run.add_all([frame])
    service.background._running[run.id] = run
    with pytest.raises(APIError) as exc:
        service.retrieve(run.id, {"stream": "true"}, {})
    assert (exc.value.status, exc.value.param) == (400, "starting_after")
    assert "before sequence number 1 are no longer kept" in exc.value.message


def _begun(store: ResponseStore) -> Draft:
    req = parse_responses_request({"input": "Hi", "background": True}, Budget())
    draft = Draft(req, SamplingParams(), "m", None, store, None, _stored_inputs(req), echoed_tools(req))
    draft.begun = store.begin(draft.created(), draft.inputs) is not None
    assert draft.begun and store.get(draft.id).background
    return draft


def test_resuming_past_the_newest_event_waits_for_it_and_past_an_ended_runs_last_is_a_400() -> None:
    """A follower ahead of the events kept sent older ones again (indexed from the front), then an IndexError."""
    run = _run("resp_p")
    run.add_all(["e0", "e1", "e2"])
    got, follower = _following(run, after=3)  # waits for sequence number 4
    run.add_all(["e3", "e4"])
    run.end()
    follower.join(timeout=5)
    assert got == [b"e4"]
    service = ResponsesService(SimpleNamespace())
    _begin(service.store, run.id)
    service.background._running[run.id] = run
    with pytest.raises(APIError) as exc:
        service.retrieve(run.id, {"stream": "true", "starting_after": "5"}, {})
    assert (exc.value.status, exc.value.param) == (400, "starting_after")


def test_a_background_response_is_queued_until_admitted_and_one_cancelled_before_any_output_has_none() -> None:
    store = ResponseStore()
    draft = _begun(store)
    assert json.loads(store.get(draft.id).body)["status"] == "queued"
    events = ResponseEvents(draft, ToolParsing())
    opening = events.opening()
    assert [(e["type"], e["response"]["status"]) for e in opening] == [
        ("response.created", "queued"), ("response.queued", "queued")]
    (started,) = events.chunks(Event(admitted=True))
    assert (started["type"], started["sequence_number"], started["response"]["status"]) == (
        "response.in_progress", 2, "in_progress")
    assert json.loads(store.get(draft.id).body) == started["response"]  # GET says it from now on
    assert events.chunks(Event(finish_reason="abort")) == []
    assert events.chunks(Event(usage=Usage(5, 0))) == []  # no empty message, and no event of its own
    assert (events.response["status"], events.response["output"]) == ("cancelled", [])
    assert json.loads(store.get(draft.id).body) == events.response


def test_a_run_let_go_keeps_only_the_frames_its_followers_have_not_sent() -> None:
    """Once let go (ended, no longer kept) a run held up to the cap of frames every follower had sent."""
    run = _run()
    frame = "x" * 1000
    for _ in range(4):
        run.add_all([frame])
    follower = run.follow(-1, _there, 0.01)
    next(follower)
    run.release()
    run.end()
    assert (run.first, run.size) == (1, 3 * len(frame))
    next(follower)
    assert (run.first, run.size) == (2, 2 * len(frame))
    assert len(list(follower)) == 2 and (len(run.frames), run.size) == (0, 0)
    unfollowed = _run()
    unfollowed.add_all([frame])
    unfollowed.release()
    assert (len(unfollowed.frames), unfollowed.size) == (0, 0)


def test_a_run_let_go_with_a_follower_waiting_past_its_newest_frame_ends_it() -> None:
    """starting_after may be ahead of a run still generating: letting the run go must not trim past its frames."""
    run = _run()
    run.add_all(["e0", "e1"])
    got, follower = _following(run, after=1000)
    run.release()
    run.end()
    follower.join(timeout=5)
    assert follower.dead and got == [] and (len(run.frames), run.size) == (0, 0)
