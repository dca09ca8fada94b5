// Launchers of the CUDA part of iaerf::head_hvp (raw pointers + stream; no torch headers, so nvcc compiles the
// .cu alone). The GEMMs run in the binding (head_hvp_cuda.cpp) through ATen/cuBLAS; only the per-row mix lives here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

// U [t, b*K] (in/out, row-major), P [t, K], vb [b, K] or nullptr:
//   u = U[i, c] (+ vb[c]);  U[i, c, :] <- p_i * ((u - u_m) - <p_i, u - u_m>),  m = argmax p_i
// i.e. (diag(p_i) - p_i p_i^T) u, without cancellation on confident rows. Returns cudaErrorInvalidConfiguration when
// the grid would be too large, else cudaSuccess; a launch error stays in the runtime's error state for the caller's
// C10_CUDA_KERNEL_LAUNCH_CHECK (head_hvp_cuda.cpp).
cudaError_t iaerf_head_hvp_mix_f32(const float* P, float* U, const float* vb, int64_t t, int64_t b, int64_t K,
                                   cudaStream_t stream);
cudaError_t iaerf_head_hvp_mix_f64(const double* P, double* U, const double* vb, int64_t t, int64_t b, int64_t K,
                                   cudaStream_t stream);
