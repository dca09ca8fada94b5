// Shared row-tiled driver of iaerf::head_hvp (the analytic Hessian-vector product of a linear softmax
// classifier, paper Eq. 7 with H = (1/n) sum_i d^2 CE_i). Used by the CPU kernel (head_hvp.cpp) and the CUDA
// binding (../cuda/head_hvp_cuda.cpp); they differ only in the elementwise "mix" step.
//
// For one repeat j and a tile of rows T (t rows, x~ = [x, 1]):
//   U[i, c, :] = V_c x~_i                     one GEMM for all b vectors: X_T [t,D] x Vw^T [D, b*K]  (+ bias)
//   R[i, c, :] = p_i * (U - <p_i, U>)          = (diag(p_i) - p_i p_i^T) V_c x~_i       (mix, in place)
//   Hw_c += R_c^T X_T,  Hb_c += sum_i R_c      one GEMM: R^T [b*K, t] x X_T [t, D]
// so nothing of size b x n x K exists: the live temporaries are [t, b*K] per tile.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace iaerf {

inline void head_hvp_check(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& v,
                           const std::optional<at::Tensor>& indices, bool has_bias) {
  TORCH_CHECK(features.dim() == 2, "head_hvp: features must be [n, D], got ", features.sizes());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == features.size(0),
              "head_hvp: probs must be [n, K] with the n of features, got ", probs.sizes());
  TORCH_CHECK(v.dim() == 3, "head_hvp: v must be [r, b, P], got ", v.sizes());
  const int64_t K = probs.size(1), D = features.size(1);
  TORCH_CHECK(v.size(2) == K * D + (has_bias ? K : 0), "head_hvp: v has P=", v.size(2), " but K*D", (has_bias ? "+K" : ""),
              "=", K * D + (has_bias ? K : 0));
  TORCH_CHECK(features.scalar_type() == probs.scalar_type() && features.scalar_type() == v.scalar_type(),
              "head_hvp: features, probs and v must share a dtype");
  TORCH_CHECK(features.device() == probs.device() && features.device() == v.device(),
              "head_hvp: features, probs and v must be on one device");
  if (indices.has_value()) {
    const auto& idx = *indices;
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == v.size(0),
                "head_hvp: indices must be int64 [r, m] with r=v.size(0), got ", idx.sizes());
    TORCH_CHECK(idx.device() == features.device(), "head_hvp: indices must be on the device of features");
  }
}

// mix(P_T [t,K], U [t, b*K] in/out, vb_j [b, K] or undefined) applies the per-row softmax-Hessian in place.
template <typename Mix>
at::Tensor head_hvp_tiled(const at::Tensor& features_in, const at::Tensor& probs_in, const at::Tensor& v_in,
                          const std::optional<at::Tensor>& indices, bool has_bias, int64_t tile_rows,
                          int64_t default_tile_elems, Mix mix) {
  head_hvp_check(features_in, probs_in, v_in, indices, has_bias);
  const auto features = features_in.contiguous();
  const auto probs = probs_in.contiguous();
  const auto v = v_in.contiguous();
  const int64_t n = features.size(0), D = features.size(1), K = probs.size(1);
  const int64_t r = v.size(0), b = v.size(1);
  auto out_w = at::zeros({r, b * K, D}, v.options());
  auto out_b = has_bias ? at::zeros({r, b, K}, v.options()) : at::Tensor();
  if (r == 0 || b == 0 || K == 0) {
    return has_bias ? at::cat({out_w.view({r, b, K * D}), out_b}, 2) : out_w.view({r, b, K * D});
  }
  const auto vw = v.narrow(2, 0, K * D).reshape({r, b * K, D});        // V_c as [K, D] blocks, stacked
  const auto vb = has_bias ? v.narrow(2, K * D, K).contiguous() : at::Tensor();
  // Rows per tile: the [t, b*K] temporary stays around default_tile_elems entries (cache/memory bound).
  int64_t tile = tile_rows > 0 ? tile_rows : std::max<int64_t>(64, default_tile_elems / std::max<int64_t>(1, b * K));
  for (int64_t j = 0; j < r; ++j) {
    const at::Tensor rows = indices.has_value() ? (*indices)[j] : at::Tensor();
    const int64_t m = indices.has_value() ? rows.size(0) : n;
    const auto vwt = vw[j].t();                                             // [D, b*K]
    auto hw = out_w[j];                                                     // [b*K, D]
    for (int64_t s = 0; s < m; s += tile) {
      const int64_t e = std::min(m, s + tile);
      at::Tensor xt, pt;
      if (indices.has_value()) {
        const auto sel = rows.slice(0, s, e);
        xt = features.index_select(0, sel);
        pt = probs.index_select(0, sel);
      } else {
        xt = features.slice(0, s, e);
        pt = probs.slice(0, s, e);
      }
      auto u = at::mm(xt, vwt);                                             // [t, b*K]
      mix(pt, u, has_bias ? vb[j] : at::Tensor());
      hw.addmm_(u.t(), xt);                                                 // += R^T X_T
      if (has_bias) out_b[j].add_(u.view({e - s, b, K}).sum(0));
    }
  }
  return has_bias ? at::cat({out_w.view({r, b, K * D}), out_b}, 2) : out_w.view({r, b, K * D});
}

}  // namespace iaerf
