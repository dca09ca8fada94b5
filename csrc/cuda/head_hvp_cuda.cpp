// CUDA binding of iaerf::head_hvp: the row-tiled driver of csrc/cpu/head_hvp.h (GEMMs through ATen/cuBLAS on the
// current stream) with the mix step launched from head_hvp_kernel.cu. Only compiled when CUDA is.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/head_hvp.h"
#include "head_hvp_kernel.h"

namespace iaerf {
namespace {

void mix_cuda(const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
  const int64_t t = pt.size(0), K = pt.size(1), b = u.size(1) / K;
  const auto stream = c10::cuda::getCurrentCUDAStream(pt.device().index()).stream();
  // pt is a row slice or an index_select of a contiguous [n, K] tensor: contiguous either way.
  const auto p = pt.contiguous();
  const auto bias = vb.defined() ? vb.contiguous() : vb;
  cudaError_t err;
  if (u.scalar_type() == at::kFloat) {
    err = iaerf_head_hvp_mix_f32(p.data_ptr<float>(), u.data_ptr<float>(),
                                 bias.defined() ? bias.data_ptr<float>() : nullptr, t, b, K, stream);
  } else {
    err = iaerf_head_hvp_mix_f64(p.data_ptr<double>(), u.data_ptr<double>(),
                                 bias.defined() ? bias.data_ptr<double>() : nullptr, t, b, K, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "head_hvp CUDA mix kernel failed: ", cudaGetErrorString(err));
}

at::Tensor head_hvp_cuda(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& v,
                         const std::optional<at::Tensor>& indices, bool has_bias, int64_t tile_rows) {
  TORCH_CHECK(features.is_cuda(), "head_hvp (CUDA kernel): features must be a CUDA tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "head_hvp: float32 or float64 only, got ", features.scalar_type());
  const c10::cuda::CUDAGuard guard(features.device());
  // ~64 MiB (fp32) per tile: large GEMMs keep the tensor cores busy; memory stays bounded for any n.
  return head_hvp_tiled(features, probs, v, indices, has_bias, tile_rows, int64_t(1) << 24, mix_cuda);
}

}  // namespace
}  // namespace iaerf

TORCH_LIBRARY_IMPL(iaerf, CUDA, m) {
  m.impl("head_hvp", &iaerf::head_hvp_cuda);
}
