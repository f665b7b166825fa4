#!/usr/bin/env bash
# Fetch, here, the wheels that experiments/gpu_short.sh needs on a GPU machine whose Python (3.12) already has
# JAX with CUDA, flax, optax, orbax-checkpoint, chex, tokenizers, safetensors, tqdm and matplotlib but
# neither grain nor tensorboardX (about 4.5 MB into .whl/, which .gitignore ignores; send it along with the
# checkout). Usage: bash experiments/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
PYV=${1:-3.12}
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
ls -la .whl
