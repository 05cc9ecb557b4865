// CPU cross-attention building blocks shared by the forward and backward kernels: the block plan
// (sequences, per-row visible key ranges, which (q block, k block) tiles carry any visible pair),
// tile loads with conversion to the accumulation type, row-major GEMM on the BLAS torch links
// (weakly bound, with a loop fallback) and a vectorizable fp32 exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cross_attention.h"

namespace vlmkern::xattn_cpu {

// Query rows per head in one q block (the G heads of a GQA group are stacked: G*kBlockM rows).
// Keys per k block (Plan::bn) are chosen per call: the (G*rows, bn) fp32 score tile stays within
// kTileFloats (L2), at most kMaxBlockN, and the keys are split into equal blocks (257 Q-Former
// keys are one block of 272, not 256 + 1).
constexpr int64_t kBlockM = 64;
constexpr int64_t kMaxBlockN = 512;
constexpr int64_t kTileFloats = 64 * 1024;

struct Segment {
  int64_t b = 0;        // batch index into q / k / v (0 when packed)
  int64_t q0 = 0, lq = 0;  // first row in q's S dim, rows
  int64_t k0 = 0, lk = 0;  // first key in k's S dim, keys
  int64_t nqb = 0, nkb = 0;  // q blocks, k blocks
  int64_t vis_off = 0;     // offset of its (nqb, nkb) tile-visibility table in Plan::visible
};

struct Plan {
  std::vector<Segment> segs;
  std::vector<uint8_t> visible;  // per segment (nqb, nkb): 1 when the tile has a visible pair
  int64_t bn = 16;                // keys per k block
  int64_t rn = 1;                 // ranges per row
  std::vector<int32_t> ranges;    // (B*Sq, rn, 2) [start, end) relative to the segment's keys
  std::vector<int32_t> count;     // (B*Sq,) non-empty ranges of each row
  std::vector<int64_t> q_tasks;   // (seg << 32 | q block) work items
  std::vector<int64_t> k_tasks;   // (seg << 32 | k block)
  // Row index into ranges / count of row i of segment s.
  int64_t row(const Segment& s, int64_t i, int64_t seq_q) const {
    return s.b * seq_q + s.q0 + i;
  }
};

// Reads cu_seqlens / kv_ranges / prefix_len (CPU tensors), checks their values, builds the plan.
Plan make_plan(const XattnParams& p);

// Accumulation type: fp32, fp64 for fp64 inputs.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// dst (rows, d) row-major <- src rows (row stride rs, element stride ds), times mul.
template <typename T, typename A>
inline void load_rows(const T* src, int64_t rs, int64_t ds, int64_t rows, int64_t d, A* dst,
                      A mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    A* o = dst + r * d;
    if (ds == 1) {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<A>(s[c]) * mul;
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<A>(s[c * ds]) * mul;
    }
  }
}

// The (n, d) tile of rows j0.. of kv head hk of k or v (strides st, (B, S, H, D)) in the
// accumulation type: the input itself when it already is one (same dtype, unit head-dim stride:
// no copy, leading dim = its row stride), else converted into buf (leading dim d).
template <typename T>
inline const Acc<T>* kv_tile(const T* base, const int64_t* st, const Segment& s, int64_t hk,
                             int64_t j0, int64_t n, int64_t d, Acc<T>* buf, int64_t& ld) {
  const T* src = base + s.b * st[0] + (s.k0 + j0) * st[1] + hk * st[2];
  if constexpr (std::is_same_v<T, Acc<T>>) {
    if (st[3] == 1 && st[1] >= d) {
      ld = st[1];
      return src;
    }
  }
  load_rows(src, st[1], st[3], n, d, buf, Acc<T>(1));
  ld = d;
  return buf;
}

// C (m, n) = alpha * op(A) op(B) + beta * C, row-major with leading dims; op = transpose if t*.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// exp for softmax arguments (<= 0 up to rounding, -inf allowed -> exactly 0): Cephes-style range
// reduction and degree-6 polynomial, ~2 ulp, branch-free so the loops using it vectorize.
inline float exp_fast(float x) {
  x = std::min(std::max(x, -104.0f), 88.0f);
  // n = round(x / ln2) by the 1.5 * 2^23 trick (no floor: vectorizes on plain SSE2 too).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n);
  int32_t bits = (std::max(e, -126) + 127) << 23;  // 2^n (n >= -126), scaled below
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return e < -126 ? 0.0f : p * two_n;
}
inline double exp_fast(double x) { return std::exp(x); }

// Online-softmax update of a tile (cross_attention_rows.cpp): st (M rows, ld apart, n scores)
// becomes P = exp(s - new max); mx / sum (M,) running max and sum; acc (M, d) rescaled.
void softmax_rows(float* st, int64_t ld, int64_t M, int64_t n, float* mx, float* sum, float* acc,
                  int64_t d);
void softmax_rows(double* st, int64_t ld, int64_t M, int64_t n, double* mx, double* sum,
                  double* acc, int64_t d);
// Backward tile: st (M, n) scores -> P = exp(s - lse); dp (M, n) dP -> dS = P * (dP - delta).
void dscores_rows(float* st, float* dp, int64_t ld, int64_t M, int64_t n, const float* lse,
                  const float* delta);
void dscores_rows(double* st, double* dp, int64_t ld, int64_t M, int64_t n, const double* lse,
                  const double* delta);

// Row `row`'s visibility over keys [k0, k0 + n) of its segment: writes -inf into s[j] for the
// invisible ones (s is (n,) of one stacked head row; `heads` such rows, `ld` apart, share it).
template <typename A>
inline void mask_row(const int32_t* rr, int32_t cnt, int64_t k0, int64_t n, A* s, int64_t ld,
                     int64_t heads, uint8_t* vis) {
  for (int32_t r = 0; r < cnt; ++r) {  // one range covering the tile: nothing to mask
    if (rr[2 * r] <= k0 && rr[2 * r + 1] >= k0 + n) return;
  }
  std::memset(vis, 0, n);
  for (int32_t r = 0; r < cnt; ++r) {
    const int64_t lo = std::max<int64_t>(rr[2 * r], k0), hi = std::min<int64_t>(rr[2 * r + 1],
                                                                                  k0 + n);
    if (lo < hi) std::memset(vis + (lo - k0), 1, hi - lo);
  }
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t h = 0; h < heads; ++h) {
    A* sh = s + h * ld;
    for (int64_t j = 0; j < n; ++j) sh[j] = vis[j] ? sh[j] : kNegInf;
  }
}

}  // namespace vlmkern::xattn_cpu
