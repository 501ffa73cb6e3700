"""How long a streamed Responses answer with logprobs holds the event loop while its last events (each
repeating the whole answer's logprobs) are built, framed and stored: the longest gap of a 1 ms ticker greenlet.
With --call the long text ends in a function call: the message's `.done` events come mid-stream, as the call starts.
With --tools N the request has N function tools (a 300-character description each), which every event carrying the
response echoes.

In process, without a model: crafted engine events through Serving._stream. Run against another checkout
with PYTHONPATH=<its root>.
"""
from __future__ import annotations

import argparse
import time

import gevent

from nanoqwen.api.config import ServerConfig
from nanoqwen.api.responses import ToolParsing
from nanoqwen.api.responses_api import Draft, ResponseEvents, echoed_tools
from nanoqwen.api.responses_schemas import parse_responses_request
from nanoqwen.api.responses_store import Inputs, ResponseStore
from nanoqwen.api.serving import Batch, Serving
from nanoqwen.engine.request import Event, SamplingParams, TokenLogprob, Usage


class _Stats:
    def finish(self, trace: object, usage: Usage) -> None:
        pass


class _Trace:
    def on_event(self, event: Event) -> None:
        pass


CALL = ['<tool_call>\n{"name": "f", "arguments": {"a', '": 1}}\n</tool_call>']


def _tool(i: int) -> dict[str, object]:
    return {"type": "function", "name": f"f{i}", "description": "d" * 300,
            "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}


def longest_gap(tokens: int, top: int, call: bool, tools: int) -> tuple[float, int]:
    """(the ticker's longest gap in seconds, the stream's bytes)."""
    alternatives = [TokenLogprob(1, "b", -1.0, [98], []) for _ in range(top)]
    scored = TokenLogprob(0, "a", -0.5, [97], alternatives)
    ending = CALL if call else ["!"]
    events = [Event(text="a", token_ids=[1], logprobs=[scored]) for _ in range(tokens - len(ending))]
    events += [Event(text=text, token_ids=[2], logprobs=[scored]) for text in ending]
    events[-1].finish_reason, events[-1].usage = "stop", Usage(7, tokens)
    batch = Batch()
    for event in events:
        batch.put(event)
    req = parse_responses_request({"input": "Hi", "top_logprobs": top, "include": ["message.output_text.logprobs"],
                                   "tools": [_tool(i) for i in range(tools)]}, None)
    draft = Draft(req, SamplingParams(), "m", None, ResponseStore(), None, Inputs(), echoed_tools(req))
    stream = ResponseEvents(draft, ToolParsing(enabled=call))
    serving = Serving(None, ServerConfig(), _Stats())  # type: ignore[arg-type]
    ticks: list[float] = []

    def tick() -> None:
        while True:
            ticks.append(time.perf_counter())
            gevent.sleep(0.001)

    ticker = gevent.spawn(tick)
    gevent.sleep(0.01)
    size = 0
    for frame in serving._stream(batch, stream, _Trace(), {}):
        size += len(frame)
        gevent.sleep(0)  # as a server's write of each frame lets the loop run
    gevent.sleep(0.01)
    ticker.kill()
    return max(b - a for a, b in zip(ticks, ticks[1:])), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--call", action="store_true", help="the text ends in a function call")
    parser.add_argument("--tools", type=int, default=0, help="function tools in the request, echoed by the response")
    args = parser.parse_args()
    for _ in range(args.repeat):
        gap, size = longest_gap(args.tokens, args.top, args.call, args.tools)
        print(f"tokens={args.tokens} top={args.top} call={args.call} tools={args.tools} stream={size / 1e6:.1f} MB "
              f"longest loop gap={gap * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
