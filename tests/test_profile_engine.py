"""profiles/common.py's engine for the decode profiles: a batch of long prompts decodes together."""
from __future__ import annotations

import sys

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
