#!/usr/bin/env bash
# Installs kronfluence 1.0.1 (benchmarks/bench_kfac.py's optional comparison) into its own venv, build/kronfluence-venv,
# which sees the project venv's packages through a .pth file: kronfluence runs on exactly the torch iaerf uses, and a
# constraints file pinning that torch (and --no-deps for kronfluence itself) means pip can never replace it.
#   bash benchmarks/setup_kronfluence.sh            then   build/kronfluence-venv/bin/python -m benchmarks.bench_kfac
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
main_python="${IAERF_PYTHON:-$root/.venv/bin/python}"
venv="$root/build/kronfluence-venv"
site="$("$main_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
torch_version="$("$main_python" -c 'import torch; print(torch.__version__)')"
"$main_python" -m venv "$venv"
new_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site" > "$new_site/iaerf-main-venv.pth"
echo "$root" > "$new_site/iaerf-checkout.pth"
constraints="$venv/constraints.txt"
echo "torch==$torch_version" > "$constraints"
"$venv/bin/pip" install --quiet --no-deps "kronfluence==1.0.1"
# kronfluence's own requirements except torch / torchvision (never imported by kronfluence 1.0.1's code)
"$venv/bin/pip" install --quiet -c "$constraints" "accelerate>=0.31.0" "einops>=0.8.0" "einconv>=0.1.0" \
    "opt-einsum>=3.3.0"
"$venv/bin/python" -c "import torch, kronfluence; assert torch.__version__ == '$torch_version', torch.__version__; \
print('kronfluence', kronfluence.__version__, 'on torch', torch.__version__)"
