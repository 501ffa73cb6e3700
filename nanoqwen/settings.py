"""The engine's settings, from arguments or NANOQWEN_<FIELD> variables, checked but not yet resolved (that is
nanoqwen.config's, once the device is known). Torch-free: `nanoqwen serve` (nanoqwen/cli.py) shows their defaults."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from nanoqwen.choices import CPU_ISAS, DEFAULT_MODEL, DTYPE_NAMES, GENERATION_CONFIGS, GRAPHS, KERNELS, QUANTS

SPECULATIVE_METHODS = ("ngram",)
STEP_TOKENS_FLOOR = 512  # the smallest default max_step_tokens
STEP_TOKENS_PER_ROW = 2  # the default max_step_tokens per max_batch row, above the floor
GRACEFUL_TIMEOUT_S = 30  # SIGTERM: running streams get this long to finish, then end with an error event
WORKER_TIMEOUT_S = 120  # gunicorn's --timeout (nanoqwen's default): the worker's heartbeat and its boot (torch import)
# The KV pool without kv_cache_memory: a share of CUDA's free memory less room for activations, graphs and
# sampling; elsewhere a fixed size.
CUDA_KV_SHARE = 0.8
CUDA_KV_RESERVE_BYTES = 1 << 30
HOST_KV_BYTES = 2 << 30
# What the compiled grammars a worker keeps may hold (nanoqwen/engine/grammar_cache.py): the 128 of typical requests
# hold ~10-50 MB, 17 of the largest a request may send (a 4,900-property object: ~15 MB) 256 MB
GRAMMAR_CACHE_BYTES = 256 << 20
# A switch's words, either way; any other is refused, not read as off
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_setting(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """NANOQWEN_<NAME>'s raw value; None where it is unset or empty (both mean the setting's default). The engine's
    and the server's settings alike."""
    raw = (os.environ if environ is None else environ).get(f"NANOQWEN_{name.upper()}")
    return raw or None


