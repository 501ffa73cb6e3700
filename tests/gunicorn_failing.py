"""gunicorn settings for tests (`-c tests/gunicorn_failing.py`): nanoqwen's, with a worker whose engine step fails on
purpose, as a bug or a kernel's error would, and which publishes its stats only when asked (a scrape, /stats) or as it
exits: no periodic publish.

A step fails while it holds a choice of a request of `max_tokens` $FAIL_MAX_TOKENS (Responses: `max_output_tokens`)
that has generated $FAIL_AFTER tokens: its request ends with the engine's error event after those tokens. A chat
stream of `n` $BREAK_N breaks in our own stream code (its chunk builder raises) at its $BREAK_AT-th event, and a chat
answer of that `n` not streamed in its builder (CompletionBuilder.build raises). Given by the
environment: a test process must not import this file (nanoqwen.gunicorn_conf makes the metrics' run directory)."""
import os

from nanoqwen import worker
from nanoqwen.gunicorn_conf import *  # noqa: F401,F403

FAIL_MAX_TOKENS = int(os.environ["FAIL_MAX_TOKENS"])
FAIL_AFTER = int(os.environ["FAIL_AFTER"])
worker.PUBLISH_S = 24 * 3600.0  # read by the worker's publish loop at each wait: once at its start, then no more
BREAK_N, BREAK_AT = int(os.environ["BREAK_N"]), int(os.environ["BREAK_AT"])


def post_worker_init(_worker: object) -> None:
    from nanoqwen.runner.runner import ModelRunner

    step = ModelRunner.step

    def failing(self: ModelRunner, batch: object) -> object:
        if any(seq.request.params.max_tokens == FAIL_MAX_TOKENS and seq.num_output_tokens >= FAIL_AFTER
               for seq, _ in batch.rows):
            raise RuntimeError("a step failed on purpose")
        return step(self, batch)

    ModelRunner.step = failing

    from nanoqwen.api.responses import ChunkBuilder

    chunks = ChunkBuilder.chunks

    def breaking(self: ChunkBuilder, event: object) -> object:
        if self.n == BREAK_N:
            self.events_seen = getattr(self, "events_seen", 0) + 1
            if self.events_seen == BREAK_AT:
                raise RuntimeError("a stream broken on purpose")
        return chunks(self, event)

    ChunkBuilder.chunks = breaking

    from nanoqwen.api.responses import CompletionBuilder

    build = CompletionBuilder.build

    def broken_build(self: CompletionBuilder, usage: object) -> object:
        if self.n == BREAK_N:
            raise RuntimeError("an answer broken on purpose")
        return build(self, usage)

    CompletionBuilder.build = broken_build
