"""The worst GET /health latency (a poller every 10 ms, its own process) while one large request body of each shape
runs on a real gunicorn serving the tiny test checkpoint (1024-token context): the event loop's stall per shape.
Each shape runs 3 times; the median of their worst polls is printed. Run from a checkout's root; an argument runs
only the shapes whose names hold it. The shapes that bring in stored items (references, a previous response) first
store a response of 10,000 items (with ids, 16,000 pass the 65,536-value limit), then send `store: false` (each run
kept would push it out of the store).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests
import torch

import common  # puts this checkout and its tests first on sys.path
from chat_http import cpu_env, health_polled
from checkpoints import make_checkpoint
from server_process import GunicornServer

HI = [{"role": "user", "content": "hi"}]
PROPERTIES = {f"p{i:05d}" + "q" * 100: {"type": "string"} for i in range(20000)}


def _tool(i: int, description: int) -> dict[str, Any]:
    return {"name": f"f{i}", "description": "d" * description,
            "parameters": {"type": "object", "properties": {"a": {"type": "string", "description": "x" * description}}}}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


ITEMS = [{"role": "user", "content": "w " * 225}] * 16000
CJK = "我们今天讨论模型的推理速度和服务器的延迟，以及长提示的分词。" * 66000  # 6 MB in UTF-8
STORED = "resp_stored"  # replaced by the id of a stored response of STORED_ITEMS
STORED_ITEMS = [{"id": f"msg_{i:05d}", **item} for i, item in enumerate(ITEMS[:10000])]
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat: 60 tools, 2x64 KB descriptions": (
        "/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": _tool(i, 64000)}
                                                          for i in range(60)]}),
    "chat: 1 tool, 20k properties": (
        "/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": PROPERTIES}}}]}),
    "chat: 16k messages of 450 chars": ("/v1/chat/completions", {"messages": ITEMS}),
    "chat: one 8 MB message": ("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "w " * ((4 << 20) - 100)}]}),
    "chat: tool parameters nested 60 deep": (
        "/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": _nested(60)}}}}]}),
    "chat: logit_bias of 30k entries": ("/v1/chat/completions",
                                        {"messages": HI, "logit_bias": {str(i): 1 for i in range(30000)}}),
    "chat: response_format schema of 20k properties": (
        "/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object", "properties": PROPERTIES}}}}),
    "responses: 60 tools, 2x64 KB": ("/v1/responses", {"input": "hi", "tools": [{"type": "function", **_tool(i, 64000)}
                                                                                for i in range(60)]}),
    "responses: 16k input items": ("/v1/responses", {"input": ITEMS}),
    "responses: 16k input items, truncation auto": ("/v1/responses", {"input": ITEMS, "truncation": "auto"}),
    "completions: 2k prompts of 4 KB": ("/v1/completions", {"prompt": ["w " * 2000] * 2000}),
    "completions: one 7 MiB prompt": ("/v1/completions", {"prompt": "w " * (7 << 19)}),
    # no space between ASCII letters: cut at the CJK punctuation, and between digits
    "completions: one 6 MB CJK prompt": ("/v1/completions", {"prompt": CJK}),
    "completions: one 7.5 MiB digits prompt": ("/v1/completions", {"prompt": "0123456789" * (6 << 17)}),
    "chat: one 6 MB CJK message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": CJK}]}),
    "completions: 128 prompts of 56 KB": ("/v1/completions", {"prompt": ["w " * 28672] * 128}),
    "completions: 60k token ids": ("/v1/completions", {"prompt": [1000] * 60000}),
    "completions: 60 prompts of 1020 token ids": ("/v1/completions", {"prompt": [[1000] * 1020] * 60}),
    # as many as the request's values allow: each resolved item counts as sent
    "responses: 3k item references, truncation auto": (
        "/v1/responses", {"input": [{"type": "item_reference", "id": item["id"]} for item in STORED_ITEMS[:3000]],
                          "truncation": "auto", "store": False}),
    "responses: continuing 10k stored items, truncation auto": (
        "/v1/responses", {"input": "hi", "previous_response_id": STORED, "truncation": "auto", "store": False}),
    "tokenize: 16k messages (400: continue_final_message)": (
        "/tokenize", {"messages": ITEMS, "add_generation_prompt": False, "continue_final_message": True}),
    "detokenize: 60k ids": ("/detokenize", {"tokens": [1000] * 60000}),
}


def _stored(url: str) -> str:
    """The id of a new stored response of STORED_ITEMS (truncated to fit)."""
    answer = requests.post(f"{url}/v1/responses", json={"input": STORED_ITEMS, "truncation": "auto",
                                                         "max_output_tokens": 16}, timeout=300)
    answer.raise_for_status()
    return answer.json()["id"]


def main() -> None:
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="1024")
    with tempfile.TemporaryDirectory() as tmp, GunicornServer(env, Path(tmp) / "gunicorn.log") as srv:
        requests.post(f"{srv.url}/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, timeout=120)
        print(f"- {common.machine_line(common.machine_info(torch.device('cpu')))}\n- `{common.command_line()}`\n")
        rows = []
        stored = ""
        for name, (path, body) in SHAPES.items():
            if sys.argv[1:] and sys.argv[1] not in name:
                continue
            limit = {"/v1/responses": {"max_output_tokens": 16}, "/tokenize": {}, "/detokenize": {}}.get(
                path, {"max_tokens": 16})
            data = json.dumps({**limit, **body}, ensure_ascii=False).encode()
            if STORED.encode() in data or b'"item_reference"' in data:
                stored = stored or _stored(srv.url)
                data = data.replace(STORED.encode(), stored.encode())
            worst = []
            for _ in range(3):
                with health_polled(srv, 0.01) as polls:
                    answer = requests.post(f"{srv.url}{path}", data=data, timeout=300,
                                           headers={"Content-Type": "application/json"})
                worst.append(max(p.seconds for p in polls))
            median_ms = 1000 * sorted(worst)[1]
            rows.append([name, f"{len(data) / 2**20:.2f}", str(answer.status_code), f"{median_ms:.0f} ms"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(common.markdown_table(["shape", "MiB", "status", "worst /health (median of 3)"], rows))
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
