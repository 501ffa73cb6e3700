from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when
# triton is imported (transformers and the kernels import it), so set it before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from checkpoints import load_hf_model, make_checkpoint  # noqa: E402
from suite_order import file_order  # noqa: E402

if TYPE_CHECKING:
    import openai

    from server_process import GunicornServer


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """With pytest-xdist (the test extra), the whole suite (no paths given: the README's and CI's command) runs in two
    processes, its files shared out (`--dist loadfile`: a module's tests and its servers stay in one), where alone it
    kept one core of two busy. Named files or tests, `-n`, `-s`, `--pdb` or `--trace`, or no xdist (the GPU machine's
    pytest): this process alone, as asked."""
    option = config.option
    if (config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput")  # a worker starts none
            and option.numprocesses is None
            and config.args_source is pytest.Config.ArgsSource.TESTPATHS and option.capture != "no"
            and not option.usepdb and not option.trace and len(os.sched_getaffinity(0)) >= 2):
        option.numprocesses, option.dist = 2, "loadfile"
        option.loadscopereorder = False  # the files in the order the workers collect them (suite_order.py)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the files in suite_order's order (each file's tests in theirs): the collection the
    workers send is the order in which the files are handed out."""
    if hasattr(config, "workerinput"):
        rank = {name: i for i, name in enumerate(file_order([item.path.name for item in items]))}
        items.sort(key=lambda item: rank[item.path.name])


# Checkpoint fixtures are directories in the shared .cache/fixtures/: treat them as read-only.
@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The default 2-layer random Qwen3 checkpoint: tied embeddings, top-level rope_theta, one file."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def tiny_checkpoint_untied() -> Path:
    """Untied lm_head, transformers-5 `rope_parameters`, several safetensors shards with an index."""
    return make_checkpoint(tie_word_embeddings=False, rope_style="parameters", max_shard_size="2MB")


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path], torch.nn.Module]:
    """hf_model(path): transformers' fp32 eval-mode model for a checkpoint, loaded once per path."""
    return load_hf_model


@pytest.fixture(scope="session")
def hf(tiny_checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module]) -> torch.nn.Module:
    """transformers' model of the tiny checkpoint: the reference of the engine tests."""
    return hf_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """The tiny checkpoint served with a 1024-token context, started once a test process for the modules whose tests
    leave no state behind that another's could see (counters read only as deltas around a test's own requests, each
    test ending with the engine idle; no first-request effects)."""
    from chat_http import CHAT_SERVER_MAX_MODEL_LEN, cpu_env  # here: runs without a server import no openai
    from server_process import GunicornServer

    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN=str(CHAT_SERVER_MAX_MODEL_LEN))
    with GunicornServer(env, tmp_path_factory.mktemp("chat") / "gunicorn.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def server(chat_server: GunicornServer) -> GunicornServer:
    """A test module's server: the shared chat_server, unless the module defines a `server` of its own."""
    return chat_server


@pytest.fixture(scope="module")
def client(server: GunicornServer) -> openai.OpenAI:
    """The openai client of the module's `server`."""
    return server.openai_client()
