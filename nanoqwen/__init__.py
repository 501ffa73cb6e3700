"""nanoqwen: a small, fast, OpenAI-compatible inference server for Qwen3."""
import os
import re

# Read by OpenMP when torch loads, so it is decided here, before any import of torch; a policy the user set wins.
# With drafts, a step alternates small torch ops with the C kernels' own thread pool, and OpenMP's threads spinning
# after each op take the cores that pool needs: a verify step at batch 1 costs 25-40% less with them asleep
# (profiles/RESULTS.md, "Seventh session"). Without drafts the spin stays OpenMP's default: asleep, quiet, int4 and
# int8 batch-1 decode ran ~17-20% slower (b8 3-5% faster; under load, steps mixing torch's GEMMs with the pool far
# faster: "Thirty-third session", omp33 and lead).
if os.environ.get("NANOQWEN_SPECULATIVE_CONFIG"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# torch runs bf16 GEMMs through oneDNN, which keeps a compiled primitive per shape in two LRU caches of 1024 entries
# each (ideep's and oneDNN's), ~0.27 MB an entry at Qwen3-0.6B's shapes: each new prompt length adds one per distinct
# linear, so a bf16 worker grew by ~0.6-0.75 GB with the variety of its traffic. 64 hold the few shapes a step uses,
# and a miss costs 0.15-0.5 ms a shape (profiles/RESULTS.md, "Thirty-fourth session, lane mem34"). Both are read at the
# first bf16 GEMM, not at torch's import; a value the user set wins but 0, which crashes ideep.
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
# ideep reads it as C's atoi does: anything that reads as 0 (0, 00, abc, an empty value; strtol's long, clamped, cast
# to a 32-bit int: 4294967296, -99999999999999999999; C's space and digits are ASCII's: a no-break space or an Arabic-
# Indic digit stops it) segfaults a worker, else (20 digits are past a long's range; Python's int() refuses 4,300)
if (_lru := re.match(r"\s*([+-]?)(\d+)", os.environ["LRU_CACHE_CAPACITY"], re.ASCII)) is None \
        or min(max(int(_lru[1] + (_lru[2].lstrip("0")[:20] or "0")), -(1 << 63)), (1 << 63) - 1) % (1 << 32) == 0:
    raise ValueError(f"LRU_CACHE_CAPACITY={os.environ['LRU_CACHE_CAPACITY']!r} reads as 0, which crashes torch's "
                     "ideep at its first bf16 GEMM: set an integer of 1 or more (nanoqwen's default is 64)")
del _lru
