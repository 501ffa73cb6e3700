"""nanoqwen: a small, fast, OpenAI-compatible inference server for Qwen3."""
import os

# Read by OpenMP when torch loads, so it is decided here, before any import of torch; a policy the user set wins.
# With drafts, a step alternates small torch ops with the C kernels' own thread pool, and OpenMP's threads spinning
# after each op take the cores that pool needs: a verify step at batch 1 costs 25-40% less with them asleep
# (profiles/RESULTS.md, "Seventh session"). Without drafts the spin stays OpenMP's default: asleep, quiet, int4 and
# int8 batch-1 decode ran ~17-20% slower (b8 3-5% faster; under load, steps mixing torch's GEMMs with the pool far
# faster: "Thirty-third session", omp33 and lead).
if os.environ.get("NANOQWEN_SPECULATIVE_CONFIG"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
