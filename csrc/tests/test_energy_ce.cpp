// ctest for the fused CPU ops of csrc/cpu/energy_ce.cpp and csrc/cpu/logsumexp.cpp: calls the kernels that
// torch.ops.iaerf.* registers (csrc/cpu/ops.h; the schemas are defined by Python, which this program runs without)
// and compares with ATen compositions (at::logsumexp, at::cross_entropy_loss, autograd of the composition) at a few
// shapes and dtypes. Returns non-zero on the first mismatch.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <tuple>

#include "cpu/ops.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.to(at::kDouble).abs().max().item<double>());
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s: max abs error %.3g > %.3g\n", what.c_str(), err, tol * scale);
    ++failures;
  } else {
    std::printf("ok   %s (max abs error %.3g)\n", what.c_str(), err);
  }
}

template <typename F>
void expect_throws(F&& fn, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error&) {
    std::printf("ok   %s raises\n", what.c_str());
    return;
  }
  std::printf("FAIL %s: no error\n", what.c_str());
  ++failures;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const int64_t ignore_index = -100;
  const std::tuple<int64_t, int64_t> shapes[] = {{1, 1}, {17, 1}, {64, 7}, {33, 1000}, {4, 20000}};
  for (const auto& [n, k] : shapes) {
    for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
      const std::string tag = "N=" + std::to_string(n) + " K=" + std::to_string(k) + " " + c10::toString(dtype);
      const double tol = dtype == at::kBFloat16 ? 2e-2 : 1e-5;
      at::Tensor logits = (at::randn({n, k}, at::kDouble) * 3).to(dtype);
      at::Tensor target = at::randint(0, k, {n}, at::kLong);
      if (n > 2) target.index_put_({1}, ignore_index);
      at::Tensor coef = at::rand({n}, at::kDouble) * 4 - 2;
      const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;

      // float64 reference from ATen on the same (rounded) logits
      at::Tensor z = logits.to(at::kDouble).set_requires_grad(true);
      at::Tensor valid = target.ne(ignore_index);
      at::Tensor ref_lse = at::logsumexp(z, {1});
      at::Tensor ref_ce = at::cross_entropy_loss(z, target, {}, at::Reduction::None, ignore_index);
      at::Tensor ref_loss = at::where(valid, ref_ce - coef * ref_lse, at::zeros({}, at::kDouble));
      at::Tensor ref_grad = torch::autograd::grad({ref_loss.sum()}, {z})[0];

      expect_close(iaerf::logsumexp_cpu(logits), ref_lse.detach(), tol, "logsumexp " + tag);
      auto [loss, ce, lse] = iaerf::energy_ce_forward_cpu(logits, target, coef.to(acc), ignore_index);
      expect_close(loss, ref_loss.detach(), tol, "energy_ce_forward loss " + tag);
      expect_close(ce, ref_ce.detach(), tol, "energy_ce_forward cross_entropy " + tag);
      at::Tensor grad =
          iaerf::energy_ce_backward_cpu(at::ones({n}, acc), logits, target, coef.to(acc), lse, ignore_index);
      expect_close(grad, ref_grad, tol, "energy_ce_backward " + tag);
    }
  }

  at::Tensor logits = at::randn({3, 4});
  expect_throws([&] { iaerf::energy_ce_forward_cpu(logits, at::tensor({0, 4, 1}), at::ones({}), ignore_index); },
                "target out of range");
  expect_throws([&] { iaerf::energy_ce_forward_cpu(logits, at::tensor({0, 1, 1}), at::ones({2}), ignore_index); },
                "energy_coef of wrong shape");
  expect_throws([&] { iaerf::logsumexp_cpu(at::ones({3, 4}, at::kLong)); }, "integer logits");

  std::printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
