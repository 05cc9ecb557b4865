// CPU cross-attention plan (value checks of cu_seqlens / kv_ranges / prefix_len, per-row visible
// key ranges, tile visibility) and the row-major GEMM the kernels run on.
#include <algorithm>

#include "common/checks.h"
#include "cpu/cross_attention_kernel.h"

// Fortran BLAS of the library torch links (MKL / OpenBLAS), bound weakly: absent -> loops.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace vlmkern::xattn_cpu {
namespace {

constexpr const char* kOp = "cross_attention";

template <typename A>
void gemm_loops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
                int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    A* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == A(0) ? A(0) : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const A av = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j * ldb + p];
      } else {
        const A* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
      }
    }
  }
}

// Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap the operands, keep the leading dims.
template <typename A, typename Fn>
void gemm_blas(Fn fn, bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
               int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  fn(&opb, &opa, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) return gemm_blas(sgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta,
                                          c, ldc);
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ != nullptr) return gemm_blas(dgemm_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta,
                                          c, ldc);
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

Plan make_plan(const XattnParams& p) {
  Plan plan;
  // Sequences: the batch, or the packed segments of cu_seqlens (checked here, on the host).
  if (p.packed) {
    VLMKERN_CHECK(p.cu_q.at(0) == 0 && p.cu_k.at(0) == 0, kOp,
                  "cu_seqlens_q and cu_seqlens_k must start at 0, got ", p.cu_q.at(0), " and ",
                  p.cu_k.at(0));
    for (int64_t n = 0; n < p.num_segments; ++n) {
      const int64_t q0 = p.cu_q.at(n * p.cu_q.stride[0]), q1 = p.cu_q.at((n + 1) * p.cu_q.stride[0]);
      const int64_t k0 = p.cu_k.at(n * p.cu_k.stride[0]), k1 = p.cu_k.at((n + 1) * p.cu_k.stride[0]);
      VLMKERN_CHECK(q1 >= q0 && k1 >= k0, kOp, "cu_seqlens_q and cu_seqlens_k must be "
                    "non-decreasing, got [", q0, ", ", q1, "] and [", k0, ", ", k1, "] at ", n);
      Segment s;
      s.q0 = q0;
      s.lq = q1 - q0;
      s.k0 = k0;
      s.lk = k1 - k0;
      plan.segs.push_back(s);
    }
    const int64_t tq = plan.segs.empty() ? 0 : plan.segs.back().q0 + plan.segs.back().lq;
    const int64_t tk = plan.segs.empty() ? 0 : plan.segs.back().k0 + plan.segs.back().lk;
    VLMKERN_CHECK(tq == p.seq_q && tk == p.seq_k, kOp, "cu_seqlens_q[-1] = ", tq,
                  " and cu_seqlens_k[-1] = ", tk, " must equal total_q = ", p.seq_q,
                  " and total_k = ", p.seq_k);
  } else {
    for (int64_t b = 0; b < p.batch; ++b) {
      Segment s;
      s.b = b;
      s.lq = p.seq_q;
      s.lk = p.seq_k;
      plan.segs.push_back(s);
    }
  }
  // Block size over keys: equal blocks of at most bn0 keys, bn0 from the score tile budget.
  int64_t max_lq = 0, max_lk = 0;
  for (const Segment& s : plan.segs) {
    max_lq = std::max(max_lq, s.lq);
    max_lk = std::max(max_lk, s.lk);
  }
  const int64_t rows_per_task = (p.heads_q / p.heads_k) * std::min(kBlockM, std::max<int64_t>(
                                                                                 max_lq, 1));
  const int64_t bn0 = std::clamp<int64_t>(kTileFloats / std::max<int64_t>(rows_per_task, 1) / 16 *
                                              16, 64, kMaxBlockN);
  const int64_t nkb_max = std::max<int64_t>(1, (max_lk + bn0 - 1) / bn0);
  plan.bn = std::max<int64_t>(16, ((max_lk + nkb_max - 1) / nkb_max + 15) / 16 * 16);
  // Per-row visible ranges, normalized: empty ranges dropped; "uniform" rows that see nothing
  // get [0, Lk).
  plan.rn = std::max<int64_t>(1, p.has_ranges ? p.num_ranges : 1);
  const int64_t rows = p.batch * p.seq_q;
  plan.ranges.assign(rows * plan.rn * 2, 0);
  plan.count.assign(rows, 0);
  int64_t vis_total = 0, n = 0;
  for (Segment& s : plan.segs) {
    int64_t prefix = 0;
    if (p.prefix_lm) {
      prefix = p.prefix.at(n * p.prefix.stride[0]);
      VLMKERN_CHECK(prefix >= 0, kOp, "prefix_len must be >= 0, got ", prefix, " at ", n);
    }
    for (int64_t i = 0; i < s.lq; ++i) {
      const int64_t row = plan.row(s, i, p.seq_q);
      int32_t* rr = plan.ranges.data() + row * plan.rn * 2;
      int32_t cnt = 0;
      if (p.has_ranges) {
        const int64_t base = s.b * p.ranges.stride[0] + (s.q0 + i) * p.ranges.stride[1];
        for (int64_t r = 0; r < p.num_ranges; ++r) {
          const int64_t lo = p.ranges.at(base + r * p.ranges.stride[2]);
          const int64_t hi = p.ranges.at(base + r * p.ranges.stride[2] + p.ranges.stride[3]);
          VLMKERN_CHECK(lo >= 0 && lo <= hi && hi <= s.lk, kOp, "kv_ranges[", s.b, ", ",
                        s.q0 + i, ", ", r, "] = [", lo, ", ", hi,
                        ") is out of bounds: need 0 <= start <= end <= Lk = ", s.lk);
          if (lo < hi) {
            rr[2 * cnt] = static_cast<int32_t>(lo);
            rr[2 * cnt + 1] = static_cast<int32_t>(hi);
            ++cnt;
          }
        }
      } else {
        int64_t end = s.lk;
        if (p.prefix_lm) end = std::max(std::min(prefix, s.lk), std::min(i + 1 + s.lk - s.lq, s.lk));
        if (end > 0) {
          rr[1] = static_cast<int32_t>(end);
          cnt = 1;
        }
      }
      if (cnt == 0 && p.uniform_masked_rows && s.lk > 0) {
        rr[0] = 0;
        rr[1] = static_cast<int32_t>(s.lk);
        cnt = 1;
      }
      plan.count[row] = cnt;
    }
    s.nqb = (s.lq + kBlockM - 1) / kBlockM;
    s.nkb = (s.lk + plan.bn - 1) / plan.bn;
    s.vis_off = vis_total;
    vis_total += s.nqb * s.nkb;
    ++n;
  }
  // Tile visibility: which k blocks a q block's rows reach.
  plan.visible.assign(vis_total, 0);
  n = 0;
  for (const Segment& s : plan.segs) {
    for (int64_t i = 0; i < s.lq; ++i) {
      const int64_t row = plan.row(s, i, p.seq_q);
      const int32_t* rr = plan.ranges.data() + row * plan.rn * 2;
      uint8_t* vis = plan.visible.data() + s.vis_off + (i / kBlockM) * s.nkb;
      for (int32_t r = 0; r < plan.count[row]; ++r) {
        for (int64_t kb = rr[2 * r] / plan.bn; kb <= (rr[2 * r + 1] - 1) / plan.bn; ++kb) {
          vis[kb] = 1;
        }
      }
    }
    for (int64_t qb = 0; qb < s.nqb; ++qb) plan.q_tasks.push_back(n << 32 | qb);
    for (int64_t kb = 0; kb < s.nkb; ++kb) plan.k_tasks.push_back(n << 32 | kb);
    ++n;
  }
  return plan;
}

}  // namespace vlmkern::xattn_cpu
