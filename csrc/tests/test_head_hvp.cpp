// ctest for iaerf::head_hvp (csrc/cpu/head_hvp.cpp): calls the kernel the op registers (csrc/cpu/ops.h; the schema
// is defined by Python, which this program runs without) and compares it with a
// plain ATen composition of H V = sum_i [(diag p_i - p_i p_i^T) V x~_i] x~_i^T in float64, over shapes, dtypes,
// tile sizes, bias / no bias and minibatch indices. Returns non-zero on the first mismatch.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/ops.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  const double scale = std::max(1e-300, want.abs().max().item<double>());
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s: max relative error %.3g > %.3g\n", what.c_str(), err / scale, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max relative error %.3g)\n", what.c_str(), err / scale);
  }
}

// The composition, one vector and one repeat at a time, float64.
at::Tensor reference(const at::Tensor& x, const at::Tensor& p, const at::Tensor& v, const std::optional<at::Tensor>& idx,
                     bool has_bias) {
  const int64_t K = p.size(1), D = x.size(1), r = v.size(0), b = v.size(1);
  auto out = at::zeros(v.sizes(), v.options().dtype(at::kDouble));
  for (int64_t j = 0; j < r; ++j) {
    const auto xj = (idx ? x.index_select(0, (*idx)[j]) : x).to(at::kDouble);
    const auto pj = (idx ? p.index_select(0, (*idx)[j]) : p).to(at::kDouble);
    for (int64_t c = 0; c < b; ++c) {
      const auto vc = v[j][c].to(at::kDouble);
      auto u = at::matmul(xj, vc.narrow(0, 0, K * D).view({K, D}).t());           // [m, K]
      if (has_bias) u = u + vc.narrow(0, K * D, K);
      const auto rr = pj * u - pj * (pj * u).sum(1, true);                          // (diag p - p p^T) u
      out[j][c].narrow(0, 0, K * D).copy_(at::matmul(rr.t(), xj).reshape({-1}));
      if (has_bias) out[j][c].narrow(0, K * D, K).copy_(rr.sum(0));
    }
  }
  return out;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const std::tuple<int64_t, int64_t, int64_t> shapes[] = {{1, 1, 1}, {57, 6, 3}, {300, 16, 33}, {40, 3, 200}};
  for (const auto& [n, D, K] : shapes) {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const bool has_bias : {true, false}) {
        for (const int64_t tile : {int64_t(0), int64_t(7)}) {
          const auto x = at::randn({n, D}, at::kDouble).to(dtype);
          const auto p = at::softmax(at::randn({n, K}, at::kDouble) * 3, 1).to(dtype);
          const int64_t P = K * D + (has_bias ? K : 0);
          const auto v = at::randn({2, 3, P}, at::kDouble).to(dtype);
          const auto idx = at::randint(0, n, {2, 11}, at::kLong);
          const double tol = dtype == at::kDouble ? 1e-12 : 2e-5;
          const std::string tag = "n=" + std::to_string(n) + " D=" + std::to_string(D) + " K=" + std::to_string(K) +
                                  " " + c10::toString(dtype) + (has_bias ? " bias" : " no-bias") +
                                  " tile=" + std::to_string(tile);
          expect_close(iaerf::head_hvp_cpu(x, p, v, std::nullopt, has_bias, tile),
                       reference(x, p, v, std::nullopt, has_bias), tol, tag + " all rows");
          expect_close(iaerf::head_hvp_cpu(x, p, v, idx, has_bias, tile), reference(x, p, v, idx, has_bias), tol,
                       tag + " indices");
        }
      }
    }
  }
  // wrong P must raise before any work
  try {
    iaerf::head_hvp_cpu(at::randn({4, 3}), at::rand({4, 2}), at::randn({1, 1, 5}), std::nullopt, true, 0);
    std::printf("FAIL wrong P: no error\n");
    ++failures;
  } catch (const c10::Error&) {
    std::printf("ok   wrong P raises\n");
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
