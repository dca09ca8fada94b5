// CUDA mix step of iaerf::head_hvp (see head_hvp_kernel.h and csrc/cpu/head_hvp.h for the whole algorithm).
// One warp per (row i, vector c) pair: the row of K entries is read once for the argmax and the inner product
// and written once; the inner product accumulates in double (as the CPU kernel does). The per-lane phases live in
// head_hvp_lanes.h, shared with the host emulator that tests this kernel's logic on CPU.
#include "head_hvp_kernel.h"
#include "head_hvp_lanes.h"

namespace {

namespace hl = iaerf::head_hvp_lanes;

template <typename T>
__global__ void __launch_bounds__(hl::kThreads)
    head_hvp_mix_kernel(const T* __restrict__ P, T* __restrict__ U, const T* __restrict__ vb, int64_t t, int64_t b,
                        int64_t K) {
  const int64_t pair = hl::pair_of(blockIdx.x, threadIdx.x);
  const int lane = hl::lane_of(threadIdx.x);
  if (pair >= t * b) return;  // whole warps leave together: the shuffles below see full warps
  const int64_t i = pair / b, c = pair % b;
  const T* p = P + i * K;
  T* row = U + pair * K;  // U[i, c, :] sits at (i * b + c) * K

  hl::ArgMax<T> m = hl::lane_argmax(p, K, lane);
  for (int off = hl::kWarp / 2; off > 0; off /= 2) {
    const hl::ArgMax<T> other{__shfl_xor_sync(0xffffffffu, m.value, off), __shfl_xor_sync(0xffffffffu, m.index, off)};
    m = hl::argmax_combine(m, other);
  }
  if (vb != nullptr) {
    hl::lane_add_bias(row, vb + c * K, K, lane);
    __syncwarp();  // row[m.index] below may have been updated by another lane
  }
  const T um = row[m.index];
  double acc = hl::lane_dot(p, row, um, K, lane);
  for (int off = hl::kWarp / 2; off > 0; off /= 2) acc = hl::sum_combine(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  __syncwarp();  // every lane has read row[m.index] before any lane overwrites it
  hl::lane_write_back(p, row, um, static_cast<T>(acc), K, lane);
}

// Launch errors are left in the runtime's error state for the binding's C10_CUDA_KERNEL_LAUNCH_CHECK; the status
// returned here is the launcher's own refusal (a grid too large).
template <typename T>
cudaError_t launch(const T* P, T* U, const T* vb, int64_t t, int64_t b, int64_t K, cudaStream_t stream) {
  const int64_t pairs = t * b;
  if (pairs == 0 || K == 0) return cudaSuccess;
  const int64_t blocks = hl::blocks_for(pairs);
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  head_hvp_mix_kernel<T><<<static_cast<unsigned>(blocks), hl::kThreads, 0, stream>>>(P, U, vb, t, b, K);
  return cudaSuccess;
}

}  // namespace

cudaError_t iaerf_head_hvp_mix_f32(const float* P, float* U, const float* vb, int64_t t, int64_t b, int64_t K,
                                   cudaStream_t stream) {
  return launch<float>(P, U, vb, t, b, K, stream);
}

cudaError_t iaerf_head_hvp_mix_f64(const double* P, double* U, const double* vb, int64_t t, int64_t b, int64_t K,
                                   cudaStream_t stream) {
  return launch<double>(P, U, vb, t, b, K, stream);
}
