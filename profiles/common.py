"""Shared by the profile scripts: checkpoints, timed engine decode, machine facts, output files."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
OUT = REPO / "profiles" / "out"  # git-ignored default for --out
# The policy OpenMP read when torch loaded (the scripts import torch first): nanoqwen may set one after.
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")

import torch  # noqa: E402

sys.path[:0] = [str(REPO), str(TESTS)]

from nanoqwen.choices import DTYPE_NAMES, KERNELS  # noqa: E402
from nanoqwen.config import blocks_to_hold, resolve_device  # noqa: E402
from nanoqwen.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from nanoqwen.engine.sequence import Sequence  # noqa: E402
from nanoqwen.engine.stream import EventStream  # noqa: E402
from nanoqwen.hugepages import huge_page_buffer  # noqa: E402
from nanoqwen.settings import env_setting  # noqa: E402


# -- checkpoints and engines --------------------------------------------------------------
def add_engine_args(parser, dtype: bool = True) -> None:
    """The options every profile shares: where and how the engine runs, and where results go."""
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES))
    parser.add_argument("--kernels", default="auto", choices=KERNELS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=OUT)


def checkpoint(small: bool) -> Path:
    """Qwen3-0.6B's shape in bf16 (built once, ~1.2 GB under .cache/), or the 2-layer test model."""
    from checkpoints import make_checkpoint, qwen3_0_6b_shape

    return make_checkpoint() if small else make_checkpoint(**qwen3_0_6b_shape(), dtype=torch.bfloat16)


def load_engine(
    model: Path, *, device: str, dtype: str, graph: str, kernels: str, max_batch: int, max_model_len: int,
    quant: str = "none", hold_batch: bool = False, cpu_isa: str | None = None, **config: Any,
) -> Engine:
    """hold_batch: a KV pool for max_batch prompts of max_model_len tokens, however long (else the pool's default
    bytes, which long contexts outgrow); cpu_isa: the C kernels' cap, else NANOQWEN_CPU_ISA's as the server reads it
    (a profile set it and timed the uncapped kernels); config: other EngineConfig fields. Every prompt of a batch is
    prefilled in one step (engine_decode, decode_steps): the prefill budget takes max_batch of max_model_len tokens."""
    held = {"num_kv_blocks": blocks_to_hold(max_batch, max_model_len, EngineConfig.block_size)} if hold_batch else {}
    engine = Engine(EngineConfig(
        model=str(model), device=device, dtype=dtype, graph=graph, kernels=kernels, max_batch=max_batch,
        max_queue=max_batch, max_model_len=max_model_len, quant=quant,
        cpu_isa=cpu_isa or env_setting("cpu_isa") or EngineConfig.cpu_isa,
        max_step_tokens=0,  # every prompt prefilled in one step: the timed steps are the batch's decode
        max_prefill_tokens=max(EngineConfig.max_prefill_tokens, max_batch * max_model_len),
        **held, **config,
    ))
    engine.load()
    return engine


def batch_bench_setup(description: str, extra_args: Callable[[argparse.ArgumentParser], None],
                      ) -> tuple[argparse.Namespace, dict, Engine]:
    """What the batch-step profiles (bench_grammar, bench_min_tokens) start with: their arguments (the
    engine's, --batch, --threads and `extra_args`'), the machine (printed) and the engine."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser, dtype=False)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    extra_args(parser)
    args = parser.parse_args()
    engine = load_engine(checkpoint(args.small), device=args.device, dtype="auto", graph="auto", kernels="auto",
                         max_batch=args.batch, max_model_len=256)
    if args.threads:  # after loading, which sets the engine's own
        torch.set_num_threads(args.threads)
    info = machine_info(resolve_device(args.device))
    print(machine_line(info))
    return args, info, engine


def release(device: torch.device) -> None:
    """Returns the memory of models just dropped, before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """Distinct prompts (no prefix-cache sharing) of ordinary token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150_000, (batch, length), generator=g).tolist()


@dataclass
class DecodeRun:
    batch: int
    step_s: list[float]  # wall time of each decode step (one token for every sequence)
    tokens: list[list[int]]  # generated ids per sequence, the prefill's first token included
    core_pair_ns: tuple[int | None, ...] = ()  # core_pair_ns() before and after, where a bench measured it

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode throughput from the median step (robust to a noisy, shared machine)."""
        return self.batch / self.median_step_s

    @property
    def mean_tokens_per_s(self) -> float:
        return self.batch * len(self.step_s) / sum(self.step_s)


def engine_decode(engine: Engine, prompts: list[list[int]], new_tokens: int,
                  params: SamplingParams | None = None) -> DecodeRun:
    """Prefills every prompt in one step (untimed), then times each decode step of the whole batch;
    `params` (greedy by default) get max_tokens=new_tokens and ignore EOS.

    Each step is the engine's real `step()`: scheduling, input staging, the model, sampling and
    detokenisation; it ends with the sampled tokens on the host, so the wall time is the step's.
    """
    params = dataclasses.replace(params or SamplingParams(temperature=0.0), max_tokens=new_tokens, ignore_eos=True)
    streams = [engine.submit(p, params)[1] for p in prompts]
    return DecodeRun(len(prompts), decode_steps(engine, len(prompts)), [_generated(s) for s in streams])


