"""`nanoqwen serve [MODEL] [options]`: gunicorn with nanoqwen's settings, from any directory.

Each option sets its NANOQWEN_* variable for the server (so the variables still work, and a flag
overrides them), then the process becomes `gunicorn -c python:nanoqwen.gunicorn_conf nanoqwen.wsgi:app`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

from nanoqwen.api.config import ServerConfig
from nanoqwen.choices import CPU_ISAS, DEFAULT_MODEL, DTYPE_NAMES, GENERATION_CONFIGS, GRAPHS, KERNELS, QUANTS
from nanoqwen.settings import (
    CUDA_KV_RESERVE_BYTES,
    CUDA_KV_SHARE,
    GRACEFUL_TIMEOUT_S,
    HOST_KV_BYTES,
    STEP_TOKENS_FLOOR,
    STEP_TOKENS_PER_ROW,
    EngineConfig,
)

GUNICORN_CONFIG = "python:nanoqwen.gunicorn_conf"
APP = "nanoqwen.wsgi:app"


@dataclass(frozen=True)
class EnvOption:
    flag: str
    env: str
    help: str
    type: type = str
    choices: tuple[str, ...] | None = None
    switch: bool = False  # --x / --no-x, written as 1 / 0

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


ENGINE_OPTIONS = (
    EnvOption("--device", "NANOQWEN_DEVICE", "auto (cuda -> mps -> cpu) or a torch device such as cuda:1, cpu"),
    EnvOption("--dtype", "NANOQWEN_DTYPE", "weights and activations; auto = the checkpoint's where the device "
              "computes it", choices=("auto", *DTYPE_NAMES)),
    EnvOption("--kernels", "NANOQWEN_KERNELS", "auto = Triton on CUDA, torch elsewhere",
              choices=KERNELS),
    EnvOption("--float-gemv", "NANOQWEN_FLOAT_GEMV", "with the Triton kernels: bf16/fp16/fp32 linears of at most "
              "8 rows (decode) run Triton's GEMV instead of cuBLAS", switch=True),
    EnvOption("--quant", "NANOQWEN_QUANT", "weight format: none = the dtype's; int8 = int8 weights with a "
              "scale per output channel; int4 = 4-bit weights with a scale and offset per 64 input columns; "
              "quantised at load time", choices=QUANTS),
    EnvOption("--graph", "NANOQWEN_GRAPH", "decode step execution; auto = cudagraph on CUDA, cpugraph on the CPU "
              "with the C kernels, none elsewhere", choices=GRAPHS),
    EnvOption("--max-batch", "NANOQWEN_MAX_BATCH", "sequences decoded together", int),
    EnvOption("--max-model-len", "NANOQWEN_MAX_MODEL_LEN", "context limit, prompt + completion (default: the "
              "model's max_position_embeddings)", int),
    EnvOption("--max-queue", "NANOQWEN_MAX_QUEUE", "waiting requests before the server answers 503 (a legacy "
              "completion's prompts, queued together: more of them is a 400)", int),
    EnvOption("--grammar-cache-memory", "NANOQWEN_GRAMMAR_CACHE_MEMORY", "bytes the compiled grammars a worker "
              "keeps for requests sent again may hold, the least recently used dropped first", int),
    EnvOption("--kv-cache-memory", "NANOQWEN_KV_CACHE_MEMORY", "bytes for the KV pool (default: CUDA "
              f"{CUDA_KV_SHARE * 100:.0f}%% of free memory - {CUDA_KV_RESERVE_BYTES >> 30} GiB, CPU/MPS "
              f"{HOST_KV_BYTES >> 30} GiB)", float),
    EnvOption("--num-kv-blocks", "NANOQWEN_NUM_KV_BLOCKS", "fixed KV pool size in blocks instead of a memory "
              "budget", int),
    EnvOption("--block-size", "NANOQWEN_BLOCK_SIZE", "tokens per KV block", int),
    EnvOption("--max-prefill-tokens", "NANOQWEN_MAX_PREFILL_TOKENS", "prompt tokens prefilled together in one "
              "step when chunking is off", int),
    EnvOption("--max-step-tokens", "NANOQWEN_MAX_STEP_TOKENS", "chunked prefill: tokens per step, running "
              "streams' decode tokens first, then prefill chunks; 0 = off (default: "
              f"{STEP_TOKENS_PER_ROW} × max batch, at least "
              f"{STEP_TOKENS_FLOOR})", int),
    EnvOption("--prefill-stall", "NANOQWEN_PREFILL_STALL", "chunked prefill: while streams decode, the time a "
              "chunk of a long prompt may add to a step with the smallest chunk, in decode steps; 0 = no pacing",
              float),
    EnvOption("--enable-prefix-caching", "NANOQWEN_ENABLE_PREFIX_CACHING", "reuse the KV blocks of identical "
              "prompt prefixes", switch=True),
    EnvOption("--generation-config", "NANOQWEN_GENERATION_CONFIG", "auto = sampling fields a request leaves out "
              "come from the checkpoint's generation_config.json; none = OpenAI's defaults",
              choices=GENERATION_CONFIGS),
    EnvOption("--revision", "NANOQWEN_REVISION", "Hub revision when MODEL is a repo id"),
    EnvOption("--threads", "NANOQWEN_THREADS", "torch threads (default: the CPUs this process may use)", int),
    EnvOption("--cpu-kernels", "NANOQWEN_CPU_KERNELS", "the compiled C kernels on the CPU; off = torch "
              "ops only", switch=True),
    EnvOption("--cpu-isa", "NANOQWEN_CPU_ISA", "the most the compiled CPU kernels take of the CPU's instructions: "
              "auto = all it has; avx2 = the AVX2 loops alone; avx512 = AVX-512's, no AMX", choices=CPU_ISAS),
    EnvOption("--speculative-config", "NANOQWEN_SPECULATIVE_CONFIG", "n-gram speculative decoding (prompt "
              "lookup), vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_max\": "
              "4, \"prompt_lookup_min\": 2} (default off)"),
    EnvOption("--cache-dir", "NANOQWEN_CACHE_DIR", "where the compiled CPU kernels are cached (default "
              "$XDG_CACHE_HOME/nanoqwen, else ~/.cache/nanoqwen)"),
)
API_OPTIONS = (
    EnvOption("--served-model-name", "NANOQWEN_SERVED_MODEL_NAME", "the `model` name clients use"),
    EnvOption("--api-key", "NANOQWEN_API_KEY", "require `Authorization: Bearer <key>` on /v1/* (prefer the "
              "variable: a flag shows in the process list until gunicorn starts)"),
    EnvOption("--cors-origins", "NANOQWEN_CORS_ORIGINS", "comma-separated allowed browser origins, or *"),
    EnvOption("--allowed-hosts", "NANOQWEN_ALLOWED_HOSTS", "on a loopback --host: comma-separated Host names served "
              "besides local ones (a proxy on this machine passing its clients' Host), each exact or .suffix, or * "
              "for any"),
    EnvOption("--body-timeout", "NANOQWEN_BODY_TIMEOUT", "seconds (> 0) the whole request body may take to "
              "arrive, then 408", float),
    EnvOption("--send-timeout", "NANOQWEN_SEND_TIMEOUT", "seconds (> 0) a response's write may make no "
              "progress (its client reads nothing), then the connection closes", float),
    EnvOption("--grammar-threads", "NANOQWEN_GRAMMAR_THREADS", "threads compiling grammars (structured outputs, "
              "tools; a cached one is looked up apart)", int),
    EnvOption("--max-pending-grammars", "NANOQWEN_MAX_PENDING_GRAMMARS", "grammar compiles in flight (running or "
              "waiting for a thread), then 503", int),
)
ENV_OPTIONS = (EnvOption("model", "NANOQWEN_MODEL", ""), *ENGINE_OPTIONS, *API_OPTIONS)
# The defaults --help states, by option: the settings' own (an API option's field is named apart where it differs).
DEFAULTS = {f.name: f.default for f in fields(EngineConfig)} | {
    "served_model_name": ServerConfig.served_model_name, "body_timeout": ServerConfig.body_timeout_s,
    "send_timeout": ServerConfig.send_timeout_s, "grammar_threads": ServerConfig.grammar_threads,
    "max_pending_grammars": ServerConfig.max_pending_grammars}


def _default(dest: str) -> str:
    """" (default X)", or "" where there is none to state: None, "" or 0 stand for a default derived elsewhere (the
    model's positions, the device's memory...), which the option's help says in words."""
    value = DEFAULTS.get(dest)
    if isinstance(value, bool):
        return f" (default {'on' if value else 'off'})"
    return "" if value in (None, "", 0) else f" (default {value})"


