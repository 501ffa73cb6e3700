"""nanoqwen: a small, fast, OpenAI-compatible inference server for Qwen3."""
import os

# Read by OpenMP when torch loads, so it is decided here, before any import of torch. With drafts, a step
# alternates small torch ops with the C kernels' own thread pool, and OpenMP's threads spinning after each op take
# the cores that pool needs: a verify step at batch 1 costs 25-40% less with them asleep (profiles/RESULTS.md,
# "Seventh session"); without drafts, large prefill ops gain from the spin, so it stays OpenMP's default.
if os.environ.get("NANOQWEN_SPECULATIVE_CONFIG"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
