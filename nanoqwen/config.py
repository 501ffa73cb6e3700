"""Model shape (from config.json) and the resolution of the engine's settings (nanoqwen.settings): every
"auto" and every derived size is decided here, once, into a RuntimeConfig."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanoqwen.choices import DTYPE_NAMES
from nanoqwen.settings import (
    CUDA_KV_RESERVE_BYTES,
    CUDA_KV_SHARE,
    HOST_KV_BYTES,
    EngineConfig,
    SpeculativeConfig,
)

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


def kv_pool_from_free_memory(config: EngineConfig, device: torch.device) -> bool:
    """Whether the KV pool takes a share of the device memory free when the model loads (CUDA, with neither
    kv_cache_memory nor num_kv_blocks set), so that what another process still holds then is lost to it; elsewhere its
    size is fixed (HOST_KV_BYTES off CUDA)."""
    return device.type == "cuda" and not config.num_kv_blocks and not config.kv_cache_memory > 0


def kv_pool_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory > 0:
        return int(config.kv_cache_memory)
    if kv_pool_from_free_memory(config, device):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_SHARE) - CUDA_KV_RESERVE_BYTES
    return HOST_KV_BYTES


@dataclass(frozen=True)
class RuntimeConfig:
    """What the engine runs with: EngineConfig with every "auto" and derived size decided."""

    model_path: str
    device: torch.device
    dtype: torch.dtype
    kernels: str  # torch | triton
    quant: str  # none | int8 | int4
    float_gemv: bool  # the Triton set's float linears of decode-sized batches by its GEMV (ops/triton/gemv.py)
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
    if (config.max_model_len or 0) > max_model_len:
        log.warning("NANOQWEN_MAX_MODEL_LEN=%d is past the model's %d positions (max_position_embeddings): "
                    "max_model_len lowered to that", config.max_model_len, max_model_len)
    per_block = kv_bytes_per_token(model, dtype) * config.block_size
    num_blocks = config.num_kv_blocks or kv_pool_bytes(config, device) // per_block
    num_blocks = min(num_blocks, blocks_to_hold(config.max_batch, max_model_len, config.block_size))
    if num_blocks < 2:
        raise ValueError("the KV cache budget is too small for even one block")
    if (num_blocks - 1) * config.block_size < max_model_len:
        max_model_len = (num_blocks - 1) * config.block_size
        log.warning("KV pool holds %d tokens: max_model_len lowered to that", max_model_len)
    return RuntimeConfig(
        model_path=model_path, device=device, dtype=dtype, kernels=kernels, quant=config.quant,
        float_gemv=config.float_gemv, graph=resolve_graph(config.graph, device, cpu_graph), max_batch=config.max_batch,
        max_model_len=max_model_len,
        block_size=config.block_size, num_kv_blocks=num_blocks, threads=resolve_threads(config.threads),
        speculative=config.speculative,
    )
