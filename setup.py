"""Builds the native extension ``iaerf._C``.

C++ CPU kernels (csrc/module.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels (csrc/cuda/*.cu plus their
C++ launch bindings csrc/cuda/*.cpp) are added when the installed torch has CUDA and nvcc is found, or when
FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST picks the targets on a machine without a driver). IAERF_NO_EXTENSION=1 skips
the extension entirely: iaerf then runs on its pure-torch paths.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch that is already installed.
"""
import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("IAERF_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs (C++20 from 2.13 on).
    cxx = ["-O3", "-fopenmp"]
    # The extension is built on the machine that runs it (pip install -e .), so native vector units are safe;
    # IAERF_PORTABLE=1 keeps the generic x86-64 baseline for wheels that travel.
    if os.environ.get("IAERF_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    sources = _sources("csrc/module.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = []
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        define_macros.append(("IAERF_WITH_CUDA", None))
        # No --use_fast_math: it flushes fp32 denormals to zero in kernels whose point is precision (the head-HVP mix
        # keeps tiny curvature terms), and they have no transcendentals for it to speed up.
        ext = CUDAExtension(
            "iaerf._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "iaerf._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
