#!/usr/bin/env bash
# Creates .venv-peers: the influence libraries benchmarks/bench_peers.py compares with iaerf (dattri 0.3, pyDVL 0.10,
# listed in benchmarks/peers_requirements.txt) and kronfluence 1.0.1 for benchmarks/bench_kfac.py, on exactly the torch build of the project venv. torch is installed
# first from the same pin, then the peers with a constraints file pinning that torch, so pip can never replace it.
# iaerf itself (with its already built native extension) is imported from this checkout through a .pth file, so
# nothing is rebuilt. Safe to run again.
#   bash benchmarks/setup_peers.sh        then   .venv-peers/bin/python -m benchmarks.bench_peers [--quick]
#   IAERF_PYTHON   the project venv's interpreter (default: .venv/bin/python), whose torch is pinned
#   PYTHON         interpreter used to create .venv-peers (default: python3)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
main_python="${IAERF_PYTHON:-$root/.venv/bin/python}"
venv="$root/.venv-peers"
torch_version="$("$main_python" -c 'import torch; print(torch.__version__)')"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# the venv keeps itself out of git (as Python >= 3.13's venv does), whatever the checkout's .gitignore says
echo "*" > "$venv/.gitignore"
py="$venv/bin/python"
constraints="$venv/constraints.txt"
echo "torch==$torch_version" > "$constraints"
quiet() { grep -v "is ignored: it is neither" || true; }
echo "[setup_peers] torch==$torch_version into $venv"
"$py" -m pip install -q --disable-pip-version-check "torch==$torch_version" 2>&1 | quiet
echo "[setup_peers] peers from benchmarks/peers_requirements.txt (torch pinned by $constraints)"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" -r "$root/benchmarks/peers_requirements.txt" \
    2>&1 | quiet
# kronfluence 1.0.1 (benchmarks/bench_kfac.py) without its declared torchvision, which its code never imports
echo "[setup_peers] kronfluence==1.0.1 (no dependencies) and its requirements but torch / torchvision"
"$py" -m pip install -q --disable-pip-version-check --no-deps "kronfluence==1.0.1" 2>&1 | quiet
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" "accelerate>=0.31.0" "einops>=0.8.0" \
    "einconv>=0.1.0" "opt-einsum>=3.3.0" 2>&1 | quiet
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root" > "$site/iaerf-checkout.pth"
"$py" -c "
import importlib.metadata as md, torch, dattri, pydvl, kronfluence, iaerf, iaerf.core.extension as e
assert torch.__version__ == '$torch_version', torch.__version__
assert e.extension_loaded(), e.extension_error()
print('[setup_peers] ready: torch', torch.__version__, '| dattri', md.version('dattri'),
      '| pydvl', pydvl.__version__, '| kronfluence', kronfluence.__version__, '| iaerf', iaerf.__version__, '(native extension loaded)')"
