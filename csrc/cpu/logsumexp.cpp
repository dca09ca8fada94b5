// Fused CPU kernels of the logsumexp op (torch.ops.iaerf.logsumexp*; the Python side is iaerf/ops/logsumexp.py):
//   lse_i = logsumexp_k z_ik (E_i = -lse_i), d lse_i / d z_ik = softmax(z_i)_k.
// The kernels (one copy per CPU capability, picked at run time): csrc/cpu/logsumexp_kernels.h; row kernels,
// conventions and the two ways to form the gradient: csrc/cpu/softmax_rows.h.
#include "capability.h"
#include "ops.h"

#include <torch/library.h>

namespace iaerf {

at::Tensor logsumexp_cpu(const at::Tensor& logits) {
  return std::get<0>(cpu::kernels().logsumexp(logits, false, "iaerf::logsumexp"));
}

std::tuple<at::Tensor, at::Tensor> logsumexp_with_probs_cpu(const at::Tensor& logits) {
  return cpu::kernels().logsumexp(logits, true, "iaerf::logsumexp_with_probs");
}

at::Tensor logsumexp_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse) {
  return cpu::kernels().logsumexp_backward(grad, logits, lse);
}

void logsumexp_backward_from_probs_cpu(const at::Tensor& grad, const at::Tensor& probs) {
  cpu::kernels().logsumexp_backward_from_probs(grad, probs);
}

}  // namespace iaerf

// The kernels of ops whose schemas the Python op file defines (the dispatcher takes them in either order).
TORCH_LIBRARY_IMPL(iaerf, CPU, m) {
  m.impl("logsumexp", &iaerf::logsumexp_cpu);
  m.impl("logsumexp_backward", &iaerf::logsumexp_backward_cpu);
  m.impl("logsumexp_with_probs", &iaerf::logsumexp_with_probs_cpu);
  m.impl("logsumexp_backward_from_probs_", &iaerf::logsumexp_backward_from_probs_cpu);
}
