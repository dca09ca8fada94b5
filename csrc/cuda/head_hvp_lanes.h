// Per-lane phases of the CUDA head-HVP mix kernel (head_hvp_kernel.cu), shared with a host emulator
// (csrc/tests/test_head_hvp_lanes.cpp) so that the kernel's logic runs, and is tested, on a machine without a GPU.
// Plain C++ when not compiled by nvcc; no torch headers (nvcc compiles the .cu alone).
//
// One warp handles one (row i, vector c) pair; lane l owns the strided entries k = l, l + 32, l + 64, ... of the
// row. The kernel is, per lane:
//   m = lane_argmax(p)                      then XOR butterfly (offsets 16, 8, 4, 2, 1) with argmax_combine
//   lane_add_bias(row, bias)                (if any; then __syncwarp: row[m.index] may belong to another lane)
//   acc = lane_dot(p, row, row[m.index])    then XOR butterfly with sum_combine
//   lane_write_back(p, row, um, T(acc))     (after __syncwarp: every lane has read row[m.index])
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define IAERF_HD __host__ __device__
#else
#define IAERF_HD
#endif

namespace iaerf {
namespace head_hvp_lanes {

constexpr int kWarp = 32;
constexpr int kThreads = 256;                    // threads per block: 8 warps, i.e. 8 (row, vector) pairs
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Which (row, vector) pair, and which lane of it, a thread handles. Pairs at or past t * b belong to the last
// block's idle warps, which leave as whole warps (the shuffles need full warps).
IAERF_HD inline int64_t pair_of(int64_t block, int thread) {
  return (block * kThreads + thread) / kWarp;
}
IAERF_HD inline int lane_of(int thread) { return thread % kWarp; }
inline int64_t blocks_for(int64_t pairs) { return (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock; }

template <typename T>
struct ArgMax {
  T value;
  int64_t index;
};

// Largest p[k] over this lane's entries, the lowest such k on ties (a strict > while k increases). A lane with no
// entries (K < 32) holds -inf at index 0, which loses to every entry or ties at the lowest index.
template <typename T>
IAERF_HD inline ArgMax<T> lane_argmax(const T* p, int64_t K, int lane) {
  ArgMax<T> m{static_cast<T>(-INFINITY), 0};
  for (int64_t k = lane; k < K; k += kWarp) {
    if (p[k] > m.value) m = ArgMax<T>{p[k], k};
  }
  return m;
}

// One butterfly step: the larger value wins, the lower index on equal values, so every lane ends with the same
// (value, index) whatever the pairing, and that index is the one the CPU mix picks (the first maximum).
template <typename T>
IAERF_HD inline ArgMax<T> argmax_combine(ArgMax<T> own, ArgMax<T> other) {
  return (other.value > own.value || (other.value == own.value && other.index < own.index)) ? other : own;
}

IAERF_HD inline double sum_combine(double own, double other) { return own + other; }

template <typename T>
IAERF_HD inline void lane_add_bias(T* row, const T* bias, int64_t K, int lane) {
  for (int64_t k = lane; k < K; k += kWarp) row[k] += bias[k];
}

// This lane's share of <p, u - u_m>, accumulated in double like the CPU mix.
template <typename T>
IAERF_HD inline double lane_dot(const T* p, const T* row, T um, int64_t K, int lane) {
  double acc = 0.0;
  for (int64_t k = lane; k < K; k += kWarp) acc += static_cast<double>(p[k]) * static_cast<double>(row[k] - um);
  return acc;
}

// row <- p * ((u - u_m) - <p, u - u_m>) on this lane's entries.
template <typename T>
IAERF_HD inline void lane_write_back(const T* p, T* row, T um, T s, int64_t K, int lane) {
  for (int64_t k = lane; k < K; k += kWarp) row[k] = p[k] * ((row[k] - um) - s);
}

}  // namespace head_hvp_lanes
}  // namespace iaerf
