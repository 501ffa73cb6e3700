"""Each CPU execution mode through a real `gunicorn -k gevent server:app`: the official openai client gets
transformers' greedy tokens for a batch of different lengths at once. Chunked prefill with a 5-token step
budget (prompts split across steps beside decode rows) in the default mode and under torch.compile, paced
chunks (a 200-token prompt beside decoding streams, its chunks sized from measured step times: the default
prefill_stall), and the decode steps replayed as recorded C calls (cpugraph: each step one call into csrc/replay.c, as
the ready line and /health say), also over a 2100-token context."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chat_http import MODEL, assert_completions_greedy, assert_serves_greedy, completion_texts, cpu_env
from engine_util import shared_tokenizer
from mode_checks import NEW_TOKENS, PROMPTS, reports_its_replay_and_serves_a_grammar
from ops.cpu import build as cpu_build
from server_process import GunicornServer

pytestmark = pytest.mark.slow

needs_c_kernels = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

# over the 64-token budget: prefilled in paced chunks (32 tokens and up) while the others decode
PACED_PROMPTS = [*PROMPTS, list(range(2000, 2200))]
# past 4096 (token, kv head) pairs with the tiny model's 2 kv heads: decode attention splits the context
# across the threads and combines the parts (ops/cpu/csrc/attention.c), in the replayed CPU graph
LONG_PROMPTS = [list(range(3000, 5100)), PROMPTS[0]]
# (server environment beyond cpu_env's, a marker its ready line must hold, the batches of prompts, one after the
# other). cpugraph: PROMPTS (a bucket of 4 with a padded lane), then LONG_PROMPTS on the same server, whose context
# takes them (one server start, not two: a server per batch was the same code path)
MODES = {
    "chunked": ({"NANOQWEN_MAX_STEP_TOKENS": "5"}, (" max_step_tokens=5 ",), [PROMPTS]),
    # every step eager with the C kernels (graph none): the one server that serves them so
    "chunked-paced": ({"NANOQWEN_MAX_STEP_TOKENS": "64", "NANOQWEN_GRAPH": "none"},
                      (" max_step_tokens=64 ", " graph=none "), [PACED_PROMPTS]),
    "cpugraph": ({"NANOQWEN_GRAPH": "cpugraph", "NANOQWEN_MAX_MODEL_LEN": "2304"},
                 (" graph=cpugraph ", " cpu_replay=replay.c:1,2,4 "), [PROMPTS, LONG_PROMPTS]),
}


@pytest.mark.parametrize("mode", [pytest.param(m, marks=needs_c_kernels) if " graph=cpugraph " in MODES[m][1] else m
                                  for m in MODES])
def test_mode_serves_transformers_greedy_tokens(
    mode: str, tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    extra, marker, batches = MODES[mode]
    env = cpu_env(tiny_checkpoint, NANOQWEN_MAX_BATCH="4", **extra)
    assert_serves_greedy(tiny_checkpoint, hf_model, env, tmp_path / "server.log", marker, batches, NEW_TOKENS,
                         reports_its_replay_and_serves_a_grammar)


def test_torch_reference_ops_serve_penalised_requests_as_transformers(
    tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    """NANOQWEN_CPU_KERNELS=0: the torch reference ops serve alone, with the torch sampler, whose apply_penalties
    changes each row's seen tokens only: greedy with a repetition penalty gives transformers' generate with its
    RepetitionPenaltyLogitsProcessor (on prompt and output tokens, as ours), streamed and not; plain greedy too."""
    hf = hf_model(tiny_checkpoint)
    prompts = [[7] * 17, PROMPTS[0]]
    tokenizer = shared_tokenizer(tiny_checkpoint)
    penalised = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=False,
                             repetition_penalty=1.8, attention_mask=torch.ones(1, len(p), dtype=torch.long))
                 for p in prompts]
    expected = [tokenizer.decode(out[0, len(p):].tolist(), skip_special_tokens=False)
                for out, p in zip(penalised, prompts)]
    body = dict(model=MODEL, prompt=prompts, temperature=0, max_tokens=NEW_TOKENS,
                extra_body={"ignore_eos": True, "skip_special_tokens": False, "repetition_penalty": 1.8})
    env = cpu_env(tiny_checkpoint, NANOQWEN_CPU_KERNELS="0", NANOQWEN_MAX_BATCH="2")
    with GunicornServer(env, tmp_path / "server.log") as srv:
        assert_completions_greedy(srv, tiny_checkpoint, hf, prompts, NEW_TOKENS)
        plain = completion_texts(srv, {**body, "extra_body": {"ignore_eos": True, "skip_special_tokens": False}}, False)
        assert plain != expected  # the penalty changes the tokens
        for stream in (False, True):
            assert completion_texts(srv, body, stream) == expected, f"stream={stream}"
