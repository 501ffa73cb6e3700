"""The soak's background Responses traffic (`background: true`): creates, polls, resumed and abandoned followers,
cancels and DELETEs at every stage, continuations of runs in progress, bursts past the 32 generating at once; and
what must hold once a round's clients stop (`settle`): every run ended (GET says a terminal status, or 404 once
deleted), and room again for MAX_RUNNING runs.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from chat_http import MODEL
from nanoqwen.api.responses_background import MAX_RUNNING  # per worker
from soak_http import (
    ENDED,
    RESPONSES,
    Connection,
    Json,
    Reply,
    Tally,
    error_problem,
    hang_up,
    parse_event,
    request_bytes,
    response_problem,
    send,
    words,
)

TERMINAL = {"completed": "served", "incomplete": "served", "cancelled": "aborted", "failed": "failed"}
RUNNING = ("queued", "in_progress")  # in this order
STREAM_ENDS = (*ENDED, "response.failed")
FOLLOWER_S = 120  # a follower still reading past this has hung
ROOM_TOKENS = 256  # the room check's runs: still generating when the last is made (cancelled at once after)


def _json(reply: Reply) -> Json:
    return json.loads(reply.body)


def _events(conn: Connection) -> Iterator[Json]:
    """A Responses stream's events as they arrive."""
    buf = b""
    for chunk in conn.chunks():
        buf += chunk
        *blocks, buf = buf.split(b"\n\n")
        for block in blocks:
            yield parse_event(block.decode())


def _order_problem(events: list[Json], after: int) -> str | None:
    """None when the events are numbered on from `after` (-1: from response.created, never empty: the run's
    events are kept from its start, so at least response.created is there)."""
    if after == -1 and not events:
        return "a stream from the start ended without an event"
    numbers = [e["sequence_number"] for e in events]
    if numbers != list(range(after + 1, after + 1 + len(numbers))):
        return f"sequence numbers {numbers[:5]}... after {after}"
    if after == -1 and events and events[0]["type"] != "response.created":
        return f"a stream from the start opens with {events[0]['type']}"
    return None


