"""Checkpoint -> everything the engine serves with: the resolved runtime settings, the model on its
device, the tokenizer and the checkpoint's generation defaults."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import ops
from nanoqwen import loader
from nanoqwen.config import (
    ModelConfig,
    RuntimeConfig,
    bind_device,
    model_positions,
    resolve_device,
    resolve_dtype,
    resolve_runtime,
)
from nanoqwen.loader import GenerationDefaults
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.settings import EngineConfig
from nanoqwen.text import TokenBytes
from ops.cpu.build import resolve_cache_dir


@dataclass
class LoadedModel:
    runtime: RuntimeConfig
    model_config: ModelConfig
    model: Qwen3ForCausalLM
    tokenizer: object  # transformers' fast tokenizer of the checkpoint
    token_bytes: TokenBytes
    generation: GenerationDefaults
    think_ids: tuple[int | None, int | None]  # <think>, </think> (None where the vocabulary lacks them)


def load_model(config: EngineConfig) -> LoadedModel:
    """Runs in the thread that will step the model: a CUDA device becomes that thread's current one."""
    path = loader.resolve_checkpoint(config.model, config.revision)
    shards = loader.check_files(path)
    model_config = loader.load_model_config(path)
    device = bind_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device)
    tokenizer = loader.load_tokenizer(path)
    generation = loader.load_generation_defaults(path, tokenizer)
    kernels = ops.select_kernels(
        config.kernels, device, dtype, hidden_size=model_config.hidden_size, head_dim=model_config.head_dim,
        num_heads=model_config.num_attention_heads, num_kv_heads=model_config.num_key_value_heads,
        cpu_kernels=config.cpu_kernels, cpu_isa=config.cpu_isa, float_gemv=config.float_gemv,
        cache_dir=resolve_cache_dir(config.cache_dir),
    )
    model = loader.build_model(model_config, shards, model_positions(config, model_config), device, dtype, kernels,
                               config.quant)
    runtime = resolve_runtime(config, model_config, str(path), device, dtype, kernels.name, kernels.cpu_graph)
    torch.set_num_threads(runtime.threads)
    backend = tokenizer.backend_tokenizer  # a lookup, not get_vocab(): a 151k-entry dict leaves ~30 MB behind
    loaded = LoadedModel(
        runtime=runtime, model_config=model_config, model=model, tokenizer=tokenizer,
        token_bytes=TokenBytes(tokenizer), generation=generation,
        think_ids=(backend.token_to_id("<think>"), backend.token_to_id("</think>")),
    )
    loader.release_freed_heap()
    return loaded
