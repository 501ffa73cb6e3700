"""One device step: packed inputs (inputs.py) -> the model, eager or from a graph (graphs.py) ->
the sampler, whose per-row settings are staged by sampling.py; runner.py orders them."""
from nanoqwen.config import kv_bytes_per_token
from nanoqwen.runner.inputs import batch_buckets
from nanoqwen.runner.runner import ModelRunner
from nanoqwen.runner.sampling import StepOutput

__all__ = ["ModelRunner", "StepOutput", "batch_buckets", "kv_bytes_per_token"]