@dataclass
class BackgroundSoak:
    port: int
    tally: Tally
    long_tokens: int

    def scenario(self, rng: random.Random) -> None:
        actions: list[tuple[float, Callable[[random.Random], None]]] = [
            (3, self.polled), (3, self.streamed), (4, self.resumed), (4, self.cancelled), (3, self.deleted),
            (2, self.continued), (1, self.burst), (2, self.crowd), (1, self.odd_queries)]
        weights, chosen = zip(*actions)
        rng.choices(chosen, weights)[0](rng)

    # -- requests ---------------------------------------------------------------------------

    def _body(self, rng: random.Random, stream: bool, long: bool = False) -> Json:
        body: Json = {"model": MODEL, "input": words(rng, rng.randint(1, 40)), "background": True, "stream": stream,
                      "max_output_tokens": self.long_tokens if long else rng.choice([16, 24, 64, self.long_tokens]),
                      "temperature": rng.choice([0, 0.8]), "reasoning": {"effort": "none"}}
        if rng.random() < 0.2:
            body |= {"include": ["message.output_text.logprobs"], "top_logprobs": rng.randint(0, 20)}
        return body

    def _created(self, reply: Reply, scenario: str) -> str | None:
        """A polled create's id (None when refused as it may be: a 429 with Retry-After, or a 503)."""
        if reply.status == 200:
            answer = _json(reply)
            problem = None if answer["status"] == "queued" and answer["background"] else f"created as {answer}"
            self._made(answer["id"])
            self.tally.record(scenario, 200, problem)
            return answer["id"]
        self.tally.record(scenario, reply.status, self._refusal_problem(reply))
        return None

    def _refusal_problem(self, reply: Reply) -> str | None:
        if reply.status == 429:
            if (problem := error_problem(reply)) is not None:
                return problem
            if reply.headers.get("retry-after") != "1" or _json(reply)["error"]["code"] != "rate_limit_exceeded":
                return f"429 without Retry-After or its code: {reply.headers} {reply.body[:200]!r}"
            return None
        if reply.status == 503:
            return error_problem(reply)
        return f"a background create got {reply.status}: {reply.body[:300]!r}"

    def _made(self, response_id: str) -> None:
        with self.tally.lock:
            self.tally.background.setdefault(response_id, False)

    def _create_polled(self, rng: random.Random, scenario: str, long: bool = False) -> str | None:
        body = self._body(rng, False, long)
        return self._created(send(self.port, request_bytes("POST", RESPONSES, json.dumps(body).encode())), scenario)

    def _open_stream(self, rng: random.Random, scenario: str,
                     long: bool = False) -> tuple[Connection, Iterator[Json], Json] | None:
        """A streamed create read to its response.created event: the connection, its events read on from there (a
        chunk may hold more than the first), and that event."""
        conn = Connection(self.port, timeout=FOLLOWER_S)
        try:
            conn.sock.sendall(request_bytes("POST", RESPONSES, json.dumps(self._body(rng, True, long)).encode()))
            status, headers = conn.head()
            if status != 200:
                reply = Reply(status, headers, conn.body(headers))
                conn.close()
                self.tally.record(scenario, status, self._refusal_problem(reply))
                return None
            if (first := next(events := _events(conn), None)) is None:
                raise ConnectionError("a streamed create's 200 ended before its response.created event")
            self._made(first["response"]["id"])
        except BaseException:
            conn.close()
            raise
        return conn, events, first

    def cancel(self, response_id: str) -> Reply:
        return send(self.port, request_bytes("POST", f"{RESPONSES}/{response_id}/cancel"))

    def delete(self, response_id: str) -> Reply:
        """DELETE, and the response marked deleted once it is (a 404 after is then its due)."""
        reply = send(self.port, request_bytes("DELETE", f"{RESPONSES}/{response_id}"))
        if reply.status == 200:
            with self.tally.lock:
                self.tally.background[response_id] = True
        return reply

    def get(self, response_id: str) -> Reply:
        return send(self.port, request_bytes("GET", f"{RESPONSES}/{response_id}"))

    def status(self, response_id: str) -> str | None:
        """GET's status of the response, None once deleted (404)."""
        reply = self.get(response_id)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise AssertionError(f"GET {response_id}: {reply.status} {reply.body[:200]!r}")
        return _json(reply)["status"]

    def wait_ended(self, response_id: str, timeout: float = FOLLOWER_S) -> str | None:
        """Polls until the response has a terminal status (None: deleted); the last status seen after `timeout`."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (status := self.status(response_id)) not in TERMINAL and status is not None:
            if seen and RUNNING.index(seen[-1]) > RUNNING.index(status):
                self.tally.record("bg-poll", 200, f"{response_id} went {seen[-1]} -> {status}", generates=False)
            seen.append(status)
            if time.monotonic() > deadline:
                return status
            time.sleep(0.05)
        return status

    def follow(self, response_id: str, after: int | None, rng: random.Random, scenario: str,
               read: str = "whole", may_be_deleted: bool = False) -> None:
        """GET ?stream=true[&starting_after=N]: read whole, slowly, or hung up on after a few events; a 404 only
        where the scenario deletes the run (`may_be_deleted`)."""
        query = "stream=true" + ("" if after is None else f"&starting_after={after}")
        conn = Connection(self.port, timeout=FOLLOWER_S, rcvbuf=4096 if read == "slow" else None)
        try:
            conn.sock.sendall(request_bytes("GET", f"{RESPONSES}/{response_id}?{query}"))
            self._read_follower(conn, response_id, -1 if after is None else after, rng, scenario, read,
                                may_be_deleted)
        finally:
            conn.close()

    def _read_follower(self, conn: Connection, response_id: str, after: int, rng: random.Random, scenario: str,
                       read: str, may_be_deleted: bool) -> None:
        status, headers = conn.head()
        if status != 200:
            reply = Reply(status, headers, conn.body(headers))
            self.tally.record(scenario, status,
                              self._follow_refusal_problem(reply, response_id, after, may_be_deleted), generates=False)
            return
        events: list[Json] = []
        for event in _events(conn):
            events.append(event)
            if read == "slow" and len(events) == 1:
                time.sleep(rng.uniform(0.5, 3))
            if read == "hang-up" and len(events) >= rng.randint(1, 20):
                hang_up(conn.sock, rng)
                self.tally.record(scenario, 0, _order_problem(events, after), generates=False)
                return
        self.tally.record(scenario, 200, self._stream_problem(events, after, response_id), generates=False)

    def _follow_refusal_problem(self, reply: Reply, response_id: str, after: int, may_be_deleted: bool) -> str | None:
        """A streamed run's follower's refusal, as it may be: 404 once deleted; 400 naming starting_after (before
        the events kept, or past an ended run's last) or stream (its events no longer kept: never while it runs)."""
        if (problem := error_problem(reply)) is not None:
            return problem
        param = _json(reply)["error"]["param"]
        if param == "stream" and (status := self.status(response_id)) in RUNNING:
            return f"a follower of {response_id}, {status}, told its events are not kept: {reply.body[:300]!r}"
        if (reply.status == 404 and may_be_deleted) or (reply.status == 400 and param in ("starting_after", "stream")):
            return None
        return f"a follower of {response_id} after {after} got {reply.status}: {reply.body[:300]!r}"

    def _stream_problem(self, events: list[Json], after: int, response_id: str) -> str | None:
        """A stream read whole: numbered on from `after`, ending at the run's end event or the error event of a
        follower left behind; or, cancelled or deleted (no event of their own), at its items' `.done` events."""
        if (problem := _order_problem(events, after)) is not None:
            return problem
        last = events[-1]["type"] if events else None
        if last in STREAM_ENDS or (last == "error" and events[-1]["code"] == "events_dropped"):
            return None
        if (status := self.wait_ended(response_id)) in ("cancelled", None):  # the events ended with the run
            return None
        if not events and after >= 0 and status in TERMINAL:  # starting_after at or past its last event
            return None
        return f"the stream of {response_id} after {after} ended at {last} ({len(events)} events), GET: {status}"

    def _ended_as(self, response_id: str, scenario: str) -> str | None:
        """Polled to its end: the status counted once `settle` reads it."""
        status = self.wait_ended(response_id)
        problem = None if status in TERMINAL or status is None else f"{response_id} still {status}"
        self.tally.record(scenario, 200, problem, generates=False)
        return status

    # -- scenarios ----------------------------------------------------------------------------

    def polled(self, rng: random.Random) -> None:
        """Created, then polled until it ends."""
        if (response_id := self._create_polled(rng, "bg-create")) is not None:
            self._ended_as(response_id, "bg-poll")

    def streamed(self, rng: random.Random) -> None:
        """A streamed create read whole, slowly, or hung up on mid-stream (the run goes on)."""
        opened = self._open_stream(rng, "bg-stream")
        if opened is None:
            return
        conn, rest, created = opened
        response_id = created["response"]["id"]
        try:
            read = rng.choice(["whole", "slow", "hang-up"])
            if read == "slow":
                time.sleep(rng.uniform(0.5, 3))
            events = [created]
            for event in rest:
                events.append(event)
                if read == "hang-up" and len(events) >= rng.randint(2, 30):
                    hang_up(conn.sock, rng)
                    self.tally.record("bg-stream", 0, _order_problem(events, -1))
                    return
            self.tally.record("bg-stream", 200, self._stream_problem(events, -1, response_id))
        finally:
            conn.close()

    def resumed(self, rng: random.Random) -> None:
        """A streamed create left at once, then followed from a random point: from the start, a few events in,
        past its newest event while it generates, or far past its end once ended."""
        opened = self._open_stream(rng, "bg-stream", long=rng.random() < 0.5)
        if opened is None:
            return
        conn, _, created = opened
        response_id = created["response"]["id"]
        hang_up(conn.sock, rng)
        self.tally.record("bg-stream", 0)
        where = rng.choice(["start", "few", "ahead", "far-ended"])
        after = {"start": None, "few": rng.randint(0, 8), "ahead": rng.randint(20, 400), "far-ended": 100000}[where]
        if where == "far-ended":
            self.wait_ended(response_id)
        self.follow(response_id, after, rng, f"bg-follow-{where}", rng.choice(["whole", "whole", "slow", "hang-up"]))

    def _stage(self, rng: random.Random, response_id: str) -> str:
        """Waits for a random stage of the run: none (queued, perhaps), a while (in progress), its end."""
        stage = rng.choice(["at-once", "running", "ended"])
        if stage == "running":
            time.sleep(rng.uniform(0.05, 1))
        elif stage == "ended":
            self.wait_ended(response_id)
        return stage

    def _thread(self, scenario: str, generates: bool, target: Callable[..., None], *args: object) -> threading.Thread:
        """`target(*args)` started on a thread of its own, whose failure is recorded as the client threads' are
        (a timeout included: nothing read for FOLLOWER_S, a hang)."""
        def run() -> None:
            try:
                target(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of the server's side is a finding
                self.tally.record(scenario, 0, f"client failed: {exc!r}", generates=generates)

        thread = threading.Thread(target=run, daemon=True)  # a hung one must not keep the soak from exiting
        thread.start()
        return thread

    @contextmanager
    def _followed_run(self, rng: random.Random, scenario: str, may_be_deleted: bool) -> Iterator[str | None]:
        """A run to cancel or delete (None: its create failed), perhaps with a follower reading a streamed run's
        events meanwhile, on a thread of its own: joined when the block ends, however it ends."""
        if (run := self._run(rng, f"{scenario}-create")) is None:
            yield None
            return
        response_id, streamed = run
        follower = None
        if streamed and rng.random() >= 0.5:
            follower = self._thread("bg-follow-during", False, self.follow, response_id, None,
                                    random.Random(rng.random()), "bg-follow-during", "whole", may_be_deleted)
        try:
            yield response_id
        finally:
            self._joined(follower, scenario)

    def _joined(self, follower: threading.Thread | None, scenario: str) -> None:
        if follower is not None:
            follower.join(FOLLOWER_S + 10)
            if follower.is_alive():
                self.tally.record(scenario, 0, "a follower did not return once the run ended", generates=False)

    def _run(self, rng: random.Random, scenario: str) -> tuple[str, bool] | None:
        """A run to cancel or delete: polled or streamed (its create's client gone at once); long or not."""
        long = rng.random() < 0.7
        if rng.random() < 0.5:
            response_id = self._create_polled(rng, scenario, long)
            return None if response_id is None else (response_id, False)
        opened = self._open_stream(rng, scenario, long)
        if opened is None:
            return None
        opened[0].close()
        self.tally.record(scenario, 0)
        return opened[2]["response"]["id"], True

    def cancelled(self, rng: random.Random) -> None:
        """Cancelled at a random stage, perhaps twice, perhaps while a follower reads it: each answer the response
        as it ended (cancelled, or finished first), the same as GET's."""
        with self._followed_run(rng, "bg-cancel", may_be_deleted=False) as response_id:
            if response_id is None:
                return
            stage = self._stage(rng, response_id)
            answers = [self.cancel(response_id) for _ in range(rng.choice([1, 1, 2]))]
            statuses = [_json(a)["status"] if a.status == 200 else a.status for a in answers]
            final = self.status(response_id)
            problem = None
            if any(a.status != 200 for a in answers) or len({*statuses, final}) != 1 or final not in TERMINAL:
                problem = f"cancel {stage} of {response_id}: {statuses}, GET {final}: {answers[0].body[:200]!r}"
            self.tally.record(f"bg-cancel-{stage}", 200, problem, generates=False)

    def deleted(self, rng: random.Random) -> None:
        """Deleted at a random stage, perhaps while a follower reads it: then 404 to GET, cancel and DELETE."""
        with self._followed_run(rng, "bg-delete", may_be_deleted=True) as response_id:
            if response_id is None:
                return
            stage = self._stage(rng, response_id)
            first = self.delete(response_id)
            after = [send(self.port, request_bytes(method, f"{RESPONSES}/{response_id}{suffix}")).status
                     for method, suffix in (("GET", ""), ("POST", "/cancel"), ("DELETE", ""))]
            problem = None
            if first.status != 200 or _json(first) != {"id": response_id, "object": "response", "deleted": True} \
                    or after != [404, 404, 404]:
                problem = f"delete {stage} of {response_id}: {first.status} {first.body[:200]!r}, then {after}"
            self.tally.record(f"bg-delete-{stage}", first.status, problem, generates=False)

    def continued(self, rng: random.Random) -> None:
        """A run in progress continued by previous_response_id, or referred to by its input items: a 400 naming
        it while it runs (previous_response_in_progress, response_in_progress), answered once it has ended."""
        if (response_id := self._create_polled(rng, "bg-continued-create", long=True)) is None:
            return
        body: Json = {"model": MODEL, "max_output_tokens": 16, "stream": rng.random() < 0.5}
        if rng.random() < 0.5:
            body |= {"previous_response_id": response_id, "input": words(rng, 4)}
            code = "previous_response_in_progress"
        else:
            items = send(self.port, request_bytes("GET", f"{RESPONSES}/{response_id}/input_items"))
            refs = [{"type": "item_reference", "id": item["id"]} for item in _json(items)["data"]]
            body["input"] = [*refs, {"role": "user", "content": words(rng, 4)}]
            code = "response_in_progress"
        reply = send(self.port, request_bytes("POST", RESPONSES, json.dumps(body).encode()))
        problem = None
        if reply.status == 400:
            problem = error_problem(reply) or (None if _json(reply)["error"]["code"] == code else
                                               f"a continuation of a run in progress: {reply.body[:300]!r}")
        elif reply.status == 200:  # it ended first: its output is whole then
            if self.status(response_id) not in TERMINAL:
                problem = f"continued {response_id} while it is in progress"
            else:
                problem = response_problem(reply, body["stream"])[0]
        elif reply.status != 503:
            problem = f"a continuation of a run in progress got {reply.status}: {reply.body[:300]!r}"
        self.tally.record(f"bg-continued-{code}", reply.status, problem)
        if rng.random() < 0.5:
            self.cancel(response_id)

    def burst(self, rng: random.Random) -> None:
        """More creates at once than MAX_RUNNING: each made or refused with a 429 (Retry-After); then cancelled,
        deleted or left to run."""
        count = rng.randint(MAX_RUNNING + 1, MAX_RUNNING + 8)
        made: list[str] = []
        seeds = [rng.random() for _ in range(count)]

        def create(seed: float) -> None:
            if (response_id := self._create_polled(random.Random(seed), "bg-burst", long=True)) is not None:
                made.append(response_id)

        threads = [self._thread("bg-burst", True, create, seed) for seed in seeds]
        for thread in threads:
            thread.join()
        then = rng.choice(["cancel", "delete", "leave"])
        for response_id in made:
            if then == "cancel":
                self.cancel(response_id)
            elif then == "delete":
                self.delete(response_id)

    def crowd(self, rng: random.Random) -> None:
        """Many followers of one run at once, from random points, some hanging up or reading slowly; meanwhile the
        run is cancelled, deleted or left to end: every follower returns."""
        opened = self._open_stream(rng, "bg-crowd", long=True)
        if opened is None:
            return
        conn, _, created = opened
        response_id = created["response"]["id"]
        conn.close()
        self.tally.record("bg-crowd", 0)
        then = rng.choice(["cancel", "delete", "leave"])
        followers = [self._thread("bg-crowd-follow", False, self.follow, response_id,
                                  rng.choice([None, rng.randint(0, 40)]), random.Random(rng.random()),
                                  "bg-crowd-follow", rng.choice(["whole", "slow", "hang-up"]), then == "delete")
                     for _ in range(rng.randint(4, 16))]
        try:
            time.sleep(rng.uniform(0, 1))
            if then != "leave":
                reply = self.cancel(response_id) if then == "cancel" else self.delete(response_id)
                self.tally.record(f"bg-crowd-{then}", reply.status, None if reply.status == 200 else
                                  f"{then} of {response_id}: {reply.status} {reply.body[:200]!r}", generates=False)
        finally:
            for follower in followers:
                self._joined(follower, "bg-crowd")

    def odd_queries(self, rng: random.Random) -> None:
        """GET's query parameters with values it does not take: a 400 naming the parameter."""
        with self.tally.lock:
            made = list(self.tally.background)
        response_id = rng.choice(made or ["resp_none"])
        query, param = rng.choice([
            ("stream=true&starting_after=-1", "starting_after"), ("stream=true&starting_after=1e3", "starting_after"),
            ("stream=true&starting_after=%20", "starting_after"), ("stream=true&starting_after=", "starting_after"),
            ("stream=yes", "stream"), ("starting_after=3", "starting_after"),
            ("stream=false&include_obfuscation=true", "include_obfuscation"), ("include=x", "include"),
            ("stream=true&starting_after=%D9%A3", "starting_after"), ("stream=TRUE", "stream")])
        reply = send(self.port, request_bytes("GET", f"{RESPONSES}/{response_id}?{query}"))
        problem = error_problem(reply) if reply.status == 400 else f"GET ?{query}: {reply.status}"
        if problem is None and _json(reply)["error"]["param"] != param:
            problem = f"GET ?{query} named {_json(reply)['error']['param']}, not {param}"
        self.tally.record("bg-odd-query", reply.status, problem, generates=False)

    # -- after a round ------------------------------------------------------------------------

    def settle(self) -> None:
        """Every run of the round ended (terminal, or 404 once deleted; its end counted for /stats' check), then
        room for MAX_RUNNING more, cancelled at once (they end too)."""
        with ThreadPoolExecutor(8) as pool:
            made = dict(self.tally.background)
            list(pool.map(self._settled, made, made.values()))
            rng = random.Random(0)
            bodies = [json.dumps(self._body(rng, False) | {"max_output_tokens": ROOM_TOKENS}).encode()
                      for _ in range(MAX_RUNNING)]
            room = list(pool.map(lambda body: self._created(send(self.port, request_bytes("POST", RESPONSES, body)),
                                                            "bg-room"), bodies))
            if None in room:
                self._problem(f"no room for {MAX_RUNNING} background runs once every run ended")
            room = [response_id for response_id in room if response_id is not None]
            list(pool.map(self.cancel, room))  # their room shown: no need to wait for their answers
            list(pool.map(self._settled, room, [False] * len(room)))

    def _settled(self, response_id: str, deleted: bool) -> None:
        status = self.wait_ended(response_id, timeout=60)
        if status is None and not deleted:
            self._problem(f"background {response_id} not found, never deleted (dropped from the store?)")
        elif status is not None and status not in TERMINAL:
            self._problem(f"background {response_id} still {status} after the round")
        elif status is not None:
            with self.tally.lock:
                self.tally.seen[TERMINAL[status]] += 1

    def _problem(self, problem: str) -> None:
        with self.tally.lock:
            self.tally.problems.append(problem)
