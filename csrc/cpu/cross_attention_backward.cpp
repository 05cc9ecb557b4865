// CPU cross_attention backward, flash-style and deterministic (no atomics, fixed summation
// order): P is recomputed from the saved lse, D = rowsum(dO * O) - dlse, dS = P * (dP - D).
// Pass 1, parallel over (sequence, kv head, k block): dV = Σ Pᵀ dO, dK = Σ dSᵀ (scale·Q) over
// the q blocks (and the G query heads) that see the block. Pass 2, parallel over (sequence,
// kv head, q block): dQ = scale · Σ dS K.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/cross_attention_kernel.h"
#include "ops.h"

namespace vlmkern {
namespace {

using namespace xattn_cpu;

template <typename T>
struct Grads {
  using A = Acc<T>;
  const T* dout;   // (B, Sq, Hq, D) contiguous
  const A* lse;    // (B, Hq, Sq)
  const A* delta;  // (B, Hq, Sq): rowsum(dO * O) - dlse
  T* dq;           // (B, Sq, Hq, D)
  T* dk;           // (B, Sk, Hk, D)
  T* dv;           // (B, Sk, Hk, D)
};

// Loads the M = G*rows stacked rows of q block qb (head hk*G + g, query i at row g*rows + i):
// qs = scale·q, dO, lse and D; returns rows.
template <typename T>
int64_t load_q_block(const XattnParams& p, const Segment& s, const Grads<T>& gr, int64_t hk,
                     int64_t qb, Acc<T>* qs, Acc<T>* dout, Acc<T>* lse, Acc<T>* delta) {
  using A = Acc<T>;
  const int64_t d = p.head_dim, G = p.heads_q / p.heads_k;
  const int64_t i0 = qb * kBlockM, rows = std::min(kBlockM, s.lq - i0);
  const T* q = static_cast<const T*>(p.q);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g, tok = s.b * p.seq_q + s.q0 + i0;
    load_rows(q + s.b * p.q_stride[0] + (s.q0 + i0) * p.q_stride[1] + h * p.q_stride[2],
              p.q_stride[1], p.q_stride[3], rows, d, qs + g * rows * d, static_cast<A>(p.scale));
    load_rows(gr.dout + (tok * p.heads_q + h) * d, p.heads_q * d, 1, rows, d,
              dout + g * rows * d, A(1));
    const int64_t l0 = (s.b * p.heads_q + h) * p.seq_q + s.q0 + i0;
    std::copy(gr.lse + l0, gr.lse + l0 + rows, lse + g * rows);
    std::copy(gr.delta + l0, gr.delta + l0 + rows, delta + g * rows);
  }
  return rows;
}

// st (M, n) <- P = exp(scale·q kᵀ - lse) over the visible pairs (0 elsewhere); then dp (M, n) <-
// dS = P * (dO vᵀ - D).
template <typename T>
void probs_and_dscores(const XattnParams& p, const Plan& plan, const Segment& s, int64_t i0,
                       int64_t rows, int64_t j0, int64_t n, const Acc<T>* qs, const Acc<T>* dout,
                       const Acc<T>* lse, const Acc<T>* delta, const Acc<T>* kt, int64_t ldk,
                       const Acc<T>* vt, int64_t ldv, Acc<T>* st, Acc<T>* dp, uint8_t* vis) {
  using A = Acc<T>;
  const int64_t d = p.head_dim, M = (p.heads_q / p.heads_k) * rows;
  gemm(false, true, M, n, d, A(1), qs, d, kt, ldk, A(0), st, plan.bn);    // S = Qs Kᵀ
  gemm(false, true, M, n, d, A(1), dout, d, vt, ldv, A(0), dp, plan.bn);  // dP = dO Vᵀ
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = plan.row(s, i0 + i, p.seq_q);
    mask_row(plan.ranges.data() + row * plan.rn * 2, plan.count[row], j0, n, st + i * plan.bn,
             rows * plan.bn, p.heads_q / p.heads_k, vis);
  }
  dscores_rows(st, dp, plan.bn, M, n, lse, delta);
}

