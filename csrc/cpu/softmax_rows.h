// Row kernels shared by the fused CPU ops (csrc/cpu/logsumexp_kernels.h, csrc/cpu/energy_ce_kernels.h): the
// vectorised exp, the shift-free forward core, argument checks and buffers. Compiled once per CPU capability
// (capability.h).
//
// Rows are split across threads by at::parallel_for; each row is read once from memory (the later passes over
// the same row hit cache). Two ways to get the gradient, both with at most one [N, K] buffer:
//   - recompute (energy_ce_forward + energy_ce_backward): the forward saves only the lse [N]; the backward reads
//     the logits once, recomputes softmax from the lse (flash-attention style) and writes the gradient once;
//   - keep the softmax (energy_ce_forward_with_probs + energy_ce_backward_from_probs_): the forward also writes
//     softmax(z) [N, K] while the row is in cache, and the backward turns that buffer into the gradient in
//     place (one multiply per element instead of an exp). On CPUs the exp dominates, so this is the faster
//     choice when a backward will follow; the buffer it keeps is the one that becomes the gradient.
// The forward takes exp(z) without the usual max shift while that is exact enough (see forward_rows), which
// removes the max pass and lets a block of short rows share one vectorised loop.
//
// Accumulation is fp32 for fp32/fp16/bf16 logits and fp64 for fp64 logits (the latter exists for gradcheck).
// Results (loss, cross-entropy, lse) are fp32, or fp64 for fp64 logits; gradients have the logits' dtype.
//
// Edge conventions (shared with the Triton kernels and the Python reference, documented in docs/ops.md):
//   - a row whose max is +-inf uses shift 0, as torch.logsumexp does: an all -inf row gives lse = -inf
//     (energy +inf, CE nan), a row containing +inf gives lse = +inf;
//   - NaN anywhere in a row makes that row's results NaN, and only that row's;
//   - rows whose target equals ignore_index get loss 0, CE 0 and zero gradient (their lse is still computed).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "capability.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace iaerf {
namespace cpu {
// compiled once per capability: see capability.h
inline namespace CPU_CAPABILITY {


// exp for float with ~2 ulp error, written so that gcc vectorises loops calling it (-O3 -fno-trapping-math, at the
// vector width of each capability: capability.h; without -fno-trapping-math gcc 12 vectorises them only with
// AVX-512 masks, and left the AVX2 forward 4x slower than the AVX-512 one): std::exp is a libm call per element
// and dominates the runtime of a scalar loop. Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, then the Cephes minimax polynomial for exp(r), then scaling by 2^n via the
// exponent bits. n is rounded with the 1.5 * 2^23 magic constant rather than std::floor + int conversion,
// because gcc does not vectorise the latter. NaN stays NaN (every comparison with NaN is false),
// x < -87.34 gives 0 and x > 88.02 gives inf. always_inline: gcc 12 otherwise keeps an out-of-line copy once the
// op's many instantiations exhaust its inlining budget, and a loop calling it per element does not vectorise
// (measured on a 2-core Xeon, N = 8192: the fp32 logsumexp forward took 13.3 ms at K = 1000 out of line, 1.9 ms
// inlined).
__attribute__((always_inline)) inline float fast_exp(float x) {
  constexpr float kHi = 88.02f;  // above this 2^n would leave the normal range; such x give inf (see below)
  constexpr float kLo = -87.3365447504f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  // Only the lower clamp matters for the bit trick; large x are replaced by inf at the end. Arguments here are
  // z - shift <= 0 except in rows holding +inf or NaN, so returning inf for x in (88.02, 88.72] costs nothing.
  const float xc = x < kLo ? kLo : x;
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  int32_t tbits;
  std::memcpy(&tbits, &t, sizeof(tbits));
  const int32_t bits = (tbits - 0x4B400000 + 127) << 23;  // (n + 127) << 23: the float 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = er * scale;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

__attribute__((always_inline)) inline double exp_acc(double x) { return std::exp(x); }
__attribute__((always_inline)) inline float exp_acc(float x) { return fast_exp(x); }

// log of a positive normal float (the row sums the forward takes it of: [1e-15, max finite], see forward_rows),
// 0.75 ulp: Cephes logf, branch-free so that a loop over a block of row sums vectorises. A libm logf call per row
// took more time than the whole exp pass at K = 10 (a 2-core Xeon, N = 8192).
__attribute__((always_inline)) inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e with m in [0.5, 1)
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool low = m < 0.707106781186547524f;  // m in [sqrt(1/2), sqrt(2)) after the shift below
  e = low ? e - 1 : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

__attribute__((always_inline)) inline double log_acc(double x) { return std::log(x); }
__attribute__((always_inline)) inline float log_acc(float x) { return fast_log(x); }

// Calls f(n) with the row length n as a compile-time constant for K <= kShortRow (std::integral_constant), else
// with K itself. Loops over a row of a known short length unroll into straight-line code; a runtime-length loop
// spends more on its vector prologue and epilogue than on a row of ~10 elements. The switch is per row and
// perfectly predicted.
constexpr int64_t kShortRow = 16;

template <typename F>
__attribute__((always_inline)) inline auto with_row_length(int64_t K, F&& f) {
  switch (K) {
#define IAERF_ROW_LENGTH(n) \
  case n:                   \
    return f(std::integral_constant<int64_t, n>{});
    IAERF_ROW_LENGTH(1) IAERF_ROW_LENGTH(2) IAERF_ROW_LENGTH(3) IAERF_ROW_LENGTH(4)
    IAERF_ROW_LENGTH(5) IAERF_ROW_LENGTH(6) IAERF_ROW_LENGTH(7) IAERF_ROW_LENGTH(8)
    IAERF_ROW_LENGTH(9) IAERF_ROW_LENGTH(10) IAERF_ROW_LENGTH(11) IAERF_ROW_LENGTH(12)
    IAERF_ROW_LENGTH(13) IAERF_ROW_LENGTH(14) IAERF_ROW_LENGTH(15) IAERF_ROW_LENGTH(16)
#undef IAERF_ROW_LENGTH
    default:
      return f(K);
  }
}

// Short rows: 16 independent lanes that the compiler keeps in one vector register, and no reduction
// prologue/epilogue, which otherwise costs more than the row itself at K ~ 10.
template <typename acc_t>
inline acc_t row_max_short(const acc_t* x, int64_t K) {
  constexpr int kLanes = 16;
  acc_t part[kLanes];
  for (int j = 0; j < kLanes; ++j) part[j] = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] = x[k + j] > part[j] ? x[k + j] : part[j];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (; k < K; ++k) m = x[k] > m ? x[k] : m;
  for (int j = 0; j < kLanes; ++j) m = part[j] > m ? part[j] : m;
  return m;
}

// Max of a row, ignoring NaN (a NaN row still ends NaN: exp(NaN - shift) enters the sum).
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t K) {
  if (K < 64) return row_max_short(x, K);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < K; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* x, int64_t K) {
  if (K <= kShortRow) {
    return with_row_length(K, [&](auto n) {
      acc_t s = 0;
#pragma GCC unroll 16
      for (int64_t k = 0; k < n; ++k) s += x[k];
      return s;
    });
  }
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) s += x[k];
  return s;
}

