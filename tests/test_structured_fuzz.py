"""A short run of profiles/fuzz_schemas.py through the shared gunicorn server: random strict JSON Schemas' ended
answers validate (`jsonschema`), a keyword the engine cannot enforce put in one is a 400 naming it, random regexes'
answers match, each bound's grammar a 400 naming the field, and /health held no longer than HELD_S meanwhile."""
from __future__ import annotations

import random
import sys

from chat_http import HELD_S, health_polled, most_held
from server_process import REPO_ROOT, GunicornServer

sys.path.insert(0, str(REPO_ROOT / "profiles"))
from fuzz_schemas import Fuzz  # noqa: E402


def test_fuzzed_schemas_and_regexes_are_followed_or_refused_naming_the_keyword(server: GunicornServer) -> None:
    fuzz = Fuzz(server, random.Random(3))
    with health_polled(server, 0.01) as polls:
        fuzz.bounds()
        fuzz.schemas(6)
        fuzz.regexes(3)
    assert not fuzz.failures
    assert fuzz.passed >= 5 + 6 + 2  # each bound, each schema's refused keyword, answers that ended
    assert max(p.held for p in polls) <= HELD_S, most_held(polls)
