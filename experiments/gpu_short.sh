#!/usr/bin/env bash
# One H200-class GPU, about 10 minutes: data -> SFT SoS+ and APR (gpu_short preset) -> experiment 1.
# Usage (from the repository root, with jax[cuda] installed in .venv):  bash experiments/gpu_short.sh [OUT]
# Results: OUT/same_context.json + .png, the two runs' metrics and loss.png, and OUT/timings.txt.
set -euo pipefail
OUT=${1:-runs/gpu_short}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
t() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name $(( $(date +%s) - s )) s" | tee -a "$OUT/timings.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
t data  $PY -m apr_jax.cli data --preset gpu_short --out "$OUT/data" --quiet
t sft_sosp $PY -m apr_jax.cli train --preset gpu_short --method sosp --data "$OUT/data" --out "$OUT/sft_sosp"
t sft_apr  $PY -m apr_jax.cli train --preset gpu_short --method apr --data "$OUT/data" --out "$OUT/sft_apr"
t exp1 $PY experiments/same_context.py --sosp "$OUT/sft_sosp" --apr "$OUT/sft_apr" --contexts 1024,2048,4096 \
    --children 4,16 --problems 200 --slots 128 --quiet --out "$OUT/exp1"
t exp1_aided $PY experiments/same_context.py --sosp "$OUT/sft_sosp" --apr "$OUT/sft_apr" --contexts 1024,2048,4096 \
    --children 4,16 --problems 200 --slots 128 --aid arithmetic --quiet --out "$OUT/exp1_aided"
