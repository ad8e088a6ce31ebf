#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on one GPU (no CPU machine can run it):
# the card's name, then one table (benchmarks/gpu_check.py): the mixer's kernel path against
# the portable scan (parity and fwd+bwd time at L=196 and 784), Stage 2 steps/s in bf16 and
# its ratio to the frozen LLM's own forward+backward, the demo profile's main run on the GPU,
# and DDP with 2 processes against 1 (two processes share the GPU when only one is visible).
#
#   benchmarks/gpu_check.sh [--skip-demo] [--skip-ddp] [--device cuda:N]
#   benchmarks/gpu_check.sh --dry-run      # the table code on the CPU, toy sizes
#
# Runs in the project's environment (.venv after `make install`, else $PYTHON or python3).
# mamba-ssm and causal-conv1d are installed when missing (the pins of the `cuda` extra); where
# they cannot be (no wheel and no time to compile), the kernel rows say so and the mixer runs
# the portable scan on the GPU. Exit status: non-zero when a row FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $* " != *" --dry-run "* ]]; then
  if command -v nvidia-smi >/dev/null; then
    echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  else
    echo "card: nvidia-smi not found"
  fi
  if ! "$PY" -c "import mamba_ssm, causal_conv1d" 2>/dev/null; then
    pins=$("$PY" scripts/requirements.py cuda | grep -E '^(mamba-ssm|causal-conv1d)')
    echo "installing $(echo $pins) (60 s at most each) ..."
    for pin in $pins; do
      timeout 60 "$PY" -m pip install -q --no-build-isolation "$pin" \
        || echo "WARNING: $pin did not install (it needs a prebuilt wheel for this torch/CUDA," \
                "or nvcc and ~20 min to compile): the mixer falls back to the portable scan"
    done
  fi
fi
"$PY" benchmarks/gpu_check.py "$@"
