"""Every "auto" and derived size is decided once, by config.resolve_runtime; every request limit is
checked once, by engine.validation, naming the parameter the API reports."""
from __future__ import annotations

import logging

import pytest
import torch

from nanoqwen.config import ModelConfig, kv_bytes_per_token, resolve_runtime
from nanoqwen.engine.request import SamplingParams
from nanoqwen.engine.validation import (
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    InvalidRequest,
    PromptTooLongError,
    validate_request,
)
from nanoqwen.settings import EngineConfig, SpeculativeConfig

CPU = torch.device("cpu")
MODEL = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                    rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True,
                    torch_dtype="bfloat16")


def resolve(cpu_graph: bool = False, **settings):
    return resolve_runtime(EngineConfig(model="unused", **settings), MODEL, "/ckpt", CPU, torch.float32, "torch",
                           cpu_graph)


def test_auto_settings_on_the_cpu():
    runtime = resolve(threads=3)
    assert (runtime.kernels, runtime.graph, runtime.threads) == ("torch", "none", 3)
    assert runtime.max_model_len == MODEL.max_position_embeddings
    # where the kernel set's decode step is C calls alone, auto replays it as a CPU graph
    assert resolve(cpu_graph=True).graph == "cpugraph"
    assert resolve(cpu_graph=True, graph="none").graph == "none"


def test_the_pool_is_capped_at_what_max_batch_sequences_can_use():
    runtime = resolve(max_batch=2, max_model_len=100, block_size=16)
    assert runtime.max_model_len == 100 and runtime.num_kv_blocks == 1 + 2 * 7


def test_a_small_pool_lowers_max_model_len(caplog):
    per_block = kv_bytes_per_token(MODEL, torch.float32) * 16
    with caplog.at_level(logging.WARNING, logger="nanoqwen"):
        runtime = resolve(kv_cache_memory=per_block * 9, block_size=16)
    assert runtime.num_kv_blocks == 9 and runtime.max_model_len == runtime.kv_cache_tokens == 128
    assert "max_model_len lowered" in caplog.text


def test_a_max_model_len_past_the_model_s_positions_is_lowered_saying_so(caplog):
    with caplog.at_level(logging.WARNING, logger="nanoqwen"):
        runtime = resolve(max_model_len=MODEL.max_position_embeddings + 1)
    assert runtime.max_model_len == MODEL.max_position_embeddings
    assert "NANOQWEN_MAX_MODEL_LEN=4097 is past the model's 4096 positions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanoqwen"):
        assert resolve(max_model_len=MODEL.max_position_embeddings).max_model_len == MODEL.max_position_embeddings
    assert not caplog.text


def test_settings_the_device_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="cudagraph needs a CUDA device"):
        resolve(graph="cudagraph")
    with pytest.raises(ValueError, match="cpugraph needs the C kernels"):
        resolve(graph="cpugraph")
    with pytest.raises(ValueError, match="too small"):
        resolve(num_kv_blocks=1)


def test_info_is_what_health_and_the_fingerprint_read():
    info = resolve(max_batch=4, max_model_len=256, num_kv_blocks=20, threads=1, quant="int8").info()
    assert info == {"model_path": "/ckpt", "device": "cpu", "dtype": "float32", "kernels": "torch", "quant": "int8",
                    "float_gemv": False, "graph": "none", "max_batch": 4, "max_model_len": 256, "block_size": 16,
                    "num_kv_blocks": 20, "threads": 1, "speculative": None}
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert resolve(speculative_config=spec).info()["speculative"] == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 5}
    config = EngineConfig(model="unused", speculative_config=spec)
    assert resolve_runtime(config, MODEL, "/ckpt", CPU, torch.float32, "torch", False).speculative == \
        SpeculativeConfig("ngram", 3, 5, 5)


LIMITS = {"vocab_size": 1000, "max_model_len": 64, "max_batch": 4}


@pytest.mark.parametrize("param, params", [
    ("n", SamplingParams(n=5)),
    ("stop", SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))),
    ("top_logprobs", SamplingParams(top_logprobs=MAX_TOP_LOGPROBS + 1)),
    ("max_tokens", SamplingParams(max_tokens=0)),
    ("top_p", SamplingParams(top_p=-0.1)),
])
def test_each_limit_names_its_parameter(param, params):
    with pytest.raises(InvalidRequest) as info:
        validate_request([1, 2, 3], params, **LIMITS)
    assert info.value.param == param


def test_an_out_of_vocabulary_error_names_at_most_five_ids():
    with pytest.raises(InvalidRequest) as info:
        validate_request([1], SamplingParams(stop_token_ids=[5, *range(1000, 1000 + 10**5)]), **LIMITS)
    assert str(info.value) == "stop_token_ids [1000, 1001, 1002, 1003, 1004, … (100000 in all)] are not in [0, 1000)"
    with pytest.raises(InvalidRequest, match=r"logit_bias token ids \[1000, 1001\] are"):
        validate_request([1], SamplingParams(logit_bias={1000: 1, 5: 1, 1001: 1}), **LIMITS)


def test_the_context_check_counts_prompt_and_completion():
    validate_request([1] * 60, SamplingParams(max_tokens=4), **LIMITS)
    with pytest.raises(InvalidRequest) as info:
        validate_request([1] * 60, SamplingParams(max_tokens=5), **LIMITS)
    assert info.value.code == "context_length_exceeded" and "you requested 65 tokens" in str(info.value)
    with pytest.raises(InvalidRequest, match="leaving none for the completion"):
        validate_request([1] * 64, SamplingParams(), **LIMITS)
    assert isinstance(PromptTooLongError(70), InvalidRequest)


def test_the_cpu_kernel_settings_come_from_the_engine_config():
    config = EngineConfig.from_env({"NANOQWEN_CPU_KERNELS": "0", "NANOQWEN_CACHE_DIR": "/tmp/kernels"})
    assert (config.cpu_kernels, config.cache_dir) == (False, "/tmp/kernels")
    assert EngineConfig.from_env({}).cpu_kernels


def test_the_cpu_isa_cap_is_a_checked_setting():
    assert EngineConfig().cpu_isa == "auto"
    assert EngineConfig.from_env({"NANOQWEN_CPU_ISA": "avx2"}).cpu_isa == "avx2"
    with pytest.raises(ValueError, match="cpu_isa must be one of auto, avx2, avx512; got 'amx'"):
        EngineConfig(cpu_isa="amx")