template <typename T>
void backward(const XattnParams& p, const Plan& plan, const Grads<T>& gr) {
  using A = Acc<T>;
  const int64_t d = p.head_dim, G = p.heads_q / p.heads_k, Mmax = G * kBlockM;
  const size_t buf_size = 2 * Mmax * d + 2 * Mmax + 4 * plan.bn * d + 2 * Mmax * plan.bn;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  // Pass 1: dK, dV per (segment, kv head, k block).
  const int64_t k_tasks = static_cast<int64_t>(plan.k_tasks.size()) * p.heads_k;
  at::parallel_for(0, k_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(buf_size);
    std::vector<uint8_t> vis(plan.bn);
    A* qs = buf.data();             // (M, d) scale·q
    A* dout = qs + Mmax * d;        // (M, d) dO
    A* lse = dout + Mmax * d;       // (M,)
    A* delta = lse + Mmax;          // (M,)
    A* kt = delta + Mmax;           // (n, d)
    A* vt = kt + plan.bn * d;       // (n, d)
    A* dk = vt + plan.bn * d;       // (n, d) accumulated dK
    A* dv = dk + plan.bn * d;       // (n, d) accumulated dV
    A* st = dv + plan.bn * d;       // (M, plan.bn) P
    A* dp = st + Mmax * plan.bn;    // (M, plan.bn) dS
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = plan.k_tasks[t / p.heads_k], hk = t % p.heads_k;
      const Segment& s = plan.segs[task >> 32];
      const int64_t kb = task & 0xffffffff, j0 = kb * plan.bn, n = std::min(plan.bn, s.lk - j0);
      int64_t ldk, ldv;
      const A* kp = kv_tile(k, p.k_stride, s, hk, j0, n, d, kt, ldk);  // (n, d) keys
      const A* vp = kv_tile(v, p.v_stride, s, hk, j0, n, d, vt, ldv);  // (n, d) values
      std::fill(dk, dk + n * d, A(0));
      std::fill(dv, dv + n * d, A(0));
      for (int64_t qb = 0; qb < s.nqb; ++qb) {
        if (!plan.visible[s.vis_off + qb * s.nkb + kb]) continue;
        const int64_t rows = load_q_block<T>(p, s, gr, hk, qb, qs, dout, lse, delta);
        const int64_t M = G * rows;
        probs_and_dscores<T>(p, plan, s, qb * kBlockM, rows, j0, n, qs, dout, lse, delta, kp,
                             ldk, vp, ldv, st, dp, vis.data());
        gemm(true, false, n, d, M, A(1), st, plan.bn, dout, d, A(1), dv, d);  // dV += Pᵀ dO
        gemm(true, false, n, d, M, A(1), dp, plan.bn, qs, d, A(1), dk, d);    // dK += dSᵀ Qs
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t off = ((s.b * p.seq_k + s.k0 + j0 + j) * p.heads_k + hk) * d;
        for (int64_t c = 0; c < d; ++c) {
          gr.dk[off + c] = static_cast<T>(dk[j * d + c]);
          gr.dv[off + c] = static_cast<T>(dv[j * d + c]);
        }
      }
    }
  });
  // Pass 2: dQ per (segment, kv head, q block), the G heads of the group stacked.
  const int64_t q_tasks = static_cast<int64_t>(plan.q_tasks.size()) * p.heads_k;
  at::parallel_for(0, q_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(buf_size);
    std::vector<uint8_t> vis(plan.bn);
    A* qs = buf.data();             // (M, d) scale·q
    A* dout = qs + Mmax * d;        // (M, d) dO
    A* lse = dout + Mmax * d;       // (M,)
    A* delta = lse + Mmax;          // (M,)
    A* kt = delta + Mmax;           // (n, d)
    A* vt = kt + plan.bn * d;       // (n, d)
    A* st = vt + 3 * plan.bn * d;   // (M, plan.bn) P (same layout as pass 1)
    A* dp = st + Mmax * plan.bn;    // (M, plan.bn) dS
    std::vector<A> dq_buf(Mmax * d);
    A* dq = dq_buf.data();          // (M, d) accumulated dQ / scale
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = plan.q_tasks[t / p.heads_k], hk = t % p.heads_k;
      const Segment& s = plan.segs[task >> 32];
      const int64_t qb = task & 0xffffffff, i0 = qb * kBlockM;
      const int64_t rows = load_q_block<T>(p, s, gr, hk, qb, qs, dout, lse, delta);
      const int64_t M = G * rows;
      std::fill(dq, dq + M * d, A(0));
      for (int64_t kb = 0; kb < s.nkb; ++kb) {
        if (!plan.visible[s.vis_off + qb * s.nkb + kb]) continue;
        const int64_t j0 = kb * plan.bn, n = std::min(plan.bn, s.lk - j0);
        int64_t ldk, ldv;
        const A* kp = kv_tile(k, p.k_stride, s, hk, j0, n, d, kt, ldk);  // (n, d) keys
        const A* vp = kv_tile(v, p.v_stride, s, hk, j0, n, d, vt, ldv);  // (n, d) values
        probs_and_dscores<T>(p, plan, s, i0, rows, j0, n, qs, dout, lse, delta, kp, ldk, vp, ldv,
                             st, dp, vis.data());
        gemm(false, false, M, d, n, A(1), dp, plan.bn, kp, ldk, A(1), dq, d);  // dQ += dS K
      }
      const A scale = static_cast<A>(p.scale);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t off = ((s.b * p.seq_q + s.q0 + i0 + i) * p.heads_q + hk * G + g) * d;
          const A* src = dq + (g * rows + i) * d;
          for (int64_t c = 0; c < d; ++c) gr.dq[off + c] = static_cast<T>(src[c] * scale);
        }
      }
    }
  });
}

