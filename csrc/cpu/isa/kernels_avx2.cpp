// The AVX2 + FMA copy of the CPU kernels, compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2
// (setup.py, CMakeLists.txt); run when at::get_cpu_capability() is AVX2. See ../capability.h.
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__) || !defined(__FMA__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#include "../kernels_isa.inc"
