// Run-time choice of the CPU kernels' copy (capability.h): the one of ATen's own capability, so
// ATEN_CPU_CAPABILITY=default|avx2|avx512 steers iaerf's kernels and torch's eager kernels alike.
// torch.ops.iaerf.cpu_capability() names the copy in use (benchmarks record it, tests check it).
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "capability.h"

namespace iaerf {
namespace cpu {

namespace {

const KernelTable& choose() {
#if defined(IAERF_ISA_KERNELS)
  const std::string cap = at::get_cpu_capability();  // "DEFAULT" / "NO AVX" / "AVX2" / "AVX512" (x86 builds of torch)
  if (cap == "AVX512") return kernel_table_AVX512();
  if (cap == "AVX2") return kernel_table_AVX2();
#endif
  return kernel_table_DEFAULT();
}

std::string cpu_capability() { return kernels().capability; }

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace cpu
}  // namespace iaerf

TORCH_LIBRARY_FRAGMENT(iaerf, m) {
  m.def("cpu_capability() -> str", &iaerf::cpu::cpu_capability);
}