// delta (B, Hq, Sq) = rowsum(dO * O) - dlse, in the accumulation type.
template <typename T>
void row_deltas(const XattnParams& p, const T* dout, const T* out, const Acc<T>* dlse,
                Acc<T>* delta) {
  const int64_t d = p.head_dim, rows = p.batch * p.seq_q * p.heads_q;
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = (b, i, h) in out's memory order
      Acc<T> acc = 0;
      for (int64_t c = 0; c < d; ++c) {
        acc += static_cast<Acc<T>>(dout[r * d + c]) * static_cast<Acc<T>>(out[r * d + c]);
      }
      const int64_t h = r % p.heads_q, bi = r / p.heads_q;
      const int64_t b = bi / p.seq_q, i = bi % p.seq_q, l = (b * p.heads_q + h) * p.seq_q + i;
      delta[l] = acc - (dlse != nullptr ? dlse[l] : Acc<T>(0));
    }
  });
}

template <typename T>
void run(const XattnParams& p, const Plan& plan, const at::Tensor& dout, const at::Tensor& out,
         const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& dq,
         const at::Tensor& dk, const at::Tensor& dv) {
  using A = Acc<T>;
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const at::Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  row_deltas<T>(p, dout.const_data_ptr<T>(), out.const_data_ptr<T>(),
                dlse.has_value() ? dlse_c.const_data_ptr<A>() : nullptr,
                delta.mutable_data_ptr<A>());
  const at::Tensor lse_c = lse.contiguous();
  Grads<T> gr{dout.const_data_ptr<T>(), lse_c.const_data_ptr<A>(), delta.const_data_ptr<A>(),
              dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>()};
  backward<T>(p, plan, gr);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows) {
  const XattnParams p = make_xattn_params("cross_attention_backward", q, k, v, kv_ranges,
                                          cu_seqlens_q, cu_seqlens_k, prefix_len, scale,
                                          masked_rows);
  check_xattn_backward(p, grad_out, out, lse, grad_lse);
  const Plan plan = make_plan(p);
  // dq (B, Sq, Hq, D), dk / dv (B, Sk, Hk, D): dense, in the inputs' dtype.
  at::Tensor dq = at::empty({p.batch, p.seq_q, p.heads_q, p.head_dim}, q.options());
  at::Tensor dk = at::empty({p.batch, p.seq_k, p.heads_k, p.head_dim}, k.options());
  at::Tensor dv = at::empty({p.batch, p.seq_k, p.heads_k, p.head_dim}, v.options());
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};  // no query: no gradient
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  switch (p.dtype) {
    case at::kFloat: run<float>(p, plan, go, o, lse, grad_lse, dq, dk, dv); break;
    case at::kDouble: run<double>(p, plan, go, o, lse, grad_lse, dq, dk, dv); break;
    case at::kHalf: run<c10::Half>(p, plan, go, o, lse, grad_lse, dq, dk, dv); break;
    default: run<c10::BFloat16>(p, plan, go, o, lse, grad_lse, dq, dk, dv);
  }
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("cross_attention_backward", &cross_attention_backward_cpu);
}

}  // namespace vlmkern
