"""Model shape (from config.json), engine settings (from arguments or NANOQWEN_* variables), and
their resolution: every "auto" and every derived size is decided here, once, into a RuntimeConfig."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from nanoqwen.choices import DEFAULT_MODEL, DTYPE_NAMES, GENERATION_CONFIGS, GRAPHS, KERNELS, QUANTS

log = logging.getLogger("nanoqwen")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str  # the checkpoint's dtype

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        raw = json.loads(Path(path).read_text())
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{path}: rope type {rope_type!r} is not supported (only the default RoPE)")
        rope_theta = raw.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ValueError(f"{path}: neither rope_theta nor rope_parameters.rope_theta is set")
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        )


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
SPECULATIVE_METHODS = ("ngram",)


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
    quant: str = "none"  # none | int8 | int4: linear weights (LM head, embedding) quantised at load time
    graph: str = "auto"  # auto | none | compile | cudagraph | cpugraph
    max_batch: int = 32  # sequences decoded together
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_queue: int = 256  # waiting requests before submit() refuses
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: float = 0.0  # bytes for the KV pool; 0 = derive from the device
    num_kv_blocks: int = 0  # fixed pool size in blocks (overrides kv_cache_memory); 0 = from memory
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step, without chunking
    # Chunked prefill: tokens a step runs, every running stream's decode token first, then prefill
    # (prompts that finish within the budget whole, longer ones in chunks across steps); 0 = off (whole
    # prompts prefilled alone in a step); None = 2 × max_batch, at least 512 (profiles/RESULTS.md,
    # "Chunked prefill: paced chunks").
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
    cache_dir: str = ""  # where the C kernels are cached; "" = ~/.cache/nanoqwen
    # n-gram speculative decoding, vLLM's JSON ({"method": "ngram", "num_speculative_tokens": k, ...}); "" = off
    speculative_config: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {self.kernels!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {self.quant!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}; got {self.graph!r}")
        if self.generation_config not in GENERATION_CONFIGS:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}; "
                             f"got {self.generation_config!r}")
        if self.threads < 0:
            raise ValueError("threads must be at least 1 (or 0 for the CPUs this process may use)")
        for name in ("max_batch", "max_queue", "block_size", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_step_tokens is None:
            self.max_step_tokens = max(512, 2 * self.max_batch)
        if self.max_step_tokens and self.max_step_tokens <= self.max_batch:
            raise ValueError(f"max_step_tokens must be 0 (off) or more than max_batch ({self.max_batch}), so "
                             "a step with every sequence decoding still has room for a prefill chunk")
        if self.prefill_stall < 0:
            raise ValueError("prefill_stall must be 0 (no pacing) or more")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        # Parsed once, here; an attribute, not a field: from_env and the CLI take every field as a setting
        self.speculative: SpeculativeConfig | None = SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> EngineConfig:
        """Settings from NANOQWEN_<FIELD> variables (e.g. NANOQWEN_MAX_BATCH=16)."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = environ.get(f"NANOQWEN_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = f.type.split("|")[0].strip()
            try:
                if kind == "int":
                    values[f.name] = int(raw)
                elif kind == "float":
                    values[f.name] = float(raw)
                elif kind == "bool":
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    values[f.name] = raw
            except ValueError:
                raise ValueError(f"NANOQWEN_{f.name.upper()}={raw!r} is not a valid {kind}") from None
        values.update(overrides)
        return cls(**values)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def bind_device(device: torch.device) -> torch.device:
    """Makes a CUDA device the calling thread's current one and names its index.

    Triton launches, CUDA-graph capture and replay, and torch.cuda.synchronize() act on the
    current device, not on the device the tensors live on: without this, NANOQWEN_DEVICE=cuda:1
    would run them on device 0. The engine loads and steps in one thread, which calls this.
    """
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    dtype = DTYPES.get(checkpoint_dtype, torch.bfloat16)
    if device.type == "mps" and dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


