// CUDA mix step of iaerf::head_hvp (see head_hvp_kernel.h and csrc/cpu/head_hvp.h for the whole algorithm).
// One warp per (row i, vector c) pair: the row of K entries is read once for the argmax and the inner product
// and written once; the inner product accumulates in double (as the CPU kernel does).
#include "head_hvp_kernel.h"

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

template <typename T>
__global__ void head_hvp_mix_kernel(const T* __restrict__ P, T* __restrict__ U, const T* __restrict__ vb,
                                    int64_t t, int64_t b, int64_t K) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= t * b) return;  // whole warps leave together: the shuffles below see full warps
  const int64_t i = pair / b, c = pair % b;
  const T* p = P + i * K;
  T* row = U + pair * K;  // U[i, c, :] sits at (i * b + c) * K

  // argmax p (lowest index on ties), warp-wide
  T best = -1;
  int64_t top = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    if (p[k] > best) { best = p[k]; top = k; }
  }
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const T ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t ot = __shfl_xor_sync(0xffffffffu, top, off);
    if (ob > best || (ob == best && ot < top)) { best = ob; top = ot; }
  }
  if (vb != nullptr) {
    for (int64_t k = lane; k < K; k += kWarp) row[k] += vb[c * K + k];
    __syncwarp();  // row[top] below may have been updated by another lane
  }
  const T um = row[top];
  double acc = 0.0;
  for (int64_t k = lane; k < K; k += kWarp) acc += static_cast<double>(p[k]) * static_cast<double>(row[k] - um);
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  const T s = static_cast<T>(acc);
  __syncwarp();  // every lane has read row[top] before any lane overwrites it
  for (int64_t k = lane; k < K; k += kWarp) row[k] = p[k] * ((row[k] - um) - s);
}

template <typename T>
cudaError_t launch(const T* P, T* U, const T* vb, int64_t t, int64_t b, int64_t K, cudaStream_t stream) {
  const int64_t pairs = t * b;
  if (pairs == 0 || K == 0) return cudaSuccess;
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks = (pairs + warps_per_block - 1) / warps_per_block;
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  head_hvp_mix_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(P, U, vb, t, b, K);
  return cudaGetLastError();
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
