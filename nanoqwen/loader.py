"""Checkpoint directory or Hub id -> a Qwen3 model with its weights, tokenizer and generation config."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nanoqwen.config import ModelConfig
from nanoqwen.hugepages import move_into_huge_pages
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.quant import quantize_int4_into, quantize_int8_into
from ops import Kernels

# A quantised weight's dtype -> its sibling parameters (per output row) and the function filling them.
QUANTISED = {torch.int8: (("scale",), quantize_int8_into), torch.uint8: (("scale", "offset"), quantize_int4_into)}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.tiktoken", "*.jinja"]
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# What transformers 5's BPE tokenizers (Qwen2Tokenizer) keep of the vocabulary and merges they built their Rust
# backend from, and never read again: as Python objects ~90 MB resident for Qwen3's 151k tokens.
TOKENIZER_BUILD_INPUTS = ("_vocab", "_merges")
# huggingface_hub's cache layout: <cache>/models--<org>--<name>/snapshots/<revision>
HUB_SNAPSHOT = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/[^/]+/?$")


class ModelLoadError(RuntimeError):
    pass


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def sampling(self) -> dict[str, float | int]:
        """The sampling defaults the checkpoint sets (what vLLM's `--generation-config auto` applies)."""
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _is_local(model: str) -> bool:
    """Whether `model` names a filesystem path rather than a Hub repo id."""
    path = Path(model).expanduser()
    return path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def hub_repo_id(model: str) -> str | None:
    """The Hub repo `model` (NANOQWEN_MODEL) serves: itself when it is a repo id, the repo of a Hub
    cache snapshot directory, or None for any other local directory."""
    if _is_local(model):
        match = HUB_SNAPSHOT.search(str(Path(model).expanduser().absolute()))
        return f"{match[1]}/{match[2]}" if match else None
    return model


def checkpoint_name(model: str) -> str:
    """A public name for the checkpoint, never its path: the Hub repo id, else the directory's name."""
    return hub_repo_id(model) or Path(model).expanduser().absolute().name


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id fetched through huggingface_hub's cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _is_local(model):
        raise ModelLoadError(f"model directory {model!r} does not exist (NANOQWEN_MODEL must be a local "
                             f"checkpoint directory or a Hub repo id such as Qwen/Qwen3-0.6B)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated, interrupted download: one clear message
        raise ModelLoadError(
            f"could not get {model!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"Without network access, download the checkpoint elsewhere and point NANOQWEN_MODEL at "
            f"its local directory (it needs config.json, *.safetensors and the tokenizer files)."
        ) from None


def check_files(path: Path) -> list[Path]:
    """The safetensors shards, after checking that every file the runtime needs is present."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
        missing += [s.name for s in shards if not s.is_file()]
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            missing.append("model.safetensors (or model.safetensors.index.json with its shards)")
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise ModelLoadError(
            f"checkpoint directory {str(path)!r} is missing {', '.join(missing)}; point NANOQWEN_MODEL at a "
            f"complete Qwen3 checkpoint directory or a Hub repo id"
        )
    return shards


def load_model_config(path: Path) -> ModelConfig:
    try:
        config = ModelConfig.from_file(path / "config.json")
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not a usable Qwen3 config: {exc}") from None
    raw = json.loads((path / "config.json").read_text())
    if raw.get("attention_bias"):
        raise ModelLoadError(f"{path}: attention_bias=true is not supported (Qwen3 has none)")
    return config


def load_generation_defaults(path: Path, tokenizer) -> GenerationDefaults:
    raw = {}
    if (path / "generation_config.json").is_file():
        raw = json.loads((path / "generation_config.json").read_text())
    eos = raw.get("eos_token_id", [])
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    return GenerationDefaults(
        eos_token_ids=sorted(set(eos_ids)),
        temperature=raw.get("temperature"),
        top_p=raw.get("top_p"),
        top_k=raw.get("top_k"),
        min_p=raw.get("min_p"),
        repetition_penalty=raw.get("repetition_penalty"),
    )


def load_weights(model: Qwen3ForCausalLM, shards: list[Path]) -> None:
    """Copies each checkpoint tensor straight into its (preallocated) parameter slice; into a quantised
    parameter (QUANTISED) it is quantised on the way, its scales (and offsets) going to the sibling
    parameters, so no more than one checkpoint tensor is ever held beside the model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # scales and offsets are filled with their weight
    pending = {name: p for name, p in params.items() if not name.endswith((".scale", ".offset"))}
    pending_shards: dict[str, set[int]] = {}
    tied = model.config.tie_word_embeddings
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping: no __iter__)
                if tied and key == "lm_head.weight":
                    continue
                module_path, _, leaf = key.rpartition(".")
                parent, _, module = module_path.rpartition(".")
                if module in Qwen3ForCausalLM.packed:
                    target, shard_id = Qwen3ForCausalLM.packed[module]
                    name = f"{parent}.{target}.{leaf}"
                else:
                    name, shard_id = key, None
                param = params.get(name)
                if param is None:
                    continue  # e.g. rotary inv_freq buffers in old checkpoints
                tensor = f.get_tensor(key)
                dest = param.data
                siblings, quantize = QUANTISED.get(dest.dtype, ((), None))
                aux = [params[name.removesuffix("weight") + sibling].data for sibling in siblings]
                if shard_id is not None:
                    sizes = packed_sizes(model, name)
                    start = sum(sizes[:shard_id])
                    # per-row quantisation: a shard quantises alone as it would in the packed matrix
                    dest, *aux = (t.narrow(0, start, sizes[shard_id]) for t in (dest, *aux))
                    pending_shards.setdefault(name, set()).add(shard_id)
                    if len(pending_shards[name]) == len(sizes):
                        pending.pop(name, None)
                else:
                    pending.pop(name, None)
                expected = (dest.shape[0], dest.shape[1] * 2) if dest.dtype == torch.uint8 else tuple(dest.shape)
                if tuple(tensor.shape) != tuple(expected):  # int4: two columns a byte
                    raise ModelLoadError(f"{shard.name}: {key} has shape {tuple(tensor.shape)}, "
                                         f"the model expects {tuple(expected)}")
                if quantize is None:
                    dest.copy_(tensor)
                else:
                    quantize(tensor, dest, *aux)
                release_pages(tensor)
                del tensor
    if tied:
        pending.pop("lm_head.weight", None)
    if pending:
        raise ModelLoadError(f"checkpoint lacks weights for: {', '.join(sorted(pending)[:8])}")


def packed_sizes(model: Qwen3ForCausalLM, name: str) -> list[int]:
    if name.endswith("qkv_proj.weight"):
        return model.model.layers[0].self_attn.qkv_sizes
    intermediate = model.config.intermediate_size
    return [intermediate, intermediate]


def build_model(config: ModelConfig, shards: list[Path], max_positions: int, device: torch.device,
                dtype: torch.dtype, kernels: Kernels, quant: str = "none") -> Qwen3ForCausalLM:
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, max_positions, kernels, quant)
    # to_empty() without its torch.empty_like: on a meta tensor that runs torch's Python reference, whose
    # first call imports sympy (~34 MB resident). int8/uint8 weights stay integers.
    model = model.to(dtype=dtype)._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.tie_weights()  # materialising breaks the sharing; restore it
    move_into_huge_pages(model)  # before the weights are written: their first touch makes the huge pages
    load_weights(model, shards)
    for param in model.parameters():  # each int4 weight whole (after every shard), in place
        if param.dtype == torch.uint8:
            kernels.repack_int4(param.data)
    model.rotary.build(device)
    return model.eval().requires_grad_(False)


def release_pages(tensor: torch.Tensor) -> None:
    """Drops the whole pages of a CPU tensor no longer needed from this process. A checkpoint tensor is a view
    of safetensors' private mapping of the file: each one read stays resident (file-backed) until the file
    closes, so the load's peak held the whole checkpoint beside the model (+1.19 GB for Qwen3-0.6B in bf16).
    The pages stay in the page cache; a no-op where madvise is missing."""
    if not hasattr(mmap, "MADV_DONTNEED") or tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # inward: neighbours share the edge pages
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def release_freed_heap() -> None:
    """Returns the heap that loading freed (the tokenizer's JSON parse, quantisation chunks) to the OS:
    glibc keeps freed blocks in its arenas, ~0.1 GB of resident memory after a load. Elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    # A long prompt's pieces encoded on every core starve the model's threads: beside two 7.5 MB chat prompts a
    # short chat waited 1.1 s, 20 ms with the tokenizer on its calling thread (read at each call: settable later).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer from {path}: {exc}") from None
    for name in TOKENIZER_BUILD_INPUTS:
        if isinstance(getattr(tokenizer, name, None), (dict, list)):
            delattr(tokenizer, name)
    return tokenizer
