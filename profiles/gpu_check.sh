#!/usr/bin/env bash
# The GPU tests and the profiles in one command, each step's output written into OUTDIR.
#
#   bash profiles/gpu_check.sh OUTDIR [STEP ...]    steps: env tests kernels decode bench trace (default: all)
#
# Made for a bare CUDA machine without network: it needs only torch, triton, transformers and
# safetensors. Server tests are not run. Without pytest, the gpu-marked tests run under the
# fallback runner profiles/testrunner.py. A failing step does not stop the others; OUTDIR/summary.txt
# lists every step's outcome and the exit status is 1 if any failed. Set PYTHON to pick the interpreter.
set -u

ALL_STEPS=(env tests kernels decode bench trace)
case "${1:-}" in
    -h|--help) sed -n '2,9p' "$0" | cut -c3-; exit 0 ;;
    ""|-*) echo "usage: $0 OUTDIR [STEP ...]   (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
esac
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
for step in "${STEPS[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $step "* ]] || { echo "unknown step: $step (steps: ${ALL_STEPS[*]})" >&2; exit 2; }
done
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step_env() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi not found"; fi
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "safetensors", "pytest", "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
    raise SystemExit(0)
raise SystemExit("no CUDA device")
EOF
}

step_tests() {
    local files=()
    for f in tests/test_*.py; do
        case $f in tests/test_server*|tests/test_api*) continue ;; esac  # need the server packages
        grep -q "pytest.mark.gpu" "$f" && files+=("$f")
    done
    if [ ${#files[@]} -eq 0 ]; then
        echo "no test file has a gpu-marked test"
        return 1
    fi
    if "$PY" -c "import pytest" 2>/dev/null; then
        "$PY" -m pytest -q -rs -m gpu "${files[@]}"
    else
        echo "pytest is not installed: running the gpu-marked tests with the fallback runner profiles/testrunner.py"
        "$PY" profiles/testrunner.py gpu "${files[@]}"
    fi
}

step_kernels() {
    "$PY" profiles/kernels.py --out "$OUTDIR"
}

step_decode() {
    "$PY" profiles/decode.py --modes none compile cudagraph --max-batch 64 --new-tokens 64 --out "$OUTDIR"
}

step_bench() {
    "$PY" profiles/bench_decode.py --graph cudagraph --dtypes bfloat16 --batches 1 8 32 64 --new-tokens 128 \
        --out "$OUTDIR"
}

step_trace() {
    # Eager shows every op and kernel; the graph replay is what the server runs.
    "$PY" profiles/trace.py --batch 1 --graph none --out "$OUTDIR/trace-eager" \
        && "$PY" profiles/trace.py --batch 1 --graph cudagraph --out "$OUTDIR/trace-cudagraph"
}

summary=()
failed=0
for step in "${STEPS[@]}"; do
    echo "=== $step (log: $OUTDIR/$step.log)"
    start=$SECONDS
    "step_$step" 2>&1 | tee "$OUTDIR/$step.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then outcome=ok; else outcome="FAILED (exit $rc)"; failed=1; fi
    summary+=("$(printf '%-8s %-18s %5ss' "$step" "$outcome" $((SECONDS - start)))")
done

printf '%s\n' "${summary[@]}" | tee "$OUTDIR/summary.txt"
[ $failed -eq 0 ] && echo "all steps passed" || echo "some steps failed: see the logs in $OUTDIR"
exit $failed
