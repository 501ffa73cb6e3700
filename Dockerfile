# nanoqwen on the CPU. Build: docker build -t nanoqwen .
# Run with a checkpoint directory mounted:
#   docker run -p 8000:8000 -v /srv/Qwen3-0.6B:/models/qwen3:ro -e NANOQWEN_MODEL=/models/qwen3 nanoqwen
# or with a Hugging Face cache mounted (NANOQWEN_MODEL defaults to Qwen/Qwen3-0.6B):
#   docker run -p 8000:8000 -v ~/.cache/huggingface:/home/nanoqwen/.cache/huggingface -e HF_HUB_OFFLINE=1 nanoqwen
# Options after the image name go to `nanoqwen serve` (e.g. `--workers 2 --max-batch 16`).
FROM python:3.12-slim

ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc: the CPU kernels (ops/csrc) are compiled on first start into NANOQWEN_CACHE_DIR.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# The CPU build of torch: no CUDA libraries in the image.
RUN pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml setup.cfg README.md server.py ./
COPY nanoqwen nanoqwen
COPY ops ops
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 1000 nanoqwen
USER nanoqwen
WORKDIR /home/nanoqwen
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["nanoqwen", "serve", "--host", "0.0.0.0", "--port", "8000"]
