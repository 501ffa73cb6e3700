"""profiles/common.py's engine for the decode profiles: a batch of long prompts decodes together."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import common  # noqa: E402


def test_a_batch_past_the_default_prefill_budget_is_prefilled_in_one_step(tiny_checkpoint):
    """3 prompts of 3,000 tokens (9,000 > the default 8,192 prefill tokens per step) are prefilled together and
    decode as one batch: with the default budget the third waited a step, and decode.py's 8 rows of 2,048 tokens
    raised "a row finished early, was preempted or not prefilled with the others" on the first GPU run."""
    prompt_len, new_tokens = 3000, 3
    engine = common.load_engine(tiny_checkpoint, device="cpu", dtype="float32", graph="none", kernels="torch",
                                max_batch=3, max_model_len=prompt_len + new_tokens)
    run = common.engine_decode(engine, common.random_prompts(3, prompt_len, 0), new_tokens)
    assert len(run.step_s) == new_tokens - 1 and [len(t) for t in run.tokens] == [new_tokens] * 3


# A profile script as they are written: torch imported before common. Prints the policy libgomp read: the one in
# the process's environment when it started (/proc/self/environ), which is what OpenMP saw.
POLICY_PROBE = """
import sys
from pathlib import Path

import torch  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402, F401

started = dict(v.split("=", 1) for v in Path("/proc/self/environ").read_text().split("\\0") if "=" in v)
print(started.get("OMP_WAIT_POLICY", "unset"))
"""


@pytest.mark.parametrize("policy,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_profile_script_runs_with_the_servers_wait_policy(policy, expected):
    """Scripts under profiles/ import torch before nanoqwen (which sets OMP_WAIT_POLICY for the server): common.py
    starts such a script again with PASSIVE, so that its timings are of the policy the server runs; a policy the
    user set is kept."""
    script = REPO_ROOT / "profiles" / "out" / f"policy_probe_{policy}.py"  # git-ignored; one a case: xdist
    script.parent.mkdir(exist_ok=True)
    script.write_text(POLICY_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": policy} if policy else {}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == expected
