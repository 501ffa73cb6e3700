"""Checkpoint loading: layouts, dtypes, and clear errors for bad model directories."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from checkpoints import QWEN3_GENERATION, make_checkpoint
from nanoqwen import loader
from nanoqwen.config import ModelConfig, resolve_dtype
from nanoqwen.engine import Engine
from nanoqwen.settings import EngineConfig
from waits import wait_for


@pytest.fixture
def broken(tmp_path):
    """A writable copy of the tiny checkpoint to damage."""
    src = make_checkpoint()
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def load_error(path) -> str:
    engine = Engine(EngineConfig(model=str(path), device="cpu"))
    with pytest.raises(loader.ModelLoadError) as info:
        engine.load()
    return str(info.value)


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nope")
    assert "does not exist" in message and "NANOQWEN_MODEL" in message


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    message = load_error(broken)
    assert name in message and str(broken) in message


def test_missing_shard_is_named(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", max_shard_size="2MB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in load_error(path)


def test_missing_weights_are_named(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.1.mlp.down_proj.weight" in load_error(broken)


def test_wrong_shape_is_named(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    message = load_error(broken)
    assert "mlp" in message and "(64, 128)" in message and "(64, 96)" in message


def test_unusable_config(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    assert "config.json" in load_error(broken)


def test_offline_hub_id_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    message = load_error("Qwen/Qwen3-0.6B")
    assert "Qwen/Qwen3-0.6B" in message and "local directory" in message


@pytest.mark.parametrize("setting, kept", [(None, "false"), ("true", "true")])
def test_the_tokenizer_encodes_on_its_calling_thread_unless_told(monkeypatch, setting, kept):
    """Beside two 7.5 MB prompts encoded on every core a short chat waited 1.1 s (20 ms on the calling thread):
    TOKENIZERS_PARALLELISM is off unless the deployment sets it (a wait's length is load's, no test's)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting or "")  # recorded to restore: a delenv of an unset one is not
    if setting is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    loader.load_tokenizer(make_checkpoint())
    assert os.environ["TOKENIZERS_PARALLELISM"] == kept


def test_engine_thread_reports_load_errors(tmp_path):
    engine = Engine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    engine.start()
    wait_for(lambda: engine.load_error is not None, 30, 0.01)
    assert not engine.ready and "does not exist" in engine.load_error


def test_rope_theta_from_either_layout():
    top = ModelConfig.from_file(make_checkpoint() / "config.json")
    nested = ModelConfig.from_file(make_checkpoint(rope_style="parameters", tie_word_embeddings=False,
                                                   max_shard_size="2MB", seed=3) / "config.json")
    assert top.rope_theta == nested.rope_theta == 1_000_000.0
    assert top.tie_word_embeddings and not nested.tie_word_embeddings


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", "bfloat16", cpu) == torch.float32
    assert resolve_dtype("float16", "bfloat16", cpu) == torch.float16
    assert resolve_dtype("auto", "float32", cpu) == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_land_in_packed_parameters(dtype):
    from safetensors.torch import load_file

    path = make_checkpoint()
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype=str(dtype).removeprefix("torch.")))
    engine.load()
    raw = load_file(path / "model.safetensors")
    attn = engine.runner.model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_sizes)
    assert attn.qkv_proj.weight.dtype == dtype
    torch.testing.assert_close(k, raw["model.layers.1.self_attn.k_proj.weight"].to(dtype))
    torch.testing.assert_close(v, raw["model.layers.1.self_attn.v_proj.weight"].to(dtype))
    gate, up = engine.runner.model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    torch.testing.assert_close(up, raw["model.layers.0.mlp.up_proj.weight"].to(dtype))
    model = engine.runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_engine_config_from_env():
    config = EngineConfig.from_env({"NANOQWEN_MAX_BATCH": "4", "NANOQWEN_DTYPE": "float32",
                                    "NANOQWEN_ENABLE_PREFIX_CACHING": "false"})
    assert config.max_batch == 4 and config.dtype == "float32" and not config.enable_prefix_caching
    with pytest.raises(ValueError, match="NANOQWEN_MAX_BATCH"):
        EngineConfig.from_env({"NANOQWEN_MAX_BATCH": "many"})
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig.from_env({"NANOQWEN_DTYPE": "int3"})
    assert EngineConfig.from_env({}).generation_config == "auto"
    assert EngineConfig.from_env({"NANOQWEN_GENERATION_CONFIG": "none"}).generation_config == "none"
    with pytest.raises(ValueError, match="generation_config"):
        EngineConfig.from_env({"NANOQWEN_GENERATION_CONFIG": "vllm"})


@pytest.mark.parametrize("raw,on", [("1", True), (" On ", True), ("YES", True), ("true", True), ("0", False),
                                    ("off", False), ("No", False), ("FALSE", False)])
def test_a_switch_reads_its_words_either_way(raw, on):
    config = EngineConfig.from_env({"NANOQWEN_ENABLE_PREFIX_CACHING": raw, "NANOQWEN_CPU_KERNELS": raw})
    assert config.enable_prefix_caching is on and config.cpu_kernels is on


@pytest.mark.parametrize("name,raw,message", [
    # a switch's typo was read as off
    ("ENABLE_PREFIX_CACHING", "enabled", "NANOQWEN_ENABLE_PREFIX_CACHING='enabled' is not a valid bool"),
    ("CPU_KERNELS", "2", "NANOQWEN_CPU_KERNELS='2' is not a valid bool"),
    ("FLOAT_GEMV", "y", "NANOQWEN_FLOAT_GEMV='y' is not a valid bool"),
    # the pacer's arithmetic failed every request in flight at a long prompt's first paced chunk
    ("PREFILL_STALL", "inf", "prefill_stall must be a finite number"),
    ("PREFILL_STALL", "nan", "prefill_stall must be a finite number"),
    # the device's default pool, silently; inf an OverflowError at the load
    ("KV_CACHE_MEMORY", "-1", "kv_cache_memory must be a finite number"),
    ("KV_CACHE_MEMORY", "nan", "kv_cache_memory must be a finite number"),
    ("KV_CACHE_MEMORY", "inf", "kv_cache_memory must be a finite number"),
    ("NUM_KV_BLOCKS", "-3", "num_kv_blocks must be 0"),
    # no bound at all on the cached grammars' bytes, where one request's may hold 15 MB
    ("GRAMMAR_CACHE_MEMORY", "0", "grammar_cache_memory must be at least 1"),
])
def test_a_bad_engine_setting_is_refused_naming_it(name, raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig.from_env({f"NANOQWEN_{name}": raw})


def test_generation_config_sampling_defaults():
    from transformers import AutoTokenizer

    path = make_checkpoint(generation=QWEN3_GENERATION)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    defaults = loader.load_generation_defaults(path, tokenizer)
    assert defaults.sampling() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}  # not do_sample, not eos
    assert loader.load_generation_defaults(make_checkpoint(), tokenizer).sampling() == {}


@pytest.mark.parametrize("model, hub_id, name", [
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("/hf/hub/models--Qwen--Qwen3-0.6B/snapshots/c1899de2", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("/srv/models/my-qwen/", None, "my-qwen"),
    ("./my-qwen", None, "my-qwen"),
])
def test_checkpoint_names_are_never_paths(model, hub_id, name):
    assert loader.hub_repo_id(model) == hub_id and loader.checkpoint_name(model) == name