def resolve_threads(threads: int) -> int:
    """`threads`, or the CPUs this process may run on (its affinity mask, e.g. under taskset or a cgroup)."""
    if threads:
        return threads
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_graph(name: str, device: torch.device, cpu_graph: bool) -> str:
    """`cpu_graph`: whether the kernel set's decode step is C calls alone (Kernels.cpu_graph)."""
    if name == "auto":
        return "cudagraph" if device.type == "cuda" else "cpugraph" if cpu_graph else "none"
    if name == "cudagraph" and device.type != "cuda":
        raise ValueError(f"NANOQWEN_GRAPH=cudagraph needs a CUDA device, not {device.type}")
    if name == "cpugraph" and not cpu_graph:
        raise ValueError("NANOQWEN_GRAPH=cpugraph needs the C kernels: the CPU, bfloat16 or float32, an AVX2 CPU "
                         "with a C compiler, NANOQWEN_CPU_KERNELS on and the torch kernel set")
    return name


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def blocks_for(tokens: int, block_size: int) -> int:
    """The KV blocks that hold `tokens` tokens of one sequence."""
    return -(-tokens // block_size)


def blocks_to_hold(max_batch: int, max_model_len: int, block_size: int) -> int:
    """KV blocks for max_batch sequences of max_model_len tokens each: more are never used (block 0 is reserved)."""
    return 1 + max_batch * blocks_for(max_model_len, block_size)


def kv_pool_bytes(kv_cache_memory: float, device: torch.device) -> int:
    if kv_cache_memory > 0:
        return int(kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8) - (1 << 30)  # leave room for activations, graphs and sampling
    return 2 << 30


@dataclass(frozen=True)
class RuntimeConfig:
    """What the engine runs with: EngineConfig with every "auto" and derived size decided."""

    model_path: str
    device: torch.device
    dtype: torch.dtype
    kernels: str  # torch | triton
    quant: str  # none | int8 | int4
    graph: str  # none | compile | cudagraph | cpugraph
    max_batch: int
    max_model_len: int  # the KV pool may hold fewer tokens than the model's positions
    block_size: int
    num_kv_blocks: int  # block 0 is never allocated (padded decode lanes read it)
    threads: int
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding; None = off

    @property
    def max_blocks_per_seq(self) -> int:
        return blocks_for(self.max_model_len, self.block_size)

    @property
    def kv_cache_tokens(self) -> int:
        return (self.num_kv_blocks - 1) * self.block_size

    def info(self) -> dict:
        """The engine's info(): plain values, as /health and the system fingerprint show them."""
        return asdict(self) | {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def model_positions(config: EngineConfig, model: ModelConfig) -> int:
    """The context the model is built for: the setting, capped at the model's positions."""
    return min(config.max_model_len or model.max_position_embeddings, model.max_position_embeddings)


def resolve_runtime(config: EngineConfig, model: ModelConfig, model_path: str, device: torch.device,
                    dtype: torch.dtype, kernels: str, cpu_graph: bool) -> RuntimeConfig:
    """Called once the weights are on `device` (resolved and bound, see bind_device, and `dtype`
    from resolve_dtype): the default KV pool takes a share of the memory they leave free.
    `kernels` is the name of the set ops.select_kernels chose (the one home of that "auto"), `cpu_graph`
    whether that set can be replayed as a CPU graph (Kernels.cpu_graph).
    Raises ValueError for a setting this device or memory budget cannot serve."""
    max_model_len = model_positions(config, model)
    per_block = kv_bytes_per_token(model, dtype) * config.block_size
    num_blocks = config.num_kv_blocks or kv_pool_bytes(config.kv_cache_memory, device) // per_block
    num_blocks = min(num_blocks, blocks_to_hold(config.max_batch, max_model_len, config.block_size))
    if num_blocks < 2:
        raise ValueError("the KV cache budget is too small for even one block")
    if (num_blocks - 1) * config.block_size < max_model_len:
        max_model_len = (num_blocks - 1) * config.block_size
        log.warning("KV pool holds %d tokens: max_model_len lowered to that", max_model_len)
    return RuntimeConfig(
        model_path=model_path, device=device, dtype=dtype, kernels=kernels, quant=config.quant,
        graph=resolve_graph(config.graph, device, cpu_graph), max_batch=config.max_batch, max_model_len=max_model_len,
        block_size=config.block_size, num_kv_blocks=num_blocks, threads=resolve_threads(config.threads),
        speculative=config.speculative,
    )