// lse of one contiguous row; leaves e_k = exp(z_k - shift) in `exps` and returns (lse, sum_k e_k). The exps go
// through memory (L1) rather than into the reduction directly: gcc vectorises the two simple loops far better
// than one loop holding both the exp and the reduction. A max of +-inf uses shift 0 (torch.logsumexp's rule).
template <typename acc_t>
inline std::pair<acc_t, acc_t> row_lse(const acc_t* x, int64_t K, acc_t* exps) {
  const acc_t m = row_max(x, K);
  const acc_t shift = std::isinf(m) ? acc_t(0) : m;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) exps[k] = exp_acc(x[k] - shift);
  const acc_t s = row_sum(exps, K);
  return {shift + std::log(s), s};
}

// out_k = scale * exp(x_k - lse): the softmax part of the recomputing backward.
template <typename acc_t>
inline void scaled_softmax_row(const acc_t* x, int64_t K, acc_t lse, acc_t scale, acc_t* out) {
  with_row_length(K, [&](auto n) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = scale * exp_acc(x[k] - lse);
  });
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t K, acc_t scale) {
  with_row_length(K, [&](auto n) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) x[k] *= scale;
  });
}

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Gives each row as a contiguous acc_t array: the logits memory itself when it already is one (fp32 or fp64
// with unit column stride), else a per-thread copy converted to acc_t (fp16/bf16, strided columns).
template <typename scalar_t>
class RowReader {
 public:
  using acc_t = typename AccType<scalar_t>::type;
  RowReader(const at::Tensor& logits)
      : base_(logits.data_ptr<scalar_t>()), K_(logits.size(1)), s0_(logits.stride(0)), s1_(logits.stride(1)) {
    direct_ = std::is_same<scalar_t, acc_t>::value && (s1_ == 1 || K_ == 1);
    if (!direct_) buf_.resize(K_);
  }
  const acc_t* row(int64_t i) {
    const scalar_t* src = base_ + i * s0_;
    if (direct_) return reinterpret_cast<const acc_t*>(src);
    for (int64_t k = 0; k < K_; ++k) buf_[k] = static_cast<acc_t>(src[k * s1_]);
    return buf_.data();
  }

 private:
  const scalar_t* base_;
  int64_t K_, s0_, s1_;
  bool direct_;
  std::vector<acc_t> buf_;
};

// A fresh multi-MB output is faulted in 4 KiB pages at first touch, which on virtualised machines costs more than
// the kernel writing it (measured here: 268 MB took ~100-160 ms to fault, 7 ms to write once mapped). Asking
// for transparent huge pages on the (2 MiB-aligned interior of the) buffer before it is touched cuts that ~5x.
// Advisory only: where THP is off, unsupported or the memory is already mapped, nothing changes.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// An uninitialised contiguous [N, K] buffer shaped like the logits, for softmax or gradients.
inline at::Tensor new_rows_buffer(const at::Tensor& logits, at::ScalarType dtype) {
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(out);
  return out;
}

// Rows per parallel task: enough elements per task that thread hand-off costs stay small.
inline int64_t grain_rows(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

inline at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [N, K], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one class (K >= 1), got shape ",
                    logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
                   ": logits must be float32, float16, bfloat16 or float64, got ", t);
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got one on ", t.device());
}

