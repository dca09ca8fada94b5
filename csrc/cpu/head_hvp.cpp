// iaerf::head_hvp: batched analytic Hessian-vector products of softmax cross-entropy over a linear head.
//
//   head_hvp(features [n, D], probs [n, K], v [r, b, K*D (+K)], indices [r, m] | None, has_bias, tile_rows)
//     -> [r, b, K*D (+K)],  out[j, c] = sum_{i in rows_j} vec((diag(p_i) - p_i p_i^T) V_c x~_i x~_i^T)
//
// V_c is vector c reshaped as [K, D] (+ a bias column), x~ = [x, 1], rows_j = indices[j] or all n rows. The
// result is a SUM over rows (the caller divides by n and adds weight decay, and all-reduces first under a
// process group). Layout matches nn.Linear's named_parameters: [weight.flatten(), bias].
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "head_hvp.h"

namespace iaerf {
namespace {

// R = p * (u - <p, u>) row by row, u = U[i, c*K:(c+1)*K] + vb[c]. Written as u - <p,u> = (u - u_m) - <p, u - u_m>
// with m = argmax p (exact when sum p = 1): on confident rows (p_m ~ 1) the direct form cancels to the rounding
// of p_m * u_m, while here every term of the inner product is small and exact to the rounding of p_j.
// The inner product accumulates in double.
template <typename scalar_t>
void mix_cpu(const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
  const int64_t t = pt.size(0), K = pt.size(1), b = u.size(1) / K;
  const scalar_t* P = pt.data_ptr<scalar_t>();
  scalar_t* U = u.data_ptr<scalar_t>();
  const scalar_t* B = vb.defined() ? vb.data_ptr<scalar_t>() : nullptr;
  // >= 64K entries per task: below that a second thread costs more in wake-up/barrier than it saves
  at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, b * K)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* p = P + i * K;
      int64_t top = 0;
      for (int64_t k = 1; k < K; ++k) top = p[k] > p[top] ? k : top;
      for (int64_t c = 0; c < b; ++c) {
        scalar_t* row = U + (i * b + c) * K;
        const scalar_t* bc = B != nullptr ? B + c * K : nullptr;
        const scalar_t um = row[top] + (bc != nullptr ? bc[top] : scalar_t(0));
        // one pass: w = u (+ bias) - u_m stored in place and <p, w> accumulated in four independent double
        // partial sums: a single running sum is a serial chain of dependent adds, the bottleneck at small K
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
          for (int l = 0; l < 4; ++l) {
            const scalar_t w = row[k + l] + (bc != nullptr ? bc[k + l] : scalar_t(0)) - um;
            row[k + l] = w;
            acc[l] += static_cast<double>(p[k + l]) * static_cast<double>(w);
          }
        }
        for (; k < K; ++k) {
          const scalar_t w = row[k] + (bc != nullptr ? bc[k] : scalar_t(0)) - um;
          row[k] = w;
          acc[0] += static_cast<double>(p[k]) * static_cast<double>(w);
        }
        const double dot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        const scalar_t sdot = static_cast<scalar_t>(dot);
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) row[k] = p[k] * (row[k] - sdot);
      }
    }
  });
}

at::Tensor head_hvp_cpu(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& v,
                        const std::optional<at::Tensor>& indices, bool has_bias, int64_t tile_rows) {
  TORCH_CHECK(features.device().is_cpu(), "head_hvp (CPU kernel): features must be a CPU tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "head_hvp: float32 or float64 only, got ", features.scalar_type());
  // ~16 MiB (fp32) per temporary tile: measured on 2 cores, 100-row tiles (4 MiB at b*K = 10^4) lose a third of
  // the GEMM rate to the thin second GEMM, 400+ rows do not; memory stays bounded for any n.
  return head_hvp_tiled(features, probs, v, indices, has_bias, tile_rows, int64_t(1) << 22,
                        [](const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
                          AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "head_hvp_mix_cpu",
                                                     [&] { mix_cpu<scalar_t>(pt, u, vb); });
                        });
}

}  // namespace
}  // namespace iaerf

TORCH_LIBRARY_FRAGMENT(iaerf, m) {
  m.def("head_hvp(Tensor features, Tensor probs, Tensor v, Tensor? indices, bool has_bias, int tile_rows=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(iaerf, CPU, m) {
  m.impl("head_hvp", &iaerf::head_hvp_cpu);
}
