// The fused ops' CPU kernels, as csrc/cpu/<op>.cpp registers them with the dispatcher (TORCH_LIBRARY_IMPL(iaerf,
// CPU, ...)). Their schemas are written once, in the Python op files (iaerf/ops/<op>.py), and defined when
// iaerf.ops is imported; C++ code that runs without Python (the ctest programs in csrc/tests) calls the kernels
// here directly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace iaerf {

// logsumexp.cpp (iaerf/ops/logsumexp.py)
at::Tensor logsumexp_cpu(const at::Tensor& logits);
std::tuple<at::Tensor, at::Tensor> logsumexp_with_probs_cpu(const at::Tensor& logits);
at::Tensor logsumexp_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse);
void logsumexp_backward_from_probs_cpu(const at::Tensor& grad, const at::Tensor& probs);

// energy_ce.cpp (iaerf/ops/energy_cross_entropy.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor> energy_ce_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                     const at::Tensor& energy_coef,
                                                                     int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> energy_ce_forward_with_probs_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& energy_coef, int64_t ignore_index);
at::Tensor energy_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor& energy_coef, const at::Tensor& lse, int64_t ignore_index);
void energy_ce_backward_from_probs_cpu(const at::Tensor& grad_loss, const at::Tensor& probs,
                                          const at::Tensor& target, const at::Tensor& energy_coef,
                                          int64_t ignore_index);

// head_hvp.cpp (iaerf/ops/head_hvp.py)
at::Tensor head_hvp_cpu(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& v,
                        const std::optional<at::Tensor>& indices, bool has_bias, int64_t tile_rows);

}  // namespace iaerf
