"""The order in which the whole suite's two test processes take its files (conftest: `--dist loadfile`, pytest-xdist's
own reordering off): the longest first, so that the file a process takes last is a short one. xdist's own order, by
test count, handed out the few-test files that start their own servers or compilers last (test_triton_versions: 2
tests, ~110 s), one of which then ran alone while the other process had finished."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

# Longest first, roughly: by their seconds in one process on the 2-core Zen 3 at load 7-14 (profiles/RESULTS.md,
# thirty-ninth session, lanes suite39 and suite39b: quieter figures order some differently; test_workers.py up since
# its respawn test, 44 s, in the forty-third; test_triton_versions.py down from ~66 s (suite44's figure) to ~40 s in
# the forty-fifth, lane suite45; test_deploy.py first, test_server_modes.py down ~23 s, its compile-mode server folded
# into test_deploy's, lane suite45b); a file not named goes after them, in xdist's order
LONGEST_FIRST = (
    "test_deploy.py", "test_server_modes.py", "test_server_structured.py", "test_workers.py", "test_cpu_graph.py",
    "test_server_quant_bf16.py", "test_server.py", "test_server_triton.py", "test_triton_versions.py",
    "test_grammar_rows.py", "test_server_robust.py", "test_kernels.py", "test_conformance.py", "test_nginx.py",
    "test_jit_variants.py", "test_structured_patterns.py", "test_cpu_build.py", "test_server_quant.py",
    "test_server_many_tools.py", "test_step_rows.py", "test_load_holds.py", "test_memory.py", "test_sampler.py",
    "test_sampled_distribution.py", "test_fuzz_openapi.py", "test_cpu_linear_int4.py",
    "test_cpu_attention_split.py", "test_chunked_prefill.py", "test_cpu_sample.py", "test_server_send_timeout.py",
    "test_gbnf.py", "test_server_tls.py", "test_outsider_suites.py", "test_server_streams.py", "test_launches.py",
    "test_lint.py", "test_prompt_logprobs.py", "test_server_stop_logprobs.py", "test_server_stream_hold.py",
    "test_server_disconnect.py",
)


def file_order(files: Sequence[str]) -> list[str]:
    """The distinct names in `files` (a test file's name for each test collected): LONGEST_FIRST's first, in its
    order, then the others by their number of tests, most first (xdist's own order)."""
    tests = Counter(files)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    return sorted(tests, key=lambda name: (rank.get(name, len(rank)), -tests[name]))
