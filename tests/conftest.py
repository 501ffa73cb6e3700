import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when
# triton is imported (transformers and the kernels import it), so set it before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from checkpoints import load_hf_model, make_checkpoint  # noqa: E402


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