def _add(group: argparse._ArgumentGroup, option: EnvOption) -> None:
    help = f"{option.help}{_default(option.dest)} [{option.env}]"
    if option.switch:
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=help)
    else:
        group.add_argument(option.flag, type=option.type, choices=option.choices, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoqwen", description="OpenAI-compatible Qwen3 server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model over HTTP (gunicorn, one gevent worker per model copy)",
        description="Serve MODEL on an OpenAI-compatible HTTP API. Each option overrides the environment "
                    "variable in brackets. Arguments after `--` go to gunicorn as they are.",
        epilog="SIGTERM (or Ctrl-C) stops the server: running streams get --graceful-timeout seconds to finish.",
    )
    serve.add_argument("model", nargs="?", default=None,
                       help=f"local checkpoint directory or Hub repo id (default {DEFAULT_MODEL}) [NANOQWEN_MODEL]")
    http = serve.add_argument_group("HTTP server (gunicorn)")
    http.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface "
                      "(default %(default)s)")
    http.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    http.add_argument("--workers", type=int, default=1, help="worker processes, each with its own copy of the "
                      "model and KV cache on its own device: cuda:0..N-1 (round-robin past the GPU count) or, on "
                      "the CPU, its share of the cores (default %(default)s)")
    http.add_argument("--graceful-timeout", type=int, default=None, help="seconds running streams get to finish "
                      f"on SIGTERM before they end with an error event (default {GRACEFUL_TIMEOUT_S})")
    http.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error", "critical"),
                      help="gunicorn's and nanoqwen's log level (default info)")
    http.add_argument("--access-log", default=None, help="access log file, - for stdout (the default)")
    engine = serve.add_argument_group("engine")
    for option in ENGINE_OPTIONS:
        _add(engine, option)
    api = serve.add_argument_group("API")
    for option in API_OPTIONS:
        _add(api, option)
    return parser


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def serve_command(args: argparse.Namespace, gunicorn_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The gunicorn command line and environment `nanoqwen serve` runs."""
    env = dict(os.environ)
    for option in ENV_OPTIONS:
        value = getattr(args, option.dest)
        if value is not None:
            env[option.env] = _env_value(value)
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, "--bind", f"{args.host}:{args.port}",
               "--workers", str(args.workers)]
    if args.graceful_timeout is not None:
        command += ["--graceful-timeout", str(args.graceful_timeout)]
    if args.log_level is not None:
        command += ["--log-level", args.log_level]
    if args.access_log is not None:
        command += ["--access-logfile", args.access_log]
    return [*command, *gunicorn_args, APP], env


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    command, env = serve_command(args, argv[split + 1:])
    os.execve(sys.executable, command, env)
