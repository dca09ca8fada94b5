#!/usr/bin/env bash
# The whole test suite: compile-check of every CUDA source with nvcc, a full CUDA build of the extension against
# the CUDA build of torch (import check, no GPU needed), the CMake build and its ctest C++ tests,
# the CPU dry run of the one-shot GPU validation (benchmarks/gpu_check --dry-run, docs/gpu.md), then pytest (Triton
# kernels run under TRITON_INTERPRET=1 on CPU tensors when there is no GPU).
# Run scripts/setup_env.sh first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$PWD/.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"

echo "== [1/6] nvcc compile check of csrc/cuda/*.cu (sm_80, sm_90)"
if [ "${IAERF_SKIP_NVCC:-0}" = "1" ]; then
  echo "skipped: IAERF_SKIP_NVCC=1"
else
  command -v nvcc >/dev/null || { echo "nvcc not found on PATH (set IAERF_SKIP_NVCC=1 to skip this step)" >&2; exit 1; }
  objdir=$(mktemp -d)
  for cu in csrc/cuda/*.cu; do
    [ -e "$cu" ] || continue
    echo "nvcc $cu"
    nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -c "$cu" -o "$objdir/$(basename "$cu").o"
  done
  rm -rf "$objdir"
fi

echo "== [2/6] full CUDA extension build against the CUDA build of torch (compile, link, import; no GPU needed)"
if [ "${IAERF_SKIP_CUDA_BUILD:-0}" = "1" ]; then
  echo "skipped: IAERF_SKIP_CUDA_BUILD=1"
else
  bash scripts/check_cuda_build.sh
fi

echo "== [3/6] CMake build of the C++ sources and ctest"
builddir=build/cmake
cmake -S . -B "$builddir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$builddir" -j 2
(cd "$builddir" && ctest --output-on-failure)

echo "== [4/6] GPU validation script, CPU dry run (build in a copy, backend table, CUDA test collection, report)"
# Results and logs in build/gpu_check_dry_run; the first run also builds the copy (minutes), later runs ~1 minute.
PYTHON=$py bash benchmarks/gpu_check build/gpu_check_dry_run --dry-run

echo "== [5/6] oldest supported numpy (pyproject: numpy>=1.23): the Hessian tests under numpy 1.23.5"
if [ "${IAERF_SKIP_OLD_NUMPY:-0}" = "1" ]; then
  echo "skipped: IAERF_SKIP_OLD_NUMPY=1"
else
  # A venv whose own numpy shadows .venv's, with .venv's site-packages (torch, iaerf) visible after it.
  npvenv=build/numpy-oldest
  [ -x "$npvenv/bin/python" ] || "$py" -m venv "$npvenv"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  npsite=$("$npvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$npsite/zz_iaerf_main_venv.pth"
  "$npvenv/bin/python" -m pip install -q --disable-pip-version-check numpy==1.23.5 2>&1 | grep -v -E "requires numpy|incompatible" || true
  "$npvenv/bin/python" -c 'import numpy; assert numpy.__version__ == "1.23.5", numpy.__version__'
  "$npvenv/bin/python" -m pytest -q -p no:cacheprovider tests/hessian/test_inverse_hvp.py tests/hessian/test_hessian_hostile.py \
    tests/hessian/test_hessian_module.py tests/hessian/test_hessian_params.py tests/hessian/test_hessian_head.py
fi

echo "== [6/6] pytest"
"$py" -m pytest -q "$@"
