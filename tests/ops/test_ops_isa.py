"""The per-ISA copies of the CPU kernels (csrc/cpu/capability.h): each copy this CPU can run, forced through
ATEN_CPU_CAPABILITY in a subprocess, against float64 references on the hostile inputs (tests/_isa_worker.py),
so the AVX2 and portable copies are checked on an AVX-512 machine too."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ops_cases import HAS_CPP

pytestmark = pytest.mark.skipif(not HAS_CPP, reason="iaerf._C not built")

ROOT = Path(__file__).resolve().parents[2]
# capability -> the CPU flags its copy is compiled for (setup.py ISA_KERNELS)
NEEDS = {"default": set(), "avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runnable(cap: str) -> bool:
    if cap == "default":
        return True
    return platform.machine() in ("x86_64", "AMD64") and NEEDS[cap] <= _cpu_flags()


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_each_capability_matches_float64(cap):
    if not _runnable(cap):
        pytest.skip(f"this CPU cannot run the {cap} copy")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_isa_worker.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the copy that ran is the one asked for, and the one torch's own kernels use
    assert result["capability"] == cap.upper() == result["torch_capability"], result
    assert result["checks"] > 500
    assert not result["failures"], "\n".join(result["failures"][:20])


def test_the_copy_in_use_is_torchs_capability():
    cap = torch.ops.iaerf.cpu_capability()
    assert cap in ("DEFAULT", "AVX2", "AVX512")
    if platform.machine() in ("x86_64", "AMD64"):
        assert cap == torch.backends.cpu.get_cpu_capability()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="needs an x86-64 build and objdump")
def test_only_the_isa_copies_use_avx_registers():
    """The build is portable: AVX2 / AVX-512 code may only sit in the AVX2 / AVX512 copies of the kernels. A
    torch or standard-library inline function instantiated in those copies too must come from a portable object
    (the link order setup.py and CMakeLists.txt keep), else a DEFAULT-capability CPU could execute AVX code."""
    from iaerf import _C

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                             timeout=300, check=True).stdout
    offenders, isa_functions, function = set(), set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif ("%ymm" in line or "%zmm" in line) and function is not None:
            # iaerf::cpu::AVX2::... mangles to ...4AVX2... and iaerf::AVX512::... to ...6AVX512...
            if "4AVX2" not in function and "6AVX512" not in function:
                offenders.add(function)
            else:
                isa_functions.add(function)
    assert not offenders, sorted(offenders)[:10]
    assert len(isa_functions) > 20  # the copies are there (the check is not vacuous)
