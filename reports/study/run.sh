#!/usr/bin/env bash
# The published study: a sweep of digits, a sweep of MiniLM sentiment, then the study page into reports/study/.
# Resumable: run it again after an interruption and it continues where it stopped. Estimated ~50 min on an
# idle 2-core CPU (README, "The published study"); the sweeps' run directories go to $RUNS (default runs/study).
set -u
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
RUNS=${RUNS:-runs/study}
cd "$(dirname "$0")/../.."

# digits: the whole grid of the issue. 400 steps; lr chosen on seed 0 from 3 per method.
loft-probe sweep digits --method full,lora,loft --rank 1,2,4,8,16,32 --alpha r/4,r,4r,16r,rs4 \
    --lr full=1e-3,3e-3,1e-2 --lr lora=3e-3,1e-2,3e-2 --lr loft=1e-3,3e-3,1e-2 --seeds 0,1,2 --select-lr \
    --steps 400 --every 20 --evals 10 --shadow --out "$RUNS/digits"

# MiniLM sentiment, cut to fit the hour: 1 encoder layer, 32 tokens, 200 held-out snippets, 150 steps,
# ranks 1, 4, 16, alpha r/4, r, 16r (no 4r, no rsLoRA row), 2-3 learning rates per method.
loft-probe sweep minilm-sentiment --method full,lora,loft --rank 1,4,16 --alpha r/4,r,16r \
    --lr full=5e-5,1e-4,2e-4 --lr lora=1e-3,3e-3 --lr loft=5e-5,2e-4 --seeds 0,1,2 --select-lr \
    --steps 150 --every 15 --evals 6 --shadow -o layers=1 -o max_length=32 -o n_eval=200 --out "$RUNS/minilm"

loft-probe study "$RUNS/digits" "$RUNS/minilm" --out reports/study
