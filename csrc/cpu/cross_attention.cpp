// CPU cross_attention forward (flash-style: q blocks x k blocks, online softmax in fp32, never a
// dense score matrix) and mllama_kv_ranges (Mllama's tile mask -> visible key ranges per row).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/cross_attention_kernel.h"
#include "ops.h"

namespace vlmkern {
namespace {

using namespace xattn_cpu;

// One task: q block qb of segment s for the G = Hq/Hk query heads of kv head hk, stacked into
// M = G*rows tile rows (row g*rows + i is head hk*G + g, query i of the block): every K/V tile
// is converted once and used by the whole group.
template <typename T>
void forward_task(const XattnParams& p, const Plan& plan, const Segment& s, int64_t hk,
                  int64_t qb, std::vector<Acc<T>>& buf, std::vector<uint8_t>& vis, T* out,
                  Acc<T>* lse) {
  using A = Acc<T>;
  const int64_t d = p.head_dim, G = p.heads_q / p.heads_k;
  const int64_t i0 = qb * kBlockM, rows = std::min(kBlockM, s.lq - i0), M = G * rows;
  A* qs = buf.data();           // (M, d) q * scale
  A* kt = qs + M * d;           // (plan.bn, d) keys
  A* vt = kt + plan.bn * d;     // (plan.bn, d) values
  A* st = vt + plan.bn * d;     // (M, plan.bn) scores, then probabilities
  A* acc = st + M * plan.bn;    // (M, d) unnormalized output
  A* mx = acc + M * d;          // (M,) running max
  A* sum = mx + M;              // (M,) running sum of exp
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int64_t g = 0; g < G; ++g) {
    load_rows(q + s.b * p.q_stride[0] + (s.q0 + i0) * p.q_stride[1] + (hk * G + g) * p.q_stride[2],
              p.q_stride[1], p.q_stride[3], rows, d, qs + g * rows * d, static_cast<A>(p.scale));
  }
  std::fill(acc, acc + M * d, A(0));
  std::fill(mx, mx + M, -std::numeric_limits<A>::infinity());
  std::fill(sum, sum + M, A(0));
  const uint8_t* tile_vis = plan.visible.data() + s.vis_off + qb * s.nkb;
  for (int64_t kb = 0; kb < s.nkb; ++kb) {
    if (!tile_vis[kb]) continue;
    const int64_t j0 = kb * plan.bn, n = std::min(plan.bn, s.lk - j0);
    int64_t ldk, ldv;
    const A* kp = kv_tile(k, p.k_stride, s, hk, j0, n, d, kt, ldk);  // (n, d) keys
    const A* vp = kv_tile(v, p.v_stride, s, hk, j0, n, d, vt, ldv);  // (n, d) values
    gemm(false, true, M, n, d, A(1), qs, d, kp, ldk, A(0), st, plan.bn);  // S = Qs Kᵀ
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = plan.row(s, i0 + i, p.seq_q);
      mask_row(plan.ranges.data() + row * plan.rn * 2, plan.count[row], j0, n, st + i * plan.bn,
               rows * plan.bn, G, vis.data());
    }
    softmax_rows(st, plan.bn, M, n, mx, sum, acc, d);  // online softmax, P in st
    gemm(false, false, M, d, n, A(1), st, plan.bn, vp, ldv, A(1), acc, d);  // O += P V
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = g * rows + i, tok = s.b * p.seq_q + s.q0 + i0 + i;
      T* o = out + (tok * p.heads_q + h) * d;
      const A l = sum[r];
      const A inv = l > A(0) ? A(1) / l : A(0);  // a row that sees nothing: 0
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(acc[r * d + c] * inv);
      lse[(s.b * p.heads_q + h) * p.seq_q + s.q0 + i0 + i] =
          l > A(0) ? mx[r] + std::log(l) : -std::numeric_limits<A>::infinity();
    }
  }
}

template <typename T>
void forward(const XattnParams& p, const Plan& plan, T* out, Acc<T>* lse) {
  const int64_t d = p.head_dim, M = (p.heads_q / p.heads_k) * kBlockM;
  const int64_t tasks = static_cast<int64_t>(plan.q_tasks.size()) * p.heads_k;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc<T>> buf(2 * M * d + 2 * plan.bn * d + M * plan.bn + 2 * M);
    std::vector<uint8_t> vis(plan.bn);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = plan.q_tasks[t / p.heads_k], hk = t % p.heads_k;
      forward_task<T>(p, plan, plan.segs[task >> 32], hk, task & 0xffffffff, buf, vis, out, lse);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows) {
  const XattnParams p = make_xattn_params("cross_attention", q, k, v, kv_ranges, cu_seqlens_q,
                                          cu_seqlens_k, prefix_len, scale, masked_rows);
  // Decode with GQA: the group's q heads as rows of one kv head (one K / V pass per group).
  if (auto rows = xattn_decode_gqa_as_rows(p, q, k, v, kv_ranges, scale, masked_rows,
                                           &cross_attention_cpu)) {
    return *rows;
  }
  const Plan plan = make_plan(p);
  // out (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) fp32 (fp64 for fp64 inputs).
  at::Tensor out = at::empty({p.batch, p.seq_q, p.heads_q, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seq_q},
                             q.options().dtype(xattn_lse_dtype(p.dtype)));
  if (out.numel() == 0) return {out, lse};
  switch (p.dtype) {
    case at::kFloat:
      forward<float>(p, plan, out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
      break;
    case at::kDouble:
      forward<double>(p, plan, out.mutable_data_ptr<double>(), lse.mutable_data_ptr<double>());
      break;
    case at::kHalf:
      forward<c10::Half>(p, plan, out.mutable_data_ptr<c10::Half>(),
                         lse.mutable_data_ptr<float>());
      break;
    default:
      forward<c10::BFloat16>(p, plan, out.mutable_data_ptr<c10::BFloat16>(),
                             lse.mutable_data_ptr<float>());
  }
  return {out, lse};
}

at::Tensor mllama_kv_ranges_cpu(const at::Tensor& mask, int64_t num_vision_tokens) {
  const int64_t R = check_mllama_mask(mask, num_vision_tokens);
  const int64_t B = mask.size(0), S = mask.size(1), tiles = mask.size(2) * mask.size(3);
  // (B, S, R, 2) int32 [start, end) key ranges; unused slots are empty (start = end = 0).
  at::Tensor out = at::empty({B, S, R, 2}, mask.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  // Visible iff the mask value is 1 (HF: (1 - mask) == 0), tiles m-major, t-minor.
  const at::Tensor seen = at::eq(mask, 1).contiguous();  // (B, S, M, T) bool
  const bool* vis = seen.const_data_ptr<bool>();
  int32_t* o = out.mutable_data_ptr<int32_t>();
  const int64_t nvt = num_vision_tokens;
  at::parallel_for(0, B * S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool* t = vis + row * tiles;
      int32_t* r = o + row * R * 2;
      int64_t cnt = 0;
      for (int64_t i = 0; i < tiles; ++i) {
        if (!t[i]) continue;
        int64_t j = i;
        while (j + 1 < tiles && t[j + 1]) ++j;  // adjacent visible tiles merge
        r[2 * cnt] = static_cast<int32_t>(i * nvt);
        r[2 * cnt + 1] = static_cast<int32_t>((j + 1) * nvt);
        ++cnt;
        i = j;
      }
      for (int64_t c = 2 * cnt; c < 2 * R; ++c) r[c] = 0;
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("cross_attention", &cross_attention_cpu);
  m.impl("mllama_kv_ranges", &mllama_kv_ranges_cpu);
}

}  // namespace vlmkern
