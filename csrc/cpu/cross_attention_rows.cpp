// Row-wise elementwise work of the CPU cross-attention tiles (online softmax in the forward,
// P and dS in the backward). The fp32 versions are compiled per x86 ISA (AVX-512, AVX2, baseline;
// picked at load time by CPU features, not model) so the exp / max / sum loops run on the widest
// vectors.
#include <algorithm>
#include <limits>

#include "cpu/cross_attention_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VLMKERN_ISA_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VLMKERN_ISA_CLONES
#endif

namespace vlmkern::xattn_cpu {
namespace {

template <typename A>
__attribute__((always_inline)) inline void softmax_rows_body(A* st, int64_t ld, int64_t M,
                                                             int64_t n, A* mx, A* sum, A* acc,
                                                             int64_t d) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < M; ++r) {
    A* sr = st + r * ld;  // (n,) scores of row r -> probabilities
    A m = mx[r];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, sr[j]);
    if (m == kNegInf) {  // nothing visible yet: P = 0
      std::fill(sr, sr + n, A(0));
      continue;
    }
    A l = 0;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < n; ++j) {
      const A e = exp_fast(sr[j] - m);
      sr[j] = e;
      l += e;
    }
    if (m != mx[r]) {  // rescale the running output and sum to the new max
      const A alpha = exp_fast(mx[r] - m);
      A* ar = acc + r * d;  // (d,)
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) ar[c] *= alpha;
      sum[r] *= alpha;
      mx[r] = m;
    }
    sum[r] += l;
  }
}

template <typename A>
__attribute__((always_inline)) inline void dscores_rows_body(A* st, A* dp, int64_t ld, int64_t M,
                                                             int64_t n, const A* lse,
                                                             const A* delta) {
  for (int64_t r = 0; r < M; ++r) {
    A* sr = st + r * ld;  // (n,) scores -> P
    A* dr = dp + r * ld;  // (n,) dP -> dS
    const A l = lse[r], dl = delta[r];
    if (l == -std::numeric_limits<A>::infinity()) {  // the row sees nothing
      std::fill(sr, sr + n, A(0));
      std::fill(dr, dr + n, A(0));
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A p = exp_fast(sr[j] - l);
      sr[j] = p;
      dr[j] = p * (dr[j] - dl);
    }
  }
}

}  // namespace

VLMKERN_ISA_CLONES void softmax_rows(float* st, int64_t ld, int64_t M, int64_t n, float* mx,
                                     float* sum, float* acc, int64_t d) {
  softmax_rows_body(st, ld, M, n, mx, sum, acc, d);
}
void softmax_rows(double* st, int64_t ld, int64_t M, int64_t n, double* mx, double* sum,
                  double* acc, int64_t d) {
  softmax_rows_body(st, ld, M, n, mx, sum, acc, d);
}
VLMKERN_ISA_CLONES void dscores_rows(float* st, float* dp, int64_t ld, int64_t M, int64_t n,
                                     const float* lse, const float* delta) {
  dscores_rows_body(st, dp, ld, M, n, lse, delta);
}
void dscores_rows(double* st, double* dp, int64_t ld, int64_t M, int64_t n, const double* lse,
                  const double* delta) {
  dscores_rows_body(st, dp, ld, M, n, lse, delta);
}

}  // namespace vlmkern::xattn_cpu