// A per-row vector argument: [N] (any stride) -> returned as is, cast to dtype.
inline at::Tensor check_rows(const at::Tensor& v, int64_t N, at::ScalarType dtype, const char* op, const char* name) {
  check_cpu(v, op, name);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == N, op, ": ", name, " must have shape [N] = [", N,
                    "], got shape ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), op, ": ", name, " must be floating point, got ",
                   v.scalar_type());
  return v.scalar_type() == dtype ? v : v.to(dtype);
}

// energy_coef: a 0-dim tensor (one coefficient for every row) or [N].
inline at::Tensor check_coef(const at::Tensor& coef, int64_t N, at::ScalarType dtype, const char* op) {
  check_cpu(coef, op, "energy_coef");
  TORCH_CHECK_TYPE(at::isFloatingType(coef.scalar_type()), op, ": energy_coef must be floating point, got ",
                   coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 0 || (coef.dim() == 1 && coef.size(0) == N), op,
                    ": energy_coef must be a scalar or have shape [N] = [", N, "], got shape ", coef.sizes());
  at::Tensor c = coef.scalar_type() == dtype ? coef : coef.to(dtype);
  // Every coefficient must be finite in the accumulation dtype (a float64 1e300 becomes inf in float32). Checked
  // here rather than in Python: a scan of [N] floats costs less than one small torch op.
  AT_DISPATCH_FLOATING_TYPES(dtype, "iaerf_check_coef", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    const int64_t n = c.dim() == 0 ? 1 : N, stride = c.dim() == 0 ? 0 : c.stride(0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(p[i * stride]), op, ": energy_coef",
                        c.dim() == 0 ? std::string() : "[" + std::to_string(i) + "]", " = ",
                        coef.reshape(-1)[i].item<double>(), " is not finite in ",
                        dtype == at::kDouble ? "float64" : "float32",
                        " (the accumulation dtype: float64 for float64 logits, else float32)");
    }
  });
  return c;
}

// Checks every target before any kernel runs: integer dtype, shape [N], values in [0, K) or ignore_index. Counts
// the rows that are not ignored into *num_valid when given (the "mean" reduction's divisor, for free in this scan).
inline at::Tensor check_target(const at::Tensor& target, int64_t N, int64_t K, int64_t ignore_index, const char* op,
                               int64_t* num_valid = nullptr) {
  check_cpu(target, op, "target");
  TORCH_CHECK_TYPE(!at::isFloatingType(target.scalar_type()) && !at::isComplexType(target.scalar_type()) &&
                       target.scalar_type() != at::kBool,
                   op, ": target must be an integer tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op, ": target must have shape [N] = [", N,
                    "], got shape ", target.sizes());
  at::Tensor t = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t s = t.stride(0);
  int64_t valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = p[i * s];
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < K), op, ": target[", i, "] = ", y,
                      " is outside [0, K) with K = ", K, " and is not ignore_index (", ignore_index, ")");
    valid += y != ignore_index;
  }
  if (num_valid) *num_valid = valid;
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// Forward core shared by every forward op: per row, lse (always) and softmax (when probs is defined), then
// `per_row(i, x, lse)` for the op's own outputs.
//
// Shift-free fast path: the textbook lse subtracts the row max before exp, which costs a max pass per row and
// makes every row a separate short loop. Instead exp(z) is taken without a shift, over a whole block of rows in
// one flat vectorised loop when the rows are adjacent in memory, and a row is redone with the max shift only
// when its sum leaves [kMinSafeSum, max finite]: that catches overflow (+inf, NaN, max z > ~88 in fp32) and rows
// so negative that terms below exp's underflow threshold could matter. Inside the range the largest term is at
// least kMinSafeSum / K, so underflowed terms are < 1e-17 of it (fp32, K <= 1e6) and the result is as accurate
// as the shifted one (same relative error of each term and of the sum).

