"""What a CPU execution mode's server is checked for beside its greedy tokens: test_server_modes' modes, and
test_deploy's compile-mode server (chunked at a 5-token budget: test_server_modes' chunked mode under torch.compile)."""
from __future__ import annotations

import re

import openai
import pytest
import requests

from chat_http import MODEL
from server_process import GunicornServer

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1037)), [151644, 872, 198]]
NEW_TOKENS = 8


def reports_its_replay_and_serves_a_grammar(srv: GunicornServer) -> None:
    """/health says how each batch bucket's decode step runs: on cpugraph (max_batch 4) each of 1, 2 and 4 rows is one
    call into csrc/replay.c (its recordings packed: test_cpu_graph's cpugraph_engine), in another mode none replays."""
    info = requests.get(f"{srv.url}/health", timeout=10).json()["model_info"]
    assert info["cpu_replay"] == ({"replay.c": [1, 2, 4]} if info["graph"] == "cpugraph" else None), info
    _serves_a_grammar(srv)


def _serves_a_grammar(srv: GunicornServer) -> None:
    """Each mode's steps take their grammar masks from the mask thread: two constrained prompts in one step; a matcher
    that errs mid-answer (`a{100000}`'s lexer, out of fuel after a token or two) fails its request with the 400
    naming its field, in each mode's step, and the next is served."""
    client = srv.openai_client(timeout=300)
    for _ in range(2):
        texts = [c.text for c in client.completions.create(
            model=MODEL, prompt=[PROMPTS[0]] * 2, max_tokens=8, temperature=0, n=1,
            extra_body={"structured_outputs": {"regex": "[ab]{2,4}x"}}).choices]
        assert len(texts) == 2 and all(re.fullmatch("[ab]{2,4}x", text) for text in texts), texts
        with pytest.raises(openai.BadRequestError) as failed:
            client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                      extra_body={"structured_outputs": {"regex": "a{100000}"}})
        assert failed.value.body["param"] == "structured_outputs.regex", failed.value.body
