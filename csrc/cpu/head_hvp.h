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
#include <ATen/Parallel.h>

#include "softmax_rows.h"  // cpu::with_row_length

#include <algorithm>
#include <optional>

namespace iaerf {
// Everything here is compiled once per CPU capability (capability.h): the CPU mix is one of the kernels that
// kernels() picks at run time (head_hvp.cpp calls it through the table), and an inline namespace keeps each
// copy's symbols apart.
inline namespace CPU_CAPABILITY {

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

// The contract of every mix step (CPU here, CUDA in ../cuda/head_hvp_cuda.cpp): they index raw row-major memory.
inline void head_hvp_mix_check(const at::Tensor& pt, const at::Tensor& u, const at::Tensor& vb) {
  TORCH_CHECK(pt.dim() == 2 && pt.is_contiguous(), "head_hvp mix: probs tile must be a contiguous [t, K], got ",
              pt.sizes(), " with strides ", pt.strides());
  const int64_t t = pt.size(0), K = pt.size(1);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == t && K > 0 && u.size(1) % K == 0,
              "head_hvp mix: u must be [t=", t, ", b*K] with K=", K, ", got ", u.sizes());
  TORCH_CHECK(u.is_contiguous(), "head_hvp mix: u must be contiguous (it is updated in place through its data "
              "pointer), got strides ", u.strides());
  TORCH_CHECK(pt.scalar_type() == u.scalar_type() && pt.device() == u.device(),
              "head_hvp mix: probs tile and u must share dtype and device");
  if (vb.defined()) {
    TORCH_CHECK(vb.dim() == 2 && vb.size(0) == u.size(1) / K && vb.size(1) == K && vb.is_contiguous(),
                "head_hvp mix: bias must be a contiguous [b=", u.size(1) / K, ", K=", K, "], got ", vb.sizes());
    TORCH_CHECK(vb.scalar_type() == u.scalar_type() && vb.device() == u.device(),
                "head_hvp mix: bias and u must share dtype and device");
  }
}

// m = argmax p over K entries, the first one on ties (the CUDA kernel's warp reduction picks the same).
template <typename scalar_t, typename Len = int64_t>
inline int64_t head_hvp_row_argmax(const scalar_t* p, Len K) {
  int64_t top = 0;
  for (int64_t k = 1; k < K; ++k) top = p[k] > p[top] ? k : top;
  return top;
}

// One (row, vector) pair of the CPU mix: row <- p * (w - <p, w>), w = row (+ bias) - (row (+ bias))_top.
// Len is int64_t or a std::integral_constant (cpu::with_row_length): at K ~ 10 a runtime-length loop spends more
// on its prologue and epilogue than on the row (the mix took ~40% of the HVP at n = 10^4, D = 64, K = 10, b = 10).
template <typename scalar_t, bool kBias, typename Len>
__attribute__((always_inline)) inline void head_hvp_mix_pair(const scalar_t* p, scalar_t* row, const scalar_t* bc,
                                                             Len K, int64_t top) {
  const scalar_t um = row[top] + (kBias ? bc[top] : scalar_t(0));
  // one pass: w stored in place and <p, w> accumulated in four independent double partial sums: a single
  // running sum is a serial chain of dependent adds, the bottleneck at small K
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int l = 0; l < 4; ++l) {
      const scalar_t w = row[k + l] + (kBias ? bc[k + l] : scalar_t(0)) - um;
      row[k + l] = w;
      acc[l] += static_cast<double>(p[k + l]) * static_cast<double>(w);
    }
  }
  for (; k < K; ++k) {
    const scalar_t w = row[k] + (kBias ? bc[k] : scalar_t(0)) - um;
    row[k] = w;
    acc[0] += static_cast<double>(p[k]) * static_cast<double>(w);
  }
  const scalar_t sdot = static_cast<scalar_t>((acc[0] + acc[1]) + (acc[2] + acc[3]));
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) row[j] = p[j] * (row[j] - sdot);
}

// CPU mix: R = p * (u - <p, u>) row by row, u = U[i, c*K:(c+1)*K] + vb[c]. Written as
// u - <p,u> = (u - u_m) - <p, u - u_m> with m = argmax p (exact when sum p = 1): on confident rows (p_m ~ 1) the
// direct form cancels to the rounding of p_m * u_m, while here every term of the inner product is small and exact
// to the rounding of p_j. The inner product accumulates in double.
template <typename scalar_t>
void head_hvp_mix_cpu(const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
  head_hvp_mix_check(pt, u, vb);
  const int64_t t = pt.size(0), K = pt.size(1), b = u.size(1) / K;
  const scalar_t* P = pt.data_ptr<scalar_t>();
  scalar_t* U = u.data_ptr<scalar_t>();
  const scalar_t* B = vb.defined() ? vb.data_ptr<scalar_t>() : nullptr;
  cpu::with_row_length(K, [&](auto Kc) {
    // >= 64K entries per task: below that a second thread costs more in wake-up/barrier than it saves
    at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, b * K)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* p = P + i * K;
        const int64_t top = head_hvp_row_argmax(p, Kc);
        scalar_t* rows = U + i * b * K;
        if (B != nullptr) {
          for (int64_t c = 0; c < b; ++c) head_hvp_mix_pair<scalar_t, true>(p, rows + c * K, B + c * K, Kc, top);
        } else {
          for (int64_t c = 0; c < b; ++c) head_hvp_mix_pair<scalar_t, false>(p, rows + c * K, B, Kc, top);
        }
      }
    });
  });
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

}  // namespace CPU_CAPABILITY
}  // namespace iaerf
