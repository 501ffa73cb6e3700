"""What a serving process keeps resident beside the weights: no module it does not run, no tokenizer leftovers."""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import llguidance
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import EOS_IDS, IM_END_ID, VOCAB_SIZE
from nanoqwen.engine.grammar import _Vocabulary
from nanoqwen.loader import load_tokenizer, release_pages
from nanoqwen.text import TokenBytes

REPO = Path(__file__).resolve().parents[1]
# torch.compile's stack: ~0.19 GB resident once imported (dynamo, inductor, sympy, and triton where installed)
COMPILE_STACK = ("torch._dynamo", "torch._inductor", "sympy", "triton")

SERVE = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import nanoqwen.api.app
from engine_util import collect, load_engine
from nanoqwen.engine import SamplingParams

imported = {{"imports": [m for m in {stack!r} if m in sys.modules]}}
engine = load_engine({path!r}, kernels="auto", graph="auto")  # cpugraph on the CPU, as served
grammar = engine.grammars.json_schema({{"type": "object"}}, strict=False, param="response_format")
params = SamplingParams(temperature=0.0, max_tokens=4, grammar=grammar)
_, stream = engine.submit([9707, 1879], params, split_reasoning=False)  # constrained from the first token
engine.drain_inbox()
while engine.scheduler.has_work:
    engine.step()
assert collect(stream).choices[0].text.startswith("{{")  # the mask was filled and applied
imported["served"] = [m for m in {stack!r} if m in sys.modules]
print(json.dumps(imported))
"""

PREFILL_LENGTHS = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import nanoqwen  # first, as server.py does
from engine_util import generate, greedy, load_engine
from nanoqwen.engine.grammar_cache import heap_used

engine = load_engine({path!r}, dtype="bfloat16", kernels="auto")
allocated = []
for length in range(40, 40 + 2 * {lengths}):  # past the C linears' 32 rows: torch's bf16 GEMM
    assert generate(engine, [[1000 + length] * length], greedy(1))[0].error is None
    if length - 40 + 1 in ({lengths}, 2 * {lengths}):
        allocated.append(heap_used())
print(json.dumps(allocated))
"""


def test_engine_and_api_import_no_compile_stack(tiny_checkpoint):
    """Importing the API and the engine, loading a model on the CPU and decoding under a grammar
    (graph auto: the CPU graphs) never imports torch.compile's machinery: llguidance.torch would (its module runs
    a torch.compile decorator), and so would Module.to_empty() of a meta model (sympy) and a CPU graph
    capture's dispatch mode wrapped by torch._disable_dynamo."""
    script = SERVE.format(repo=str(REPO), tests=str(REPO / "tests"), stack=COMPILE_STACK, path=str(tiny_checkpoint))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"imports": [], "served": []}


