#!/usr/bin/env bash
# Sets up .venv/ with the CPU build of torch and everything iaerf's demo, tests and benchmarks use, then builds
# and installs iaerf (with its native extension) in editable mode. Safe to run again: it only adds what is missing.
#   IAERF_TORCH_SPEC   torch requirement to install (default: torch==2.13.0, the local CPU wheel)
#   PYTHON             interpreter used to create the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec=${IAERF_TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
echo "[setup] installing dependencies into .venv ($torch_spec)"
"$py" -m pip install -q --disable-pip-version-check "$torch_spec" triton ninja numpy scipy scikit-learn \
    matplotlib safetensors tqdm pytest pytest-benchmark setuptools wheel \
    transformers==5.25.0 2>&1 | grep -v "is ignored: it is neither" || true
"$py" -c "import torch, triton, transformers" || { echo "[setup] dependency install failed" >&2; exit 1; }
echo "[setup] building iaerf and its native extension"
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
"$py" -c "import iaerf, iaerf.core.extension as e; assert e.extension_loaded(), e.extension_error(); print('[setup] iaerf', iaerf.__version__, 'ready (native extension loaded)')"
