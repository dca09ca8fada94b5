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

echo "== [1/5] nvcc compile check of csrc/cuda/*.cu (sm_80, sm_90)"
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

echo "== [2/5] full CUDA extension build against the CUDA build of torch (compile, link, import; no GPU needed)"
if [ "${IAERF_SKIP_CUDA_BUILD:-0}" = "1" ]; then
  echo "skipped: IAERF_SKIP_CUDA_BUILD=1"
else
  bash scripts/check_cuda_build.sh
fi

echo "== [3/5] CMake build of the C++ sources and ctest"
builddir=build/cmake
cmake -S . -B "$builddir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build "$builddir" -j 2
(cd "$builddir" && ctest --output-on-failure)

echo "== [4/5] GPU validation script, CPU dry run (build in a copy, backend table, CUDA test collection, report)"
# Results and logs in build/gpu_check_dry_run; the first run also builds the copy (minutes), later runs ~1 minute.
PYTHON=$py bash benchmarks/gpu_check build/gpu_check_dry_run --dry-run

echo "== [5/5] pytest"
"$py" -m pytest -q "$@"
