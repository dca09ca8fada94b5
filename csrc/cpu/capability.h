// Per-ISA builds of the CPU kernels (the scheme of ATen's own CPU kernels, DispatchStub):
//   csrc/cpu/isa/kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp all compile the same kernels
//   (csrc/cpu/kernels_isa.inc), with -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name> and, for the latter two,
//   -mavx2 -mfma -mf16c / -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (setup.py ISA_KERNELS,
//   CMakeLists.txt; all three with -fno-trapping-math, without which gcc leaves the exp loops scalar below
//   AVX-512). Everything they define lives in an inline namespace named after the capability
//   (iaerf::cpu::AVX2::...), so the copies never share a symbol of their own, and they are linked after the
//   portable objects, so that where a torch / standard-library inline function is instantiated in several objects
//   the linker keeps a portable copy (tests/ops/test_ops_isa.py checks that no other code uses AVX registers).
//   The ops (logsumexp.cpp, energy_ce.cpp, head_hvp.cpp; compiled once, for the x86-64 baseline) call through
//   kernels(), which picks the table of the capability ATen itself uses: at::get_cpu_capability(), which
//   honours ATEN_CPU_CAPABILITY=default|avx2|avx512 (so one machine can run and test every path it supports).
// No -march=native anywhere: the same build runs on any x86-64 CPU and uses AVX2 / AVX-512 where present.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

// A file compiled without a capability (the ops, the CUDA binding, the C++ tests) gets the portable one.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif

#define IAERF_CAT_(a, b) a##b
#define IAERF_CAT(a, b) IAERF_CAT_(a, b)

namespace iaerf {
namespace cpu {

// The kernels one capability provides. Identical in every translation unit (no capability-dependent members).
struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512"
  // (lse, probs or undefined)
  std::tuple<at::Tensor, at::Tensor> (*logsumexp)(const at::Tensor& logits, bool with_probs, const char* op);
  at::Tensor (*logsumexp_backward)(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse);
  void (*logsumexp_backward_from_probs)(const at::Tensor& grad, const at::Tensor& probs);
  // (loss, ce, lse, probs or undefined, number of rows not ignored)
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*energy_ce_forward)(
      const at::Tensor& logits, const at::Tensor& target, const at::Tensor& energy_coef, int64_t ignore_index,
      bool with_probs, const char* op);
  at::Tensor (*energy_ce_backward)(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& energy_coef, const at::Tensor& lse, int64_t ignore_index);
  void (*energy_ce_backward_from_probs)(const at::Tensor& grad_loss, const at::Tensor& probs,
                                        const at::Tensor& target, const at::Tensor& energy_coef,
                                        int64_t ignore_index);
  // head_hvp's elementwise mix (csrc/cpu/head_hvp.h), float32 / float64
  void (*head_hvp_mix)(const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb);
};

// One per compiled capability (csrc/cpu/kernels_isa.inc).
const KernelTable& kernel_table_DEFAULT();
#if defined(IAERF_ISA_KERNELS)
const KernelTable& kernel_table_AVX2();
const KernelTable& kernel_table_AVX512();
#endif

// The table of at::get_cpu_capability() (read once), or DEFAULT where that capability was not compiled.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace iaerf