def test_bf16_prefill_lengths_keep_malloc_bounded(tiny_checkpoint):
    """Every distinct prompt length gives torch's bf16 GEMMs new shapes, each a oneDNN primitive that ideep's cache and
    oneDNN's keep (1024 entries each by default, ~0.25 MB an entry even at the tiny checkpoint's shapes): the bytes
    malloc holds grew 222 MB over 100 more lengths. nanoqwen bounds both caches, so once 50 lengths filled them the
    next 50 add next to nothing (they added ~110 MB). Counted in malloc's bytes in use (mallinfo2), not RSS: what
    glibc keeps free is not counted, so the figure is the same run to run. A fresh process: the caches are per
    process, their size read once."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("torch's bf16 GEMMs here widen to fp32 (ops/cpu/linear.py): MKL's sgemm, no oneDNN cache to bound")
    script = PREFILL_LENGTHS.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(tiny_checkpoint), lengths=50)
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    filled, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after - filled < 32 << 20


def test_an_ideep_cache_of_0_is_refused_at_import() -> None:
    """LRU_CACHE_CAPACITY=0 ("no cache"), or any value atoi reads as 0, segfaults torch's ideep at its first bf16 GEMM:
    a worker's crash at its first prefill. nanoqwen refuses it at import, in words."""
    # each segfaulted ideep (it reads the value as atoi does: strtol's long, clamped, cast to a 32-bit int)
    for zero in ("0", " 00", "abc", "0.5", "", "4294967296", "-4294967296", "-99999999999999999999", "\xa05", "\u0665",
                 "\x1c5", "-" + "1" * 5000):
        out = subprocess.run([sys.executable, "-c", "import nanoqwen"], env={**os.environ, "LRU_CACHE_CAPACITY": zero},
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 1 and "reads as 0, which crashes torch's ideep" in out.stderr, out.stderr[-2000:]
    for kept in ("10", "1" * 5000):  # the second: a long's largest, -1 as an int (no cap): ideep runs
        assert subprocess.run([sys.executable, "-c", "import nanoqwen"], env={**os.environ, "LRU_CACHE_CAPACITY": kept},
                              timeout=120, cwd=REPO).returncode == 0, kept


def test_grammar_vocabulary_equals_llguidance_reading_tokenizer_json(tiny_checkpoint):
    """The LLTokenizer built from our tokenizer (no second Rust tokenizer) has the token table llguidance
    derives from tokenizer.json: the same bytes and special flag for every id, the same tokenisation of text without
    markup; markup (an added token's text) as ordinary tokens, where llguidance's reading (1.9) takes the special
    token that its matcher then refuses (grammar.py's _Vocabulary.__call__)."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    reference = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=VOCAB_SIZE, eos_token=EOS_IDS)
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS))
    ours = llguidance.LLTokenizer(wrapper, n_vocab=VOCAB_SIZE, eos_token=EOS_IDS)
    assert (ours.vocab_size, ours.eos_tokens, ours.is_canonical) == (VOCAB_SIZE, EOS_IDS, reference.is_canonical)
    for token_id in range(VOCAB_SIZE):
        assert ours.decode_bytes([token_id]) == reference.decode_bytes([token_id]), token_id
        assert ours.is_special_token(token_id) == reference.is_special_token(token_id), token_id
    for text in ["hello world ", '{"a": [1, 2.5]}', "  é\n\n\U0001f600"]:
        assert ours.tokenize_str(text) == reference.tokenize_str(text)
        assert ours.tokenize_bytes(text.encode()[:-1]) == reference.tokenize_bytes(text.encode()[:-1])
    for text in ["hello world <think>", "<|im_end|> x"]:
        tokens = ours.tokenize_str(text)
        assert not any(ours.is_special_token(t) for t in tokens) and ours.decode_bytes(tokens) == text.encode()


def test_tokenizer_keeps_no_python_vocabulary(tiny_checkpoint):
    """transformers 5 keeps the vocab dict and merge list a Qwen2Tokenizer was built from (~90 MB for
    151k tokens); the loader drops them, and the tokenizer still encodes, decodes and lists its specials."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    large = [name for name, value in vars(tokenizer).items() if isinstance(value, (dict, list)) and len(value) >= 256]
    assert large == []
    ids = tokenizer.encode("hello <think> world")
    assert tokenizer.decode(ids) == "hello <think> world"
    assert tokenizer.eos_token_id == IM_END_ID and IM_END_ID in tokenizer.all_special_ids


def _rss_file() -> int:
    """This process's file-backed resident bytes."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssFile:"))


def test_release_pages_drops_only_the_whole_pages_inside_a_tensor():
    page = mmap.PAGESIZE
    base = torch.full((6 * page,), 7, dtype=torch.uint8)
    start = -(-base.data_ptr() // page) * page - base.data_ptr() + 100  # 100 bytes into a page
    view = base[start:start + 3 * page]  # covers 2 whole pages, and parts of 2 others
    release_pages(view)  # anonymous memory: a dropped page reads back as zeros
    dropped = (base == 0).nonzero().flatten()
    first = start - 100 + page
    assert dropped.tolist() == list(range(first, first + 2 * page))


def test_loading_leaves_no_checkpoint_page_resident(tmp_path):
    """A checkpoint tensor read and released no longer holds the file's pages in this process."""
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(16 << 20, dtype=torch.float32)}, str(path))  # 64 MB
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensor = f.get_tensor("w")
        before = _rss_file()
        assert tensor.sum().item() == 16 << 20
        assert _rss_file() - before > 48 << 20  # read: the file's pages are resident
        release_pages(tensor)
        assert _rss_file() - before < 8 << 20
