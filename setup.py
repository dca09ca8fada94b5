"""Builds the native extension ``iaerf._C``.

C++ CPU kernels (csrc/module.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels (csrc/cuda/*.cu plus their
C++ launch bindings csrc/cuda/*.cpp) are added when the installed torch has CUDA and nvcc is found, or when
FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST picks the targets on a machine without a driver). IAERF_NO_EXTENSION=1 skips
the extension entirely: iaerf then runs on its pure-torch paths. The sources are globbed, so a new op's kernel files
need no line here; they register kernels only, the op's schema being defined by its Python op file (iaerf/ops).

The build is portable (no -march=native): the CPU kernels are compiled once per CPU capability, as ATen's own
are (csrc/cpu/capability.h): csrc/cpu/isa/kernels_default.cpp for the x86-64 baseline (or any other CPU), and on
x86-64 csrc/cpu/isa/kernels_avx2.cpp and kernels_avx512.cpp with ATen's AVX2 / AVX512 flags. The copy that runs
is chosen at run time by at::get_cpu_capability() (ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it).

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
    # No -march=native: the vector kernels come in one copy per ISA (ISA_KERNELS), so the build runs anywhere.
    cxx = ["-O3", "-fopenmp"]
    # The portable objects come first on the link line (the per-ISA ones are extra objects, linked after them), so
    # where an inline function of a torch / standard header is instantiated in several objects the linker keeps
    # the portable copy.
    sources = _sources("csrc/module.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = []
    if _isa_kernels():
        define_macros.append(("IAERF_ISA_KERNELS", None))
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
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


# The copies of the CPU kernels (csrc/cpu/capability.h): (source, extra compiler flags, x86-64 only?). The AVX-512 set
# is the one ATen's AVX512 capability requires (f, bw, vl, dq), the AVX2 one ATen's AVX2 flags.
# -fno-trapping-math: without it gcc 12 leaves every loop calling fast_exp / fast_log scalar ("control flow in
# loop": it will not if-convert the range selects of a comparison that could trap) except where AVX-512 masks
# do the selects; that is why the AVX2 forward lost to eager torch. Results are unchanged (no -ffast-math: NaN,
# inf and signed zeros keep their IEEE meaning); only floating-point exception flags, which nothing reads, may differ.
KERNEL_FLAGS = ["-fno-trapping-math"]
ISA_KERNELS = [
    ("csrc/cpu/isa/kernels_default.cpp",
     KERNEL_FLAGS + ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"], False),
    ("csrc/cpu/isa/kernels_avx2.cpp",
     KERNEL_FLAGS + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], True),
    (
        "csrc/cpu/isa/kernels_avx512.cpp",
        KERNEL_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
        True,
    ),
]


def _isa_kernels():
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("IAERF_NO_ISA_KERNELS", "0") != "1"


def _build_ext_class(BuildExtension):
    base = BuildExtension.with_options(use_ninja=True)

    class BuildWithIsaKernels(base):
        """Compiles each copy of the kernels with its own flags (setuptools has one flag set per extension)
        through the same compiler setup as the other sources, and links the objects in after them (portable copy
        first)."""

        def build_extension(self, ext):
            objects = []
            for source, flags, x86_only in ISA_KERNELS:
                if x86_only and not _isa_kernels():
                    continue
                args = ext.extra_compile_args
                if isinstance(args, dict):
                    args = {key: list(value) + (flags if key == "cxx" else []) for key, value in args.items()}
                else:
                    args = list(args) + flags
                objects += self.compiler.compile(
                    [source],
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=args,
                    depends=ext.depends,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return BuildWithIsaKernels


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
