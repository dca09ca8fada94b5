// The AVX-512 copy of the CPU kernels, compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 (setup.py, CMakeLists.txt): the subset ATen's AVX512 capability
// requires, so it runs wherever at::get_cpu_capability() says AVX512. See ../capability.h.
#if !defined(CPU_CAPABILITY_AVX512) || !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "kernels_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512"
#endif
#include "../kernels_isa.inc"