def decode_steps(engine: Engine, rows: int) -> list[float]:
    """Prefills the `rows` submitted prompts in one step (untimed), then times each decode step of them all."""
    step_s = []
    with torch.inference_mode():
        engine.drain_inbox()
        engine.step()  # prefill: every prompt, and the first new token
        while engine.scheduler.has_work:
            if len(engine.scheduler.running) != rows or engine.scheduler.waiting:
                raise RuntimeError("a row finished early, was preempted or not prefilled with the others")
            step_s.append(timed_step(engine))
    return step_s


def prefilled(engine: Engine, prompts: list[list[int]], params: SamplingParams, room: int) -> list[Sequence]:
    """Submits the prompts and prefills them in one step, then gives each sequence blocks for len(seq) + `room` tokens
    (its next decode step's, and `room` drafts), so that runner calls can step them again and again, their state never
    moving. -> the running sequences. Call under torch.inference_mode()."""
    for prompt in prompts:
        engine.submit(prompt, params)
    engine.drain_inbox()
    engine.step()
    seqs = list(engine.scheduler.running)
    for seq in seqs:
        engine.block_manager.extend(seq, len(seq) + room)
    return seqs


def timed_step(engine: Engine) -> float:
    """Seconds of one engine step, its device work included."""
    synchronize(engine.runner.device)
    start = time.perf_counter()
    engine.step()
    synchronize(engine.runner.device)
    return time.perf_counter() - start


def _generated(stream: EventStream) -> list[int]:
    tokens = []
    while stream._events:
        event = stream.get(timeout=0)
        if event.error:
            raise RuntimeError(event.error)
        tokens += event.token_ids
    return tokens


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes batch-1 decode must read per token: every weight once, except the embedding table.

    The lookup reads one row of it; when tied, the LM head reads the whole table (counted once).
    """
    embedding = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embedding
    total, seen = 0, set()
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embedding and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total + embedding.shape[1] * embedding.element_size()


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters occupy (shared ones once): what the weight format changes in memory."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Memory read bandwidth in bytes/s: the best of several sums over a buffer far larger than caches.
    On the CPU the buffer is in huge pages, as the engine's weights are (nanoqwen/hugepages.py): in 4 KB
    pages the same sum reads ~25% slower (TLB misses, the prefetcher stopping at every page), a limit
    the kernels themselves beat."""
    if device.type == "cpu":
        x = huge_page_buffer(nbytes).view(torch.float32).fill_(1.0)
    else:
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del x
    release(device)
    return nbytes / best


CORE_PAIR = Path(__file__).resolve().parent / "core_pair.c"


def core_pair_ns() -> int | None:
    """A cache line's round trip between this process's first two CPUs, in ns (the best of 30 batches of 1,000;
    profiles/core_pair.c). On the 2-core Zen 5 KVM it names the speed state a figure ran in: ~77 ns, both vCPUs on one
    CCD of the host (a 2-thread read ~55 GB/s); ~340 ns, on two (~85-95 GB/s); the host moves them every few seconds.
    None with fewer than two CPUs, no C compiler, or a CPU it could not pin. Built into OUT on first use (and when
    its sources are newer)."""
    from ops.cpu.build import compiler

    binary, cc = OUT / "core_pair", compiler()
    if cc is None or len(os.sched_getaffinity(0)) < 2:
        return None
    sources = (CORE_PAIR, CORE_PAIR.with_suffix(".h"))
    if not binary.exists() or binary.stat().st_mtime < max(source.stat().st_mtime for source in sources):
        OUT.mkdir(parents=True, exist_ok=True)
        if subprocess.run([cc, "-O2", "-pthread", str(CORE_PAIR), "-o", str(binary)]).returncode != 0:
            return None
    done = subprocess.run([str(binary), "30"], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.returncode == 0 else None


# -- reporting ----------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": WAIT_POLICY,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        # Other busy processes stall torch's CPU threads: timings under load are not comparable.
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict) -> str:
    gpu = f"{info['gpu']}; " if "gpu" in info else ""
    libs = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers") if k in info)
    load = f"; load average {info['load_avg_1m']} at start" if "load_avg_1m" in info else ""
    threads = f"{info['torch_threads']} torch threads, OMP_WAIT_POLICY {info.get('omp_wait_policy', 'unset')}"
    return f"{gpu}{info['cpu']} ({info['cores']} cores, {threads}); {libs}{load}"


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def write_outputs(out: Path, stem: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sse_chunks(url: str, body: dict) -> Iterator[dict]:
    """POSTs a streaming request and yields each `data:` chunk of the answer, parsed, up to `[DONE]`."""
    import requests  # the HTTP benchmarks only

    with requests.post(url, json=body, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield json.loads(line[len(b"data: "):])