template <typename acc_t>
constexpr acc_t kMinSafeSum = std::is_same<acc_t, float>::value ? acc_t(1e-15) : acc_t(1e-250);

template <typename acc_t>
inline void exp_row(const acc_t* x, int64_t n, acc_t* out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = exp_acc(x[k]);
}

template <typename scalar_t, typename F>
inline void forward_rows(const at::Tensor& logits, at::Tensor& lse, at::Tensor* probs, F per_row) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t N = logits.size(0), K = logits.size(1);
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* probs_p = probs ? probs->data_ptr<acc_t>() : nullptr;
  // Rows adjacent in memory as acc_t: one flat exp loop per block of rows.
  const bool flat = std::is_same<scalar_t, acc_t>::value && (logits.stride(1) == 1 || K == 1) &&
                    (logits.stride(0) == K || N == 1);
  const int64_t block = std::max<int64_t>(1, 8192 / K);  // rows per block: exps of a block stay in L1/L2
  at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
    RowReader<scalar_t> reader(logits);
    std::vector<acc_t> scratch(probs_p ? 0 : block * K), sums(block), logs(block);
    for (int64_t i0 = begin; i0 < end; i0 += block) {
      const int64_t rows = std::min(end, i0 + block) - i0;
      acc_t* exps0 = probs_p ? probs_p + i0 * K : scratch.data();
      // pass 1: unshifted exps and their row sums; pass 2: the logs of the sums, one vectorised loop
      if (flat) exp_row(reader.row(i0), rows * K, exps0);
      for (int64_t j = 0; j < rows; ++j) {
        if (!flat) exp_row(reader.row(i0 + j), K, exps0 + j * K);
        sums[j] = row_sum(exps0 + j * K, K);
      }
      // a sum outside the safe range gets a meaningless log here; its row is redone below
#pragma omp simd
      for (int64_t j = 0; j < rows; ++j) logs[j] = log_acc(sums[j]);
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t i = i0 + j;
        const acc_t* x = reader.row(i);  // for non-flat rows, converted again: pass 1's copy was overwritten
        acc_t* exps = exps0 + j * K;
        acc_t r = logs[j], s = sums[j];
        if (!(s >= kMinSafeSum<acc_t> && s <= std::numeric_limits<acc_t>::max()))
          std::tie(r, s) = row_lse(x, K, exps);  // shifted recomputation (also the +-inf / NaN conventions)
        if (probs_p) scale_row(exps, K, acc_t(1) / s);  // softmax = e / s (NaN rows stay NaN)
        lse_p[i] = r;
        per_row(i, x, r);
      }
    }
  });
}

inline at::Tensor new_probs(const at::Tensor& logits) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "the *_with_probs ops keep the softmax in the logits' dtype and take float32 or float64 logits, got ",
                   logits.scalar_type());
  return new_rows_buffer(logits, logits.scalar_type());
}

// Writes one gradient row (dtype scalar_t, contiguous) from an acc_t row: directly when the types agree, else
// through a per-thread fp32 buffer converted at the store.
template <typename scalar_t>
struct RowWriter {
  using acc_t = typename AccType<scalar_t>::type;
  explicit RowWriter(int64_t K) : K_(K) {
    if (!std::is_same<scalar_t, acc_t>::value) buf_.resize(K);
  }
  acc_t* target(scalar_t* out) {
    if (std::is_same<scalar_t, acc_t>::value) return reinterpret_cast<acc_t*>(out);
    return buf_.data();
  }
  void store(scalar_t* out) {
    if (std::is_same<scalar_t, acc_t>::value) return;
    for (int64_t k = 0; k < K_; ++k) out[k] = static_cast<scalar_t>(buf_[k]);
  }

 private:
  int64_t K_;
  std::vector<acc_t> buf_;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace iaerf
