#!/usr/bin/env bash
# Builds the full CUDA extension (C++ + CUDA kernels, sm_80 and sm_90) against the CUDA build of torch, in a
# throw-away venv and a copy of the sources, then imports it and checks that every CUDA kernel is registered.
# No GPU is needed: this proves the .cu and binding code compiles, links and loads.
#   IAERF_CUDA_TORCH_SPEC  torch requirement with CUDA (default torch==2.14.1, which lies on this machine's disk)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${IAERF_CUDA_CHECK_DIR:-/tmp/iaerf-cuda-check}
venv=$work/venv
src=$work/src
# The toolkit folder (the one holding include/cuda_runtime_api.h), also when nvcc on PATH is a wrapper script.
cuda_home=$(bash scripts/cuda_home.sh)
echo "CUDA_HOME=$cuda_home"
mkdir -p "$work"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${IAERF_CUDA_TORCH_SPEC:-torch==2.14.1}" ninja numpy \
    setuptools wheel 2>&1 | grep -v "is ignored: it is neither" || true
rm -rf "$src" && mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | grep -z -E '^(setup.py|pyproject.toml|README.md|csrc/|iaerf/)' \
    | xargs -0 cp --parents -t "$src"
cd "$src"
CUDA_HOME=$cuda_home FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 IAERF_PORTABLE=1 \
    "$venv/bin/python" setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|creating)" | tail -n 20
"$venv/bin/python" - <<'PY'
import glob, torch
import iaerf.core.extension as ext
import iaerf.ops  # defines the ops' schemas (iaerf/ops/*.py); iaerf._C registers their kernels
assert ext.extension_loaded(), ext.extension_error()
assert ext.built_with_cuda(), "extension was built without its CUDA kernels"
cuda_ops = []
for path in sorted(glob.glob("csrc/cuda/*.cpp")):
    src = open(path).read()
    if "TORCH_LIBRARY_IMPL(iaerf, CUDA" in src:
        import re
        cuda_ops += re.findall(r'm\.impl\(\s*"([a-z_0-9]+)"', src)
missing = [op for op in cuda_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"iaerf::{op}", "CUDA")]
assert not missing, f"CUDA kernels not registered: {missing}"
print(f"CUDA extension OK: torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA kernels registered for {cuda_ops}")
PY
