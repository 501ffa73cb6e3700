"""The Triton versions nanoqwen supports: 3.6 (the GPU machine's) up to the newest (what CI installs).

Without a GPU, each supported Triton must compile every kernel for sm_90 down to a cubin
(tests/triton_hopper.py), and run the kernel tests under its interpreter. The installed (newest)
Triton does both in every run, every case of tests/test_kernels.py; the oldest does when it is installed beside
it, in a folder of its own that PYTHONPATH puts first: `pip install --target .cache/triton-3.6 triton==3.6.0`
(about 640 MB; NANOQWEN_OLDEST_TRITON names another folder), each kernel test in one case per dtype (ONE_CASE_EACH).
It is a separate install because pip holds one version per environment, and CI can afford it once per run: one wheel
download, ~30-40 s of tests on 2 cores.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
OLDEST = "3.6.0"
OLDEST_DIR = Path(os.environ.get("NANOQWEN_OLDEST_TRITON", REPO / ".cache" / "triton-3.6"))

pytestmark = pytest.mark.slow

# What the oldest Triton interprets of tests/test_kernels.py: every test, a parametrized one in one case per dtype
# (dtype0 fp32, dtype1 bf16; the GEMV's in each format's one pass, split-K fp32 and split-K bf16), so that each kernel
# (and its split-K second pass) runs in both dtypes, with masked tails, under the interpreter's bounds check. The
# other cases vary shapes and split counts: the kernels' own arithmetic, which the newest Triton checks in every case.
ONE_CASE_EACH = (
    "test_silu_mul[shape1-dtype0]", "test_silu_mul[shape1-dtype1]",
    "test_rms_norm[True-shape1-dtype0]", "test_rms_norm[False-shape2-dtype1]", "test_rms_norm_strided_rows",
    "test_qk_norm_rope_store[8-2-128-32-dtype0]", "test_qk_norm_rope_store[6-2-32-32-dtype1]",
    "test_decode_attention[None-context_lens2-8-2-16-32-dtype0]",
    "test_decode_attention[3-context_lens1-4-2-128-16-dtype1]",
    "test_decode_attention_split_boundaries[2]", "test_decode_attention_reads_only_the_context",
    "test_a_stale_block_table_reads_out_of_bounds", "test_default_num_splits",
    "test_the_triton_kernel_set_runs_these_kernels",
    "test_prefill_attention[6-2-32-16-32-dtype0]", "test_prefill_attention[4-2-16-4-16-dtype1]",
    "test_prefill_attention_strided_q_reads_only_the_context", "test_prefill_tiles_longest_context_first",
    "test_linear_int8[dtype0-x_shape1-600]", "test_linear_int8[dtype1-x_shape3-33]",
    "test_linear_int4[dtype0-x_shape1-600-128]", "test_linear_int4[dtype1-x_shape3-33-64]",
    *(f"test_gemv[{fmt}-{case}]" for fmt in ("float", "int8", "int4")
      for case in ("3x600-one-pass-bf16", "3x600-split-k-fp32", "8x40-split-k-bf16")),
    "test_gemv_split_scratch_is_one_buffer_per_shape_for_every_row_count",
    "test_a_gemv_rows_output_is_the_same_bits_at_every_row_count[int8]", "test_gemv_plan_fills_the_gpu_at_qwen3_shapes",
    "test_float_gemv_is_the_triton_sets_linear_only_when_chosen", "test_bench_linear_rows_run_and_check_every_kernel",
)
# Not interpreted by the oldest: the GPU's (skipped on the CPU), and one bf16 decode at the bench's larger shape
# (test_decode_attention's kernel and path at 1,024 tokens: 11 s of the interpreter's time at load 8)
LEFT_TO_THE_NEWEST = {"test_decode_attention_bench_shape_in_bounds", "test_decode_attention_qwen3_shapes_gpu",
                      "test_prefill_attention_qwen3_shapes_gpu", "test_decode_attention_cuda_graph_gpu",
                      "test_norm_and_rope_qwen3_shapes_gpu"}


def run(args: list[str], triton_dir: Path | None = None, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_dir), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def assert_compiles_for_hopper(triton_dir: Path | None = None) -> str:
    result = run(["tests/triton_hopper.py"], triton_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "28 kernels compiled for sm_90" in result.stdout
    return result.stdout


def test_the_oldest_triton_s_cases_name_every_kernel_test():
    """A test added to tests/test_kernels.py is interpreted by the oldest Triton, or said not to be."""
    tree = ast.parse((REPO / "tests" / "test_kernels.py").read_text())
    tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    chosen = {case.split("[")[0] for case in ONE_CASE_EACH}
    named = chosen | LEFT_TO_THE_NEWEST
    assert tests == named and not chosen & LEFT_TO_THE_NEWEST, tests ^ named


def test_every_kernel_compiles_for_hopper():
    assert_compiles_for_hopper()


@pytest.mark.skipif(not (OLDEST_DIR / "triton").is_dir(),
                    reason=f"the oldest supported Triton is not installed: pip install --target {OLDEST_DIR} "
                           f"triton=={OLDEST}")
def test_the_oldest_supported_triton_compiles_and_interprets_every_kernel():
    version = run(["-c", "import triton; print(triton.__version__)"], OLDEST_DIR)
    assert version.stdout.strip() == OLDEST, version.stdout + version.stderr
    assert f"triton {OLDEST}:" in assert_compiles_for_hopper(OLDEST_DIR)
    cases = [f"tests/test_kernels.py::{case}" for case in ONE_CASE_EACH]
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *cases], OLDEST_DIR, interpret=True)
    assert tests.returncode == 0, tests.stdout[-5000:]
    assert f"{len(cases)} passed" in tests.stdout and " failed" not in tests.stdout, tests.stdout[-5000:]
