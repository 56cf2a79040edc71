#!/usr/bin/env bash
# Build the wheels that scripts/gpu_check.py needs on a GPU machine that has torch, transformers, accelerate,
# numpy, pyarrow, pandas, fsspec, xxhash and huggingface_hub but NOT trl, datasets (and its dill / multiprocess),
# nor this project; that machine has no internet. Run this where pip can reach the registry, then carry the folder.
#
#   scripts/gpu_wheelhouse.sh [WHEELHOUSE=.whl] [PYTHON_VERSION=3.12]
#
# On the GPU machine, from the repository root (installs from the folder only, nothing from the network):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 scripts/gpu_check.py --out "${OUT:-gpu_check_out}"
#
# The versions are the ones this project is tested with (trl 1.16, datasets 5.2); --no-deps keeps pip from pulling
# anything else: every wheel needed is listed here.
set -euo pipefail
WHEELHOUSE=${1:-.whl}
PYVER=${2:-3.12}
PY=${PYTHON:-python3}
mkdir -p "$WHEELHOUSE"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform any)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELHOUSE" \
    "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
# the project itself, as a pure-Python wheel (built from a copy, so no build/ folder is left in the checkout)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(mktemp -d)
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/trl_onpolicy" "$SRC/"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE" "$SRC"
rm -rf "$SRC"
du -sh "$WHEELHOUSE"
ls -1 "$WHEELHOUSE"
