#!/usr/bin/env bash
# One H200-class GPU, about 10 minutes: data -> SFT SoS+ and APR (gpu_short preset) -> experiment 1.
#
# Usage (from the repository root):  bash experiments/gpu_short.sh [OUT [RESULTS]]
#   OUT      run folder (default runs/gpu_short): data, both SFT runs, evaluations, timings.txt
#   RESULTS  optional flat folder that receives the small result files at the end of every stage
#            (timings, GPU name, both runs' metrics.jsonl, experiment 1's JSON and PNG: at most 7 files)
#
# Python: .venv/bin/python when this checkout has one (with jax[cuda]); otherwise python3 with the repository
# on PYTHONPATH, e.g. a machine image that has JAX with CUDA, flax, optax and orbax but not grain or
# tensorboardX: fetch those as wheels beforehand with `bash experiments/gpu_wheels.sh` (into .whl/), and this
# script installs them into /tmp/site. Environment knobs: SFT_STEPS (default: the preset's 600),
# AIDED=1 (also the aided experiment 1), PROBLEMS (default 200), CONTEXTS (default 1024,2048,4096); for a dry
# run on a CPU: PRESET=tiny ALLOW_CPU=1 SFT_STEPS=2 PROBLEMS=2 CONTEXTS=256.
set -euo pipefail
OUT=${1:-runs/gpu_short}
RESULTS=${2:-}
mkdir -p "$OUT"
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import grain, tensorboardX" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export PYTHONUNBUFFERED=1

publish() {  # copy the small result files, flat, into RESULTS (if given)
  [[ -n "$RESULTS" ]] || return 0
  mkdir -p "$RESULTS"
  cp -f "$OUT"/timings.txt "$OUT"/gpu.txt "$RESULTS"/ 2>/dev/null || true
  for m in sft_sosp sft_apr; do
    cp -f "$OUT/$m/metrics.jsonl" "$RESULTS/${m}_metrics.jsonl" 2>/dev/null || true
  done
  cp -f "$OUT"/exp1/same_context.json "$OUT"/exp1/same_context.png "$RESULTS"/ 2>/dev/null || true
  cp -f "$OUT"/exp1_aided/same_context.json "$RESULTS"/same_context_aided.json 2>/dev/null || true
}
t() {  # time one stage, append to timings.txt, publish
  local name=$1; shift; local s; s=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - s )) s" | tee -a "$OUT/timings.txt"
  publish
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
# fail fast, before any work, if JAX does not see the accelerator
$PY -c "import jax, flax, optax, orbax.checkpoint, grain; d = jax.devices(); print('jax', jax.__version__, 'flax', flax.__version__, d); assert d[0].platform == 'gpu' or '${ALLOW_CPU:-0}' == '1', d" | tee -a "$OUT/gpu.txt"
PRESET=${PRESET:-gpu_short}
CONTEXTS=${CONTEXTS:-1024,2048,4096}
STEPS=()
[[ -n "${SFT_STEPS:-}" ]] && STEPS=(--steps "$SFT_STEPS")
t data  $PY -m apr_jax.cli data --preset "$PRESET" --out "$OUT/data" --quiet
t sft_sosp $PY -m apr_jax.cli train --preset "$PRESET" --method sosp --data "$OUT/data" --out "$OUT/sft_sosp" --resume "${STEPS[@]}"
t sft_apr  $PY -m apr_jax.cli train --preset "$PRESET" --method apr --data "$OUT/data" --out "$OUT/sft_apr" --resume "${STEPS[@]}"
t exp1 $PY experiments/same_context.py --sosp "$OUT/sft_sosp" --apr "$OUT/sft_apr" --contexts "$CONTEXTS" \
    --children 4,16 --problems "${PROBLEMS:-200}" --slots 128 --quiet --out "$OUT/exp1"
if [[ "${AIDED:-0}" == 1 ]]; then
  t exp1_aided $PY experiments/same_context.py --sosp "$OUT/sft_sosp" --apr "$OUT/sft_apr" --contexts "$CONTEXTS" \
      --children 4,16 --problems "${PROBLEMS:-200}" --slots 128 --aid arithmetic --quiet --out "$OUT/exp1_aided"
fi
