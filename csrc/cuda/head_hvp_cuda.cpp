// CUDA kernel of iaerf::head_hvp (schema and Python side: iaerf/ops/head_hvp.py): the row-tiled driver of
// csrc/cpu/head_hvp.h (GEMMs through ATen/cuBLAS on the current stream) with the mix step launched from
// head_hvp_kernel.cu. Only compiled when CUDA is.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/head_hvp.h"
#include "head_hvp_kernel.h"

namespace iaerf {
namespace {

void mix_cuda(const at::Tensor& pt, at::Tensor& u, const at::Tensor& vb) {
  // pt is a row slice or an index_select of a contiguous [n, K] tensor, so .contiguous() costs nothing. u is written
  // in place, where a contiguous copy would lose the result: the shared mix check refuses a strided u instead (the
  // mm that makes it returns a contiguous tensor).
  const auto p = pt.contiguous();
  const auto bias = vb.defined() ? vb.contiguous() : vb;
  head_hvp_mix_check(p, u, bias);
  TORCH_CHECK(u.is_cuda(), "head_hvp mix (CUDA): u must be a CUDA tensor, got ", u.device());
  const int64_t t = p.size(0), K = p.size(1), b = u.size(1) / K;
  const auto stream = c10::cuda::getCurrentCUDAStream(u.device().index()).stream();
  cudaError_t err;
  if (u.scalar_type() == at::kFloat) {
    err = iaerf_head_hvp_mix_f32(p.data_ptr<float>(), u.data_ptr<float>(),
                                 bias.defined() ? bias.data_ptr<float>() : nullptr, t, b, K, stream);
  } else {
    err = iaerf_head_hvp_mix_f64(p.data_ptr<double>(), u.data_ptr<double>(),
                                 bias.defined() ? bias.data_ptr<double>() : nullptr, t, b, K, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "head_hvp CUDA mix kernel not launched (t=", t, ", b=", b, ", K=", K,
              "): ", cudaGetErrorString(err));
  // The launch itself, and any earlier asynchronous kernel fault that has surfaced by now, through torch's check
  // (device-side assertion info, CUDA_LAUNCH_BLOCKING=1 for a synchronous report).
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
