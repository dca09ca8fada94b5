// The logsumexp op's CPU kernels, compiled once per capability (capability.h, kernels_isa.inc); the ops that
// call them: csrc/cpu/logsumexp.cpp.
#pragma once

#include "softmax_rows.h"

namespace iaerf {
namespace cpu {
inline namespace CPU_CAPABILITY {

// ---------------------------------------------------------------------------------------------------------
// logsumexp: [N, K] -> [N]

inline std::tuple<at::Tensor, at::Tensor> logsumexp_impl(const at::Tensor& logits, bool with_probs, const char* op) {
  check_logits(logits, op);
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(acc_dtype(logits)));
  at::Tensor probs = with_probs ? new_probs(logits) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "iaerf_logsumexp", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    forward_rows<scalar_t>(logits, lse, with_probs ? &probs : nullptr, [](int64_t, const acc_t*, acc_t) {});
  });
  return {lse, probs};
}

// d lse_i / d z_ik = softmax(z_i)_k, so grad_logits = grad[:, None] * exp(z - lse[:, None]).
inline at::Tensor logsumexp_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse) {
  const char* op = "iaerf::logsumexp_backward";
  check_logits(logits, op);
  const int64_t N = logits.size(0), K = logits.size(1);
  const auto acc = acc_dtype(logits);
  at::Tensor g = check_rows(grad, N, acc, op, "grad");
  at::Tensor l = check_rows(lse, N, acc, op, "lse");
  at::Tensor out = new_rows_buffer(logits, logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "iaerf_logsumexp_bwd", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t* gp = g.data_ptr<acc_t>();
    const acc_t* lp = l.data_ptr<acc_t>();
    const int64_t gs = g.stride(0), ls = l.stride(0);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t> reader(logits);
      RowWriter<scalar_t> writer(K);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* dst = op_ + i * K;
        scaled_softmax_row(reader.row(i), K, lp[i * ls], gp[i * gs], writer.target(dst));
        writer.store(dst);
      }
    });
  });
  return out;
}

// probs[i, :] *= grad[i]: turns the softmax kept by logsumexp_with_probs into the gradient, in place.
inline void logsumexp_backward_from_probs_cpu(const at::Tensor& grad, const at::Tensor& probs) {
  const char* op = "iaerf::logsumexp_backward_from_probs_";
  check_logits(probs, op);
  TORCH_CHECK_VALUE(probs.is_contiguous(), op, ": probs must be contiguous (the buffer made by the forward)");
  const int64_t N = probs.size(0), K = probs.size(1);
  at::Tensor g = check_rows(grad, N, probs.scalar_type(), op, "grad");
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "iaerf_logsumexp_bwd_probs", [&] {
    scalar_t* pp = probs.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t gs = g.stride(0);
    at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) scale_row(pp + i * K, K, gp[i * gs]);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace iaerf

