// The CPU kernel of iaerf::head_hvp (schema and Python side: iaerf/ops/head_hvp.py): batched analytic
// Hessian-vector products of softmax cross-entropy over a linear head.
//
//   head_hvp(features [n, D], probs [n, K], v [r, b, K*D (+K)], indices [r, m] | None, has_bias, tile_rows)
//     -> [r, b, K*D (+K)],  out[j, c] = sum_{i in rows_j} vec((diag(p_i) - p_i p_i^T) V_c x~_i x~_i^T)
//
// V_c is vector c reshaped as [K, D] (+ a bias column), x~ = [x, 1], rows_j = indices[j] or all n rows. The
// result is a SUM over rows (the caller divides by n and adds weight decay, and all-reduces first under a
// process group). Layout matches nn.Linear's named_parameters: [weight.flatten(), bias].
#include <torch/library.h>

#include "head_hvp.h"
#include "ops.h"

namespace iaerf {

at::Tensor head_hvp_cpu(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& v,
                        const std::optional<at::Tensor>& indices, bool has_bias, int64_t tile_rows) {
  TORCH_CHECK(features.device().is_cpu(), "head_hvp (CPU kernel): features must be a CPU tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "head_hvp: float32 or float64 only, got ", features.scalar_type());
  // ~16 MiB (fp32) per temporary tile: measured on 2 cores, 100-row tiles (4 MiB at b*K = 10^4) lose a third of
  // the GEMM rate to the thin second GEMM, 400+ rows do not; memory stays bounded for any n.
  return head_hvp_tiled(features, probs, v, indices, has_bias, tile_rows, int64_t(1) << 22,
                        [](const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
                          cpu::kernels().head_hvp_mix(pt, u, vb);  // the copy of the running CPU capability
                        });
}

}  // namespace iaerf

TORCH_LIBRARY_IMPL(iaerf, CPU, m) {
  m.impl("head_hvp", &iaerf::head_hvp_cpu);
}
