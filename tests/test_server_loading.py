"""The worker while its model loads, through `gunicorn -k gevent`: what holds the GIL, and so /health's "loading"
answers."""
from __future__ import annotations

import re
from pathlib import Path

from chat_http import cpu_env
from checkpoints import make_checkpoint
from server_process import GunicornServer

CONFIG = Path(__file__).with_name("gunicorn_collections.py")


def test_the_loads_collections_do_not_walk_the_imports(tmp_path: Path) -> None:
    """Each full collection while the model loads (one at least: the freeze's at its end) finds the imports' objects
    frozen already: walking them held the GIL for ~130 ms of CPU a time, 4-6 times a load."""
    with GunicornServer(cpu_env(make_checkpoint()), tmp_path / "gunicorn.log", args=["-c", str(CONFIG)]) as srv:
        frozen = [int(n) for n in re.findall(r"^load collection: frozen (\d+)$", srv.log(), re.MULTILINE)]
    assert frozen and min(frozen) > 100_000, frozen  # torch, transformers, gevent: ~210k