@dataclass(frozen=True)
class SpeculativeConfig:
    """n-gram speculative decoding (prompt lookup), vLLM's `--speculative-config` fields and defaults."""

    method: str  # ngram
    num_speculative_tokens: int  # drafted tokens a row verifies per step, at most
    prompt_lookup_max: int  # longest suffix n-gram looked up
    prompt_lookup_min: int  # shortest

    @classmethod
    def parse(cls, raw: str) -> SpeculativeConfig | None:
        """The JSON of NANOQWEN_SPECULATIVE_CONFIG; None when empty. ValueError naming the field at fault."""
        if not raw.strip():
            return None
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError("speculative_config must be a JSON object")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]} is not supported (fields: method, "
                             "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min)")
        if values.get("method") not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {values.get('method')!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = values.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config.{name} must be an integer > 0; got {value!r}")
        if values.get("num_speculative_tokens") is None:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        # vLLM's defaults: both 5; one given, the other the same
        low, high = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
        low, high = low or high or 5, high or low or 5
        if low > high:
            raise ValueError(f"speculative_config.prompt_lookup_min={low} must be <= prompt_lookup_max={high}")
        return cls("ngram", values["num_speculative_tokens"], high, low)


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL  # local checkpoint directory or Hub repo id
    device: str = "auto"  # auto (cuda -> mps -> cpu) or a torch device name
    dtype: str = "auto"  # auto (the checkpoint's, where the device handles it) | bfloat16 | float16 | float32
    kernels: str = "auto"  # auto | torch | triton
    # The Triton set's float (bf16/fp16/fp32) linears of at most 8 rows (decode) as its GEMV, not cuBLAS: for A/B
    # on a GPU (profiles/RESULTS.md, "gemv"); int8/int4 take their GEMV at those rows whatever this says
    float_gemv: bool = False
    quant: str = "none"  # none | int8 | int4: linear weights (LM head, embedding) quantised at load time
    graph: str = "auto"  # auto | none | compile | cudagraph | cpugraph
    max_batch: int = 32  # sequences decoded together
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_queue: int = 256  # waiting requests before submit() refuses
    grammar_cache_memory: int = GRAMMAR_CACHE_BYTES  # bytes the cached compiled grammars may hold
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: float = 0.0  # bytes for the KV pool; 0 = derive from the device
    num_kv_blocks: int = 0  # fixed pool size in blocks (overrides kv_cache_memory); 0 = from memory
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step, without chunking
    # Chunked prefill: tokens a step runs, every running stream's decode token first, then prefill
    # (prompts that finish within the budget whole, longer ones in chunks across steps); 0 = off (whole
    # prompts prefilled alone in a step); None = STEP_TOKENS_PER_ROW × max_batch, at least STEP_TOKENS_FLOOR
    # (profiles/RESULTS.md, "Chunked prefill: paced chunks").
    max_step_tokens: int | None = None
    # While streams decode, a chunk that leaves its prompt unfinished may make its step this many
    # decode-only steps longer than a step with the smallest chunk (measured, nanoqwen/engine/pacing.py):
    # 1.0 = about twice a decode step where prefill rows add little of their own; 0 = no pacing.
    prefill_stall: float = 1.0
    enable_prefix_caching: bool = True
    # auto: sampling fields a request leaves out come from the checkpoint's generation_config.json
    # (as vLLM's --generation-config auto); none: from the OpenAI defaults (temperature 1, no top-k/p)
    generation_config: str = "auto"
    revision: str | None = None
    threads: int = 0  # torch's intra-op threads; 0 = the CPUs this process may use
    cpu_kernels: bool = True  # the compiled C kernels on the CPU (False: the torch references alone)
    cpu_isa: str = "auto"  # auto | avx2 | avx512: the most the C kernels take of the CPU's instructions (choices.py)
    cache_dir: str = ""  # where the C kernels are cached; "" = $XDG_CACHE_HOME/nanoqwen, else ~/.cache/nanoqwen
    # n-gram speculative decoding, vLLM's JSON ({"method": "ngram", "num_speculative_tokens": k, ...}); "" = off
    speculative_config: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {self.kernels!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {self.quant!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}; got {self.graph!r}")
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa must be one of {', '.join(CPU_ISAS)}; got {self.cpu_isa!r}")
        if self.generation_config not in GENERATION_CONFIGS:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}; "
                             f"got {self.generation_config!r}")
        if self.threads < 0:
            raise ValueError("threads must be at least 1 (or 0 for the CPUs this process may use)")
        for name in ("max_batch", "max_queue", "block_size", "max_prefill_tokens", "grammar_cache_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_step_tokens is None:
            self.max_step_tokens = max(STEP_TOKENS_FLOOR, STEP_TOKENS_PER_ROW * self.max_batch)
        if self.max_step_tokens and self.max_step_tokens <= self.max_batch:
            raise ValueError(f"max_step_tokens must be 0 (off) or more than max_batch ({self.max_batch}), so "
                             "a step with every sequence decoding still has room for a prefill chunk")
        self._check_finite("prefill_stall", "number, 0 (no pacing)")
        self._check_finite("kv_cache_memory", "number of bytes, 0 (the device's default)")
        if self.num_kv_blocks < 0:
            raise ValueError(f"num_kv_blocks must be 0 (from the memory budget) or more; got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        # Parsed once, here; an attribute, not a field: from_env and the CLI take every field as a setting
        self.speculative: SpeculativeConfig | None = SpeculativeConfig.parse(self.speculative_config)

    def _check_finite(self, name: str, what: str) -> None:
        """ValueError unless the field `name` is a finite `what` or more (nan and inf fail `0 <= value < inf`)."""
        value = getattr(self, name)
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite {what} or more; got {value}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> EngineConfig:
        """Settings from NANOQWEN_<FIELD> variables (e.g. NANOQWEN_MAX_BATCH=16)."""
        values: dict = {}
        for f in fields(cls):
            raw = env_setting(f.name, environ)
            if raw is None:
                continue
            kind = f.type.split("|")[0].strip()
            try:
                if kind == "int":
                    values[f.name] = int(raw)
                elif kind == "float":
                    values[f.name] = float(raw)
                elif kind == "bool":
                    values[f.name] = SWITCH_WORDS[raw.strip().lower()]
                else:
                    values[f.name] = raw
            except (ValueError, KeyError):
                words = f" ({', '.join(SWITCH_WORDS)})" if kind == "bool" else ""
                raise ValueError(f"NANOQWEN_{f.name.upper()}={raw!r} is not a valid {kind}{words}") from None
        values.update(overrides)
        return cls(**values)
