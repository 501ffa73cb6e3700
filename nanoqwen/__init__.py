"""nanoqwen: a small, fast, OpenAI-compatible inference server for Qwen3."""
import os

# Read by OpenMP when torch loads, so it is decided here, before any import of torch; a policy the user set wins.
# A step alternates torch ops (OpenMP) with the C kernels' own thread pool (ops/cpu/csrc/pool.h), and OpenMP's
# threads spinning after each op take the cores that pool needs: with them asleep a verify step of drafts at batch 1
# costs 25-40% less (profiles/RESULTS.md, "Seventh session") and an int8 decode step of 17-32 rows (the C kernels
# dequantise, torch's GEMM multiplies) about 10x less ("Thirty-third session, lane omp33").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
