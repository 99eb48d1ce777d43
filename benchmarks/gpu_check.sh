#!/usr/bin/env bash
# LoFT's GPU readiness, run as is on a CUDA machine from the repository root:
#     bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
# 1. CUDA == CPU: float64 parameters agree to 1e-12 after 4 steps, pair by pair and as stacks (foreach).
# 2. bf16 LoFT step on the 7B block (q,k,v,o 4096², gate/up 4096×11008, down 11008×4096, r = 16), per pair and
#    as stacks, against AdamW(fused=True) on the same layers' full bf16 weights.
# 3. The probe on the small stack (24×6 layers 1024², r = 8): every=16 without shadow, with shadow + G capture.
# Where there is no CUDA device it says so and exits with status 2, having checked nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" benchmarks/gpu_check.py equality
"$PYTHON" benchmarks/gpu_check.py step --repeats 10
"$PYTHON" benchmarks/gpu_check.py probe --repeats 3
