#!/usr/bin/env bash
# GPU checks of the Triton projection kernel, as one prepared script (not run in CI; needs a CUDA GPU).
# Compiles the kernel for real, checks it against the torch path (kernel and GradientProjector), times it
# against the torch path and the memory-bandwidth floor, and writes $OUT/gpu_projection.json.
# Usage from the repository root, with a python3 that holds CUDA torch, triton and transformers
# (the lent GPU machines' python3 does; nothing is installed here):
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
unset TRITON_INTERPRET
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "${OUT:=$(pwd)/benchmarks/gpu_out}"
PYTHONPATH=$(pwd) "$PYTHON" benchmarks/gpu_projection.py --out "$OUT"
