// ctest for the CUDA head-HVP mix kernel's logic, on CPU: a host emulator runs the kernel's per-lane phases
// (csrc/cuda/head_hvp_lanes.h, the same functions the kernel calls) for the 32 lanes of every warp of the launch
// grid, with the XOR butterfly in __shfl_xor_sync's pairing (every lane reads its partner's value from before the
// step), and is compared with the CPU mix (csrc/cpu/head_hvp.h). The probabilities are not normalised on half the
// rows: there the result depends on which maximum m is used (by u_m * (1 - sum p)), so a wrong tie-break shows up
// in the values as well as in the chosen index. Returns non-zero on the first failed check.
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/head_hvp.h"
#include "cuda/head_hvp_lanes.h"

namespace {

namespace hl = iaerf::head_hvp_lanes;

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

struct Emulated {
  std::vector<int64_t> top;    // [t * b] the index m every lane of the pair's warp settled on
  std::vector<int> visits;     // [t * b] how many warps handled the pair (must be 1)
  int lane_disagreements = 0;  // warps whose lanes ended the butterflies with different m or <p, u - u_m>
};

// One warp of head_hvp_mix_kernel: the lanes run each phase in turn; between phases sits the kernel's shuffle or
// __syncwarp, so running the lanes one after another within a phase sees what the warp would.
template <typename T>
void emulate_warp(const T* p, T* row, const T* bias, int64_t K, Emulated& out, int64_t pair) {
  std::array<hl::ArgMax<T>, hl::kWarp> m;
  for (int lane = 0; lane < hl::kWarp; ++lane) m[lane] = hl::lane_argmax(p, K, lane);
  for (int off = hl::kWarp / 2; off > 0; off /= 2) {
    const auto before = m;
    for (int lane = 0; lane < hl::kWarp; ++lane) m[lane] = hl::argmax_combine(before[lane], before[lane ^ off]);
  }
  if (bias != nullptr) {
    for (int lane = 0; lane < hl::kWarp; ++lane) hl::lane_add_bias(row, bias, K, lane);
  }
  std::array<T, hl::kWarp> um;
  std::array<double, hl::kWarp> acc;
  for (int lane = 0; lane < hl::kWarp; ++lane) um[lane] = row[m[lane].index];
  for (int lane = 0; lane < hl::kWarp; ++lane) acc[lane] = hl::lane_dot(p, row, um[lane], K, lane);
  for (int off = hl::kWarp / 2; off > 0; off /= 2) {
    const auto before = acc;
    for (int lane = 0; lane < hl::kWarp; ++lane) acc[lane] = hl::sum_combine(before[lane], before[lane ^ off]);
  }
  for (int lane = 0; lane < hl::kWarp; ++lane) {
    if (m[lane].index != m[0].index || acc[lane] != acc[0]) ++out.lane_disagreements;
  }
  for (int lane = 0; lane < hl::kWarp; ++lane) hl::lane_write_back(p, row, um[lane], static_cast<T>(acc[lane]), K, lane);
  out.top[pair] = m[0].index;
}

// The launch of head_hvp_kernel.cu's launcher: blocks_for(pairs) blocks of kThreads threads, thread -> (pair, lane)
// through the kernel's own pair_of / lane_of, warps past the last pair idle.
template <typename T>
Emulated emulate_mix(const T* P, T* U, const T* vb, int64_t t, int64_t b, int64_t K) {
  const int64_t pairs = t * b;
  Emulated out;
  out.top.assign(pairs, -1);
  out.visits.assign(pairs, 0);
  for (int64_t block = 0; block < hl::blocks_for(pairs); ++block) {
    for (int warp = 0; warp < hl::kWarpsPerBlock; ++warp) {
      const int first = warp * hl::kWarp;
      const int64_t pair = hl::pair_of(block, first);
      for (int lane = 0; lane < hl::kWarp; ++lane) {
        if (hl::pair_of(block, first + lane) != pair || hl::lane_of(first + lane) != lane) ++out.lane_disagreements;
      }
      if (pair >= pairs) continue;
      ++out.visits[pair];
      const int64_t i = pair / b, c = pair % b;
      emulate_warp(P + i * K, U + pair * K, vb != nullptr ? vb + c * K : nullptr, K, out, pair);
    }
  }
  return out;
}

// p [t, K]: uniform(0.01, 0.5) entries; row 0 all equal (m = 0); the other even rows have 2-4 equal maxima at
// random places, row 1 at K-1, K/2 and 33 (two lanes, one of them twice for K > 64); odd rows from 3 on are
// normalised to sum 1.
std::vector<double> make_probs(int64_t t, int64_t K, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> entry(0.01, 0.5);
  std::vector<double> p(t * K);
  for (auto& x : p) x = entry(gen);
  std::uniform_int_distribution<int64_t> pos(0, K - 1);
  std::uniform_int_distribution<int> count(2, 4);
  for (int64_t i = 0; i < t; ++i) {
    double* row = p.data() + i * K;
    if (i == 0) {
      std::fill(row, row + K, 0.3);
    } else if (i == 1) {
      for (const int64_t k : {K - 1, K / 2, std::min<int64_t>(K - 1, 33)}) row[k] = 0.75;
    } else if (i % 2 == 0) {
      for (int j = count(gen); j > 0; --j) row[pos(gen)] = 0.75;
    } else {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += row[k];
      for (int64_t k = 0; k < K; ++k) row[k] /= sum;
    }
  }
  return p;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

template <typename T>
void compare(int64_t t, int64_t b, int64_t K, bool with_bias, std::mt19937_64& gen) {
  const at::ScalarType dtype = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  const std::string tag = std::string(std::is_same_v<T, float> ? "float" : "double") + " t=" + std::to_string(t) +
                          " b=" + std::to_string(b) + " K=" + std::to_string(K) + (with_bias ? " bias" : " no-bias");
  std::normal_distribution<double> normal;
  std::vector<T> p = cast<T>(make_probs(t, K, gen));
  std::vector<double> u0(t * b * K), bias0(b * K);
  for (auto& x : u0) x = normal(gen);
  for (auto& x : bias0) x = normal(gen);
  std::vector<T> u = cast<T>(u0), bias = cast<T>(bias0);

  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor pt = at::from_blob(p.data(), {t, K}, opts).clone();
  at::Tensor ut = at::from_blob(u.data(), {t, b * K}, opts).clone();
  const at::Tensor vb = with_bias ? at::from_blob(bias.data(), {b, K}, opts).clone() : at::Tensor();
  iaerf::head_hvp_mix_cpu<T>(pt, ut, vb);

  const Emulated emu = emulate_mix<T>(p.data(), u.data(), with_bias ? bias.data() : nullptr, t, b, K);

  check(emu.lane_disagreements == 0, tag + ": lanes of a warp disagree on their pair, m or <p, u - u_m> (" +
                                          std::to_string(emu.lane_disagreements) + ")");
  check(std::all_of(emu.visits.begin(), emu.visits.end(), [](int v) { return v == 1; }),
        tag + ": some (row, vector) pair was handled by no warp or by several");
  const T* want = ut.data_ptr<T>();
  // The two differ only in the summation order of the double inner product, i.e. in the rounding of s.
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-14;
  double worst = 0.0;
  for (int64_t pair = 0; pair < t * b; ++pair) {
    const int64_t i = pair / b;
    const int64_t top = iaerf::head_hvp_row_argmax(p.data() + i * K, K);
    check(emu.top[pair] == top, tag + ": row " + std::to_string(i) + " m=" + std::to_string(emu.top[pair]) +
                                    ", the CPU mix uses m=" + std::to_string(top));
    double err = 0.0, scale = 1e-300;
    for (int64_t k = 0; k < K; ++k) {
      err = std::max(err, std::abs(static_cast<double>(u[pair * K + k]) - static_cast<double>(want[pair * K + k])));
      scale = std::max(scale, std::abs(static_cast<double>(want[pair * K + k])));
    }
    worst = std::max(worst, err / scale);
  }
  check(worst <= tol, tag + ": max row-relative error " + std::to_string(worst));
  std::printf("%s %s (max row-relative error %.3g)\n", worst <= tol ? "ok  " : "FAIL", tag.c_str(), worst);
}

}  // namespace

int main() {
  std::mt19937_64 gen(0);
  for (const int64_t K : {1, 5, 10, 16, 17, 31, 32, 33, 77, 1000}) {  // 1-16: the CPU mix's fixed-length rows
    for (const int64_t b : {1, 3}) {  // 13 and 39 pairs: the last block of 8 warps is partly idle
      for (const bool with_bias : {true, false}) {
        compare<float>(13, b, K, with_bias, gen);
        compare<double>(13, b, K, with_bias, gen);
      }
    }
  }
  // The contract the CUDA binding relies on too: u is written through its data pointer, so a strided u is refused.
  try {
    auto u = at::randn({6, 4}, at::kDouble).t();
    iaerf::head_hvp_mix_cpu<double>(at::full({4, 2}, 0.5, at::kDouble), u, at::Tensor());
    check(false, "non-contiguous u: no error");
  } catch (const c10::Error& e) {
    check(std::string(e.what()).find("u must be contiguous") != std::string::npos,
          std::string("non-contiguous u: unexpected message: ") + e.what());
  }
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
