// Fused CPU kernels of the energy-regularized cross-entropy of Algorithm 1 (torch.ops.iaerf.energy_ce_*; the
// Python side is iaerf/ops/energy_cross_entropy.py):
//   CE_i = lse_i - z_{i,y_i},  l_i = CE_i + c_i E_i = (1 - c_i) lse_i - z_{i,y_i},
//   dl_i/dz_ik = (1 - c_i) softmax(z_i)_k - [k == y_i].
// The kernels (one copy per CPU capability, picked at run time): csrc/cpu/energy_ce_kernels.h; row kernels,
// conventions and the two ways to form the gradient: csrc/cpu/softmax_rows.h.
#include "capability.h"
#include "ops.h"

#include <torch/library.h>

namespace iaerf {

std::tuple<at::Tensor, at::Tensor, at::Tensor> energy_ce_forward_cpu(const at::Tensor& logits,
                                                                     const at::Tensor& target,
                                                                     const at::Tensor& energy_coef,
                                                                     int64_t ignore_index) {
  auto [loss, ce, lse, probs, num_valid] = cpu::kernels().energy_ce_forward(logits, target, energy_coef, ignore_index,
                                                                            false, "iaerf::energy_ce_forward");
  return {loss, ce, lse};
}

// The training-step variant: also the softmax (for the in-place backward) and the count of rows not ignored
// (the "mean" divisor, counted in the target check's scan instead of by two more torch ops per step).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> energy_ce_forward_with_probs_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& energy_coef, int64_t ignore_index) {
  return cpu::kernels().energy_ce_forward(logits, target, energy_coef, ignore_index, true,
                                          "iaerf::energy_ce_forward_with_probs");
}

at::Tensor energy_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& energy_coef, const at::Tensor& lse, int64_t ignore_index) {
  return cpu::kernels().energy_ce_backward(grad_loss, logits, target, energy_coef, lse, ignore_index);
}

void energy_ce_backward_from_probs_cpu(const at::Tensor& grad_loss, const at::Tensor& probs, const at::Tensor& target,
                                       const at::Tensor& energy_coef, int64_t ignore_index) {
  cpu::kernels().energy_ce_backward_from_probs(grad_loss, probs, target, energy_coef, ignore_index);
}

}  // namespace iaerf

// The kernels of ops whose schemas the Python op file defines (the dispatcher takes them in either order).
TORCH_LIBRARY_IMPL(iaerf, CPU, m) {
  m.impl("energy_ce_forward", &iaerf::energy_ce_forward_cpu);
  m.impl("energy_ce_backward", &iaerf::energy_ce_backward_cpu);
  m.impl("energy_ce_forward_with_probs", &iaerf::energy_ce_forward_with_probs_cpu);
  m.impl("energy_ce_backward_from_probs_", &iaerf::energy_ce_backward_from_probs_cpu);
}
