"""The soak's stored Chat Completions traffic (`store: true`): completions made streamed or not, of 1 or 2 choices,
with metadata, some left mid-stream; interleaved lists (random limit, order and metadata filter, walked page by
page), retrieves, metadata updates, message lists and deletes of the same ids; and what must hold once a round's
clients stop (`settle`): the openai client's auto-pager, walked while half the ids it visits (a page's last: its
cursor) and others ahead of it are deleted, visits every id not deleted ahead, each once; then, quiet, every listed
id is retrievable with its messages, none listed twice, and every completion read whole and not deleted is listed.
"""
from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, field

import openai

from chat_http import MODEL
from nanoqwen.api.chat_store import MAX_COMPLETIONS
from soak_http import CHAT, Connection, Json, Reply, Tally, error_problem, hang_up, request_bytes, send, words

TAGS = ("red", "green", "blue")  # the metadata values a completion is made with, and lists filter by
PAGE_LIMITS = (1, 2, 7, 20, 100)


def _refusal_problem(reply: Reply) -> str | None:
    """A refusal's body not in OpenAI's envelope (a 200 is none)."""
    return None if reply.status == 200 else error_problem(reply)


@dataclass
class StoreSoak:
    port: int
    tally: Tally
    whole: set[str] = field(default_factory=set)  # completions read whole (so stored), not deleted since
    deleted: set[str] = field(default_factory=set)
    left: int = 0  # streams left before their end (nothing stored for them)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scenario(self, rng: random.Random) -> None:
        action = rng.choices([self.create, self.listed, self.retrieve, self.update, self.delete, self.messages],
                             [8, 4, 3, 2, 2, 2])[0]
        action(rng)

    def _known(self, rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(sorted(self.whole)) if self.whole else None

    def _request(self, method: str, path: str, body: Json | None = None) -> Reply:
        return send(self.port, request_bytes(method, path, b"" if body is None else json.dumps(body).encode()))

    def create(self, rng: random.Random) -> None:
        stream, n = rng.random() < 0.5, rng.choice([1, 1, 2])
        body = {"model": MODEL, "messages": [{"role": "user", "content": words(rng, rng.randint(1, 30))}],
                "max_tokens": rng.choice([4, 16, 48]), "n": n, "stream": stream, "store": True,
                "metadata": {"tag": rng.choice(TAGS)}}
        conn = Connection(self.port, timeout=120)
        try:
            conn.sock.sendall(request_bytes("POST", CHAT, json.dumps(body).encode()))
            if stream and rng.random() < 0.4:  # left mid-stream: nothing kept
                status, headers = conn.head()
                cut = rng.randint(0, 6)
                for i, _ in enumerate(conn.chunks() if headers.get("transfer-encoding") == "chunked" else ()):
                    if i >= cut:
                        break
                hang_up(conn.sock, rng)
                with self.lock:
                    self.left += 1
                self.tally.record("store-left", status, None if status == 200 else f"status {status}")
                return
            reply = conn.reply()
        finally:
            conn.close()
        problem = None if reply.status == 200 else f"status {reply.status}: {reply.body[:200]!r}"
        if problem is None:
            completion_id = self._answered_id(reply, stream)
            kept = self._request("GET", f"{CHAT}/{completion_id}")
            stored = json.loads(kept.body) if kept.status == 200 else {}
            if stored.get("id") != completion_id or len(stored.get("choices", ())) != n:
                problem = f"{completion_id} answered, then retrieved as {kept.status}: {kept.body[:200]!r}"
            else:
                with self.lock:
                    self.whole.add(completion_id)
        self.tally.record("store-create", reply.status, problem)

    @staticmethod
    def _answered_id(reply: Reply, stream: bool) -> str:
        return reply.chunks[0]["id"] if stream else json.loads(reply.body)["id"]

    def listed(self, rng: random.Random) -> None:
        """A walk of 1-4 pages of one query: no id twice, each of the model and metadata asked for."""
        query = f"limit={rng.choice(PAGE_LIMITS)}&order={rng.choice(['asc', 'desc'])}"
        tag = rng.choice((None, *TAGS))
        query += "" if tag is None else f"&metadata[tag]={tag}"
        seen: list[str] = []
        problem, after = None, ""
        for _ in range(rng.randint(1, 4)):
            reply = self._request("GET", f"{CHAT}?{query}{after}")
            if reply.status != 200:
                problem = f"list {query}{after}: {reply.status} {reply.body[:200]!r}"
                break
            page = json.loads(reply.body)
            seen += [item["id"] for item in page["data"]]
            if tag is not None and any(item["metadata"].get("tag") != tag for item in page["data"]):
                problem = f"list {query}: an item without metadata tag={tag}"
            if not page["has_more"] or not page["data"]:
                break
            after = f"&after={page['last_id']}"
        if problem is None and len(set(seen)) != len(seen):
            problem = f"list {query} walked an id twice: {seen}"
        self.tally.record("store-list", reply.status, problem, generates=False)

    def retrieve(self, rng: random.Random) -> None:
        if (completion_id := self._known(rng)) is not None:
            self._gettable("store-retrieve", f"{CHAT}/{completion_id}", completion_id)

    def messages(self, rng: random.Random) -> None:
        if (completion_id := self._known(rng)) is not None:
            self._gettable("store-messages", f"{CHAT}/{completion_id}/messages?limit={rng.choice(PAGE_LIMITS)}",
                           completion_id)

    def _gettable(self, scenario: str, path: str, completion_id: str) -> None:
        """200, or a 404 in the envelope for an id deleted meanwhile."""
        reply = self._request("GET", path)
        with self.lock:
            gone = completion_id in self.deleted
        problem = None if reply.status == 200 or (reply.status == 404 and gone) else \
            f"{path}: {reply.status} {reply.body[:200]!r}"
        self.tally.record(scenario, reply.status, problem or _refusal_problem(reply), generates=False)

    def update(self, rng: random.Random) -> None:
        if (completion_id := self._known(rng)) is None:
            return
        tag = rng.choice(TAGS)
        reply = self._request("POST", f"{CHAT}/{completion_id}", {"metadata": {"tag": tag}})
        with self.lock:
            gone = completion_id in self.deleted
        problem = None
        if reply.status == 200 and json.loads(reply.body)["metadata"] != {"tag": tag}:
            problem = f"update of {completion_id} answered {reply.body[:200]!r}"
        elif reply.status != 200 and not (reply.status == 404 and gone):
            problem = f"update of {completion_id}: {reply.status} {reply.body[:200]!r}"
        self.tally.record("store-update", reply.status, problem or _refusal_problem(reply), generates=False)

    def delete(self, rng: random.Random) -> None:
        if (completion_id := self._known(rng)) is None:
            return
        with self.lock:  # marked first: a retrieve racing the delete may see it gone
            self.deleted.add(completion_id)
            self.whole.discard(completion_id)
        reply = self._request("DELETE", f"{CHAT}/{completion_id}")
        problem = None if reply.status in (200, 404) else f"delete {completion_id}: {reply.status}"
        self.tally.record("store-delete", reply.status, problem or _refusal_problem(reply), generates=False)

    def settle(self) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)
        self._page_while_deleting(client, random.Random(len(self.whole)))
        listed = [completion.id for completion in client.chat.completions.list(limit=100)]
        if len(set(listed)) != len(listed):
            self._problem(f"the quiet list holds an id twice: {len(listed)} items, {len(set(listed))} ids")
        for completion_id in listed:
            try:
                client.chat.completions.retrieve(completion_id)
                list(client.chat.completions.messages.list(completion_id, limit=3))
            except openai.APIError as exc:
                self._problem(f"{completion_id} listed but not readable: {exc!r}")
        with self.lock:  # at the store's bound the oldest were dropped: none is missed then
            missing = self.whole - set(listed) - self.deleted if len(listed) < MAX_COMPLETIONS else set()
        if missing:
            self._problem(f"{len(missing)} completions read whole and not deleted are not listed: "
                          f"{sorted(missing)[:5]}")

    def _page_while_deleting(self, client: openai.OpenAI, rng: random.Random) -> None:
        """The openai client's auto-pager (5 a page, either order) walked while half the ids it visits are deleted
        as it visits them (a page's last: its cursor) and others ahead of it: it visits every id not deleted ahead,
        each once."""
        ahead: set[str] = set()
        before = [completion.id for completion in client.chat.completions.list(limit=100)]
        walked: list[str] = []
        try:
            for completion in client.chat.completions.list(limit=5, order=rng.choice(["asc", "desc"])):
                walked.append(completion.id)
                # (an id deleted ahead is still visited where its page was read before: not deleted twice)
                victims = [completion.id] if completion.id not in ahead and rng.random() < 0.5 else []
                if rng.random() < 0.2 and (rest := [i for i in before if i not in walked and i not in ahead]):
                    ahead.add(victim := rng.choice(rest))
                    victims.append(victim)
                for victim in victims:
                    with self.lock:
                        self.deleted.add(victim)
                        self.whole.discard(victim)
                    client.chat.completions.delete(victim)
        except openai.APIError as exc:  # e.g. a cursor deleted under the pager refused
            self._problem(f"the auto-pager failed while deletes ran: {exc!r}")
            return
        if len(set(walked)) != len(walked):
            self._problem(f"the auto-pager visited an id twice while deletes ran: {len(walked)} visits")
        # an id deleted ahead may still be visited if its page was read before the delete
        if skipped := set(before) - set(walked) - ahead:
            self._problem(f"the auto-pager skipped {len(skipped)} ids while deletes ran: {sorted(skipped)[:5]}")

    def _problem(self, problem: str) -> None:
        with self.tally.lock:
            self.tally.problems.append(f"store-settle: {problem}")
