"""Resident memory per weight format: where a serving process's memory goes, one fresh process each.

    python profiles/bench_memory.py [--quant none int8 int4] [--dtype bfloat16] [--graph none]
        [--max-batch 8] [--max-model-len 96] [--small] [--out DIR]

Each format runs in its own process (memory freed by one must not flatter the next): RSS
(/proc/self/status VmRSS, anonymous and file-backed parts) after importing torch and nanoqwen, after
Engine.load(), after a batch of --max-batch 32-token prompts decoded for 8 steps, and idle (after
what the engine does when it runs out of work: the freed heap handed back), with the peak (VmHWM)
over the whole run; beside them the model's parameter bytes and the KV pool's bytes, so the rest
(torch's and the tokenizer's own memory, allocator slack) shows as the difference. One more process
reports the RSS after each import group a server loads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen import loader  # noqa: E402
from nanoqwen.choices import QUANTS  # noqa: E402

DECODE_STEPS = 8
# RSS after each import group of a server process, in a fresh interpreter (this one has imported them all)
IMPORT_GROUPS = {"python": "", "torch": "import torch", "transformers": "import transformers",
                 "engine": "import nanoqwen.engine", "api": "import nanoqwen.api.app"}
IMPORTS = """
import json, sys
sys.path.insert(0, {repo!r})
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
out = {{}}
for name, statement in {groups!r}.items():
    exec(statement)
    out[name] = rss()
print(json.dumps(out))
"""


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def child(args) -> None:
    """Measures one weight format in this process and prints one JSON line."""
    import torch

    stages = {"imports": status()}
    engine = common.load_engine(common.checkpoint(args.small), device="cpu", dtype=args.dtype, graph=args.graph,
                                kernels="auto", max_batch=args.max_batch, max_model_len=args.max_model_len,
                                quant=args.child)
    stages["loaded"] = status()
    common.engine_decode(engine, common.random_prompts(args.max_batch, 32, 0), DECODE_STEPS)
    stages["decoded"] = status()
    loader.release_freed_heap()  # what the engine does when it runs out of work
    stages["idle"] = status()
    model = engine.runner.model
    kv = sum(t.untyped_storage().nbytes() for t in (engine.runner.k_cache, engine.runner.v_cache))
    print(json.dumps({"quant": args.child, "stages": stages, "weights": common.resident_weight_bytes(model),
                      "kv_cache": kv, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--graph", default="none", choices=["none", "cpugraph"],
                        help="none (default): eager steps; cpugraph: what the CPU server runs by default "
                             "(NANOQWEN_GRAPH=auto), one recording per batch bucket")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=96)
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    common.checkpoint(args.small)  # built once, before the measured processes
    rows = []
    for quant in args.quant:
        command = [sys.executable, __file__, "--child", quant, "--dtype", args.dtype, "--graph", args.graph,
                   "--max-batch", str(args.max_batch),
                   "--max-model-len", str(args.max_model_len), *(["--small"] if args.small else [])]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    script = IMPORTS.format(repo=str(common.REPO), groups=IMPORT_GROUPS)
    imports = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    base = next((r for r in rows if r["quant"] == "none"), rows[0])

    def gb(value: int) -> str:
        return f"{value / 1e9:.3f}"

    table = common.markdown_table(
        ["quant", "after imports GB", "loaded GB", "decoded GB (anon · file)", "idle GB", "peak GB", "weights GB",
         "KV pool GB", f"decoded RSS vs {base['quant']}"],
        [[r["quant"], gb(r["stages"]["imports"]["VmRSS"]), gb(r["stages"]["loaded"]["VmRSS"]),
          f"{gb(r['stages']['decoded']['VmRSS'])} ({gb(r['stages']['decoded']['RssAnon'])} · "
          f"{gb(r['stages']['decoded']['RssFile'])})", gb(r["stages"]["idle"]["VmRSS"]),
          gb(r["stages"]["decoded"]["VmHWM"]), gb(r["weights"]),
          gb(r["kv_cache"]), f"{r['stages']['decoded']['VmRSS'] / base['stages']['decoded']['VmRSS']:.0%}"]
         for r in rows])
    text = "\n".join([
        "### Resident memory per weight format",
        "",
        f"- Command: `{common.command_line()}`; load average {os.getloadavg()[0]:.1f}; {args.dtype}, "
        f"graph {args.graph}, max batch {args.max_batch}, max model length {args.max_model_len}, one process per "
        f"format.",
        "- RSS after each import group of a server, GB: "
        + ", ".join(f"{name} {gb(value)}" for name, value in imports.items()) + ".",
        "",
        table,
    ])
    print(text)
    common.write_outputs(args.out, "bench_memory", {"rows": rows, "imports": imports, "command": common.command_line()},
                         text)


if __name__ == "__main__":
    main()
