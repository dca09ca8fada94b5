#!/usr/bin/env bash
# Prints the CUDA toolkit folder to build against: the one holding include/cuda_runtime_api.h and bin/nvcc.
# Exits 1 with the folders it tried when there is none. Tried in order:
#   $CUDA_HOME (when set it must be valid: a wrong explicit choice is an error, not something to work around),
#   $CUDA_PATH, the toolkit of the nvcc on PATH, /usr/local/cuda.
# nvcc on PATH may be a symlink (followed) or a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`:
# then the toolkit is the one of the nvcc the script names, not the folder above the script.
#   usage: CUDA_HOME=$(bash scripts/cuda_home.sh)
set -euo pipefail

is_toolkit() { [ -f "$1/include/cuda_runtime_api.h" ] && [ -x "$1/bin/nvcc" ]; }

if [ -n "${CUDA_HOME:-}" ]; then
  if is_toolkit "$CUDA_HOME"; then echo "$CUDA_HOME"; exit 0; fi
  echo "cuda_home.sh: CUDA_HOME=$CUDA_HOME is not a CUDA toolkit (no include/cuda_runtime_api.h or bin/nvcc)" >&2
  exit 1
fi

candidates=()
[ -n "${CUDA_PATH:-}" ] && candidates+=("$CUDA_PATH")
if nvcc_path=$(command -v nvcc); then
  real=$(readlink -f "$nvcc_path")
  if [ "$(head -c 2 "$real")" = "#!" ]; then
    while IFS= read -r named; do
      candidates+=("$(dirname "$(dirname "$(readlink -f "$named")")")")
    done < <(grep -oE "/[^[:space:]\"';:]*/bin/nvcc" "$real" || true)
  else
    candidates+=("$(dirname "$(dirname "$real")")")
  fi
fi
candidates+=(/usr/local/cuda)

for dir in "${candidates[@]}"; do
  if is_toolkit "$dir"; then echo "$dir"; exit 0; fi
done
echo "cuda_home.sh: no CUDA toolkit found (tried: ${candidates[*]}; none holds include/cuda_runtime_api.h and" \
     "bin/nvcc); set CUDA_HOME to the toolkit folder" >&2
exit 1
