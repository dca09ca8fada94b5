// The energy-CE op's CPU kernels, compiled once per capability (capability.h, kernels_isa.inc); the ops that
// call them: csrc/cpu/energy_ce.cpp.
#pragma once

#include "softmax_rows.h"

namespace iaerf {
namespace cpu {
inline namespace CPU_CAPABILITY {

// ---------------------------------------------------------------------------------------------------------
// energy-regularized cross-entropy

// (loss, ce, lse, probs or undefined, number of rows not ignored as a 0-dim tensor of the accumulation dtype)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> energy_ce_forward_impl(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& energy_coef, int64_t ignore_index,
    bool with_probs, const char* op) {
  check_logits(logits, op);
  const int64_t N = logits.size(0), K = logits.size(1);
  const auto acc = acc_dtype(logits);
  at::Tensor coef = check_coef(energy_coef, N, acc, op);
  int64_t num_valid = 0;
  at::Tensor tgt = check_target(target, N, K, ignore_index, op, &num_valid);
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc));
  at::Tensor ce = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
  at::Tensor probs = with_probs ? new_probs(logits) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "iaerf_energy_ce_fwd", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t* cp = coef.data_ptr<acc_t>();
    const int64_t cs = coef.dim() == 0 ? 0 : coef.stride(0);
    const int64_t* tp = tgt.data_ptr<int64_t>();
    const int64_t ts = tgt.stride(0);
    acc_t* lossp = loss.data_ptr<acc_t>();
    acc_t* cep = ce.data_ptr<acc_t>();
    forward_rows<scalar_t>(logits, lse, with_probs ? &probs : nullptr, [&](int64_t i, const acc_t* x, acc_t r) {
      const int64_t y = tp[i * ts];
      if (y == ignore_index) {
        lossp[i] = 0;
        cep[i] = 0;
        return;
      }
      cep[i] = r - x[y];
      lossp[i] = cep[i] - cp[i * cs] * r;  // CE + c * E with E = -lse
    });
  });
  return {loss, ce, lse, probs, at::full({}, static_cast<double>(num_valid), logits.options().dtype(acc))};
}

// grad_logits_i = g_i * ((1 - c_i) softmax(z_i) - onehot(y_i)); the true-class entry is formed in fp32 before
// the store so that bf16/fp16 gradients of confident rows (p_y ~ 1) keep their relative accuracy.
inline at::Tensor energy_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const at::Tensor& energy_coef,
                                         const at::Tensor& lse, int64_t ignore_index) {
  const char* op = "iaerf::energy_ce_backward";
  check_logits(logits, op);
  const int64_t N = logits.size(0), K = logits.size(1);
  const auto acc = acc_dtype(logits);
  at::Tensor g = check_rows(grad_loss, N, acc, op, "grad_loss");
  at::Tensor l = check_rows(lse, N, acc, op, "lse");
  at::Tensor coef = check_coef(energy_coef, N, acc, op);
  at::Tensor tgt = check_target(target, N, K, ignore_index, op);
  at::Tensor out = new_rows_buffer(logits, logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "iaerf_energy_ce_bwd", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t* gp = g.data_ptr<acc_t>();
    const acc_t* lp = l.data_ptr<acc_t>();
    const acc_t* cp = coef.data_ptr<acc_t>();
    const int64_t gs = g.stride(0), ls = l.stride(0), cs = coef.dim() == 0 ? 0 : coef.stride(0);
    const int64_t* tp = tgt.data_ptr<int64_t>();
    const int64_t ts = tgt.stride(0);
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t> reader(logits);
      RowWriter<scalar_t> writer(K);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* dst = outp + i * K;
        const int64_t y = tp[i * ts];
        if (y == ignore_index) {
          std::fill(dst, dst + K, scalar_t(0));
          continue;
        }
        const acc_t gi = gp[i * gs];
        const acc_t w = gi * (acc_t(1) - cp[i * cs]);
        const acc_t* x = reader.row(i);
        acc_t* row = writer.target(dst);
        scaled_softmax_row(x, K, lp[i * ls], w, row);
        row[y] = w * exp_acc(x[y] - lp[i * ls]) - gi;
        writer.store(dst);
      }
    });
  });
  return out;
}

// The same gradient formed in place from the softmax kept by energy_ce_forward_with_probs.
inline void energy_ce_backward_from_probs_cpu(const at::Tensor& grad_loss, const at::Tensor& probs,
                                              const at::Tensor& target, const at::Tensor& energy_coef,
                                              int64_t ignore_index) {
  const char* op = "iaerf::energy_ce_backward_from_probs_";
  check_logits(probs, op);
  TORCH_CHECK_VALUE(probs.is_contiguous(), op, ": probs must be contiguous (the buffer made by the forward)");
  const int64_t N = probs.size(0), K = probs.size(1);
  const auto dtype = probs.scalar_type();
  at::Tensor g = check_rows(grad_loss, N, dtype, op, "grad_loss");
  at::Tensor coef = check_coef(energy_coef, N, dtype, op);
  at::Tensor tgt = check_target(target, N, K, ignore_index, op);
  AT_DISPATCH_FLOATING_TYPES(dtype, "iaerf_energy_ce_bwd_probs", [&] {
    scalar_t* pp = probs.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    const int64_t gs = g.stride(0), cs = coef.dim() == 0 ? 0 : coef.stride(0);
    const int64_t* tp = tgt.data_ptr<int64_t>();
    const int64_t ts = tgt.stride(0);
    at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = pp + i * K;
        const int64_t y = tp[i * ts];
        if (y == ignore_index) {
          std::fill(row, row + K, scalar_t(0));
          continue;
        }
        const scalar_t gi = gp[i * gs];
        const scalar_t w = gi * (scalar_t(1) - cp[i * cs]);
        const scalar_t p_y = row[y];
        scale_row(row, K, w);
        row[y] = w * p_y - gi;
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace iaerf

