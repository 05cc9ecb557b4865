// The MLP projector as an ATen composite (device-independent, no host syncs): shuffle / merge,
// norm, GEMM1 + bias, activation, GEMM2 + bias; and its backward. HF's numerics: Linear and GELU in
// the input dtype, LayerNorm statistics in fp32 (fp64 for fp64 input), RMSNorm as Qwen2RMSNorm.
#include "common/mlp_projector.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sigmoid.h>

namespace vlmkern {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Accumulation type of the norm statistics: fp32 for fp16 / bf16 / fp32, fp64 for fp64.
at::ScalarType stat_type(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// vlmkern::pixel_shuffle / pixel_unshuffle through the dispatcher (this device's kernel).
at::Tensor shuffle_op(const at::Tensor& t, int64_t r, bool inverse) {
  using Fn = at::Tensor(const at::Tensor&, int64_t);
  static const auto fwd = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("vlmkern::pixel_shuffle", "")
                              .typed<Fn>();
  static const auto inv = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("vlmkern::pixel_unshuffle", "")
                              .typed<Fn>();
  return inverse ? inv.call(t, r) : fwd.call(t, r);
}

// The GEMM input rows X2 (M, K): pixel-shuffled (a permuted copy), or x viewed as rows (Qwen's
// merge is x.view(-1, s*s*C)); reshape copies only when x's strides do not allow a view.
at::Tensor projector_rows(const at::Tensor& x, const ProjectorShape& s,
                          const ProjectorOptions& opt) {
  if (opt.shuffle > 1) return shuffle_op(x, opt.shuffle, false).view({s.m, s.k});
  return x.reshape({s.m, s.k});
}

at::Tensor activation_forward(const at::Tensor& h, ProjectorActivation act) {
  switch (act) {
    case ProjectorActivation::kGelu:
      return at::gelu(h);
    case ProjectorActivation::kGeluTanh:
      return at::gelu(h, "tanh");
    case ProjectorActivation::kQuickGelu:
      return h * at::sigmoid(h * 1.702);  // HF QuickGELUActivation, op for op
    case ProjectorActivation::kNone:
      break;
  }
  return h;
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& h,
                               ProjectorActivation act) {
  switch (act) {
    case ProjectorActivation::kGelu:
      return at::gelu_backward(grad, h);
    case ProjectorActivation::kGeluTanh:
      return at::gelu_backward(grad, h, "tanh");
    case ProjectorActivation::kQuickGelu: {
      const auto hf = h.to(stat_type(h.scalar_type()));
      const auto sg = at::sigmoid(hf * 1.702);
      return (grad.to(hf.scalar_type()) * (sg + hf * 1.702 * sg * (1 - sg))).to(h.scalar_type());
    }
    case ProjectorActivation::kNone:
      break;
  }
  return grad;
}

// A LayerNorm weight / bias as native_layer_norm(_backward) should see it (see norm_forward).
OptTensor ln_param(const OptTensor& p, const at::Tensor& rows) {
  const auto st = stat_type(rows.scalar_type());
  if (!p || !rows.is_cpu() || rows.scalar_type() == st) return p;
  return p->to(st);
}

struct NormOut {
  at::Tensor y, mean, rstd;  // y (M, K) in x's dtype; mean, rstd (M, groups) or (0,)
};

// Normalizes each of the `groups` groups of `norm_features` features of every row of X2.
NormOut norm_forward(const at::Tensor& rows, const OptTensor& weight, const OptTensor& bias,
                     const ProjectorShape& s, const ProjectorOptions& opt) {
  const auto dt = rows.scalar_type();
  const auto st = stat_type(dt);
  // Absent statistics are distinct empty tensors: outputs of an op must not alias each other.
  const auto no_stats = [&] { return at::empty({0}, rows.options().dtype(st)); };
  if (opt.norm == ProjectorNorm::kNone) return {rows, no_stats(), no_stats()};
  if (opt.norm == ProjectorNorm::kRmsNorm) {  // Qwen2RMSNorm: weight * (x * rstd).to(dtype)
    const auto xf = rows.reshape({s.m * s.groups, s.norm_features}).to(st);
    const auto rstd = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + opt.eps);
    const auto y = *weight * (xf * rstd).to(dt);
    return {y.view({s.m, s.k}), no_stats(), rstd.view({s.m, s.groups})};
  }
  // ATen's fused LayerNorm (HF's own kernel). On the CPU, fp16 / bf16 input with fp32 affine
  // parameters takes its mixed-type path, which returns fp32 statistics (else it rounds them to the
  // input dtype); CUDA returns fp32 statistics for fp16 / bf16 input anyway.
  const auto [y, mean, rstd] = at::native_layer_norm(
      rows.reshape({s.m * s.groups, s.norm_features}), {s.norm_features}, ln_param(weight, rows),
      ln_param(bias, rows), opt.eps);
  return {y.view({s.m, s.k}), mean.to(st).view({s.m, s.groups}),
          rstd.to(st).view({s.m, s.groups})};
}

struct NormGrads {
  at::Tensor dx, dweight, dbias;
};

NormGrads norm_backward(const at::Tensor& grad, const at::Tensor& rows, const OptTensor& weight,
                        const OptTensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                        const ProjectorShape& s, const ProjectorOptions& opt, bool need_dx,
                        bool need_dw, bool need_db) {
  if (opt.norm == ProjectorNorm::kNone) return {grad, {}, {}};
  const auto dt = rows.scalar_type();
  const auto st = stat_type(dt);
  const int64_t n = s.m * s.groups;
  NormGrads out;
  if (opt.norm == ProjectorNorm::kLayerNorm) {
    const auto [dx, dw, db] = at::native_layer_norm_backward(
        grad.reshape({n, s.norm_features}), rows.reshape({n, s.norm_features}),
        {s.norm_features}, mean.reshape({n, 1}), rstd.reshape({n, 1}), ln_param(weight, rows),
        ln_param(bias, rows), {need_dx, need_dw, need_db});
    if (need_dx) out.dx = dx.view({s.m, s.k});
    if (need_dw) out.dweight = dw.to(dt);
    if (need_db) out.dbias = db.to(dt);
    return out;
  }
  // RMSNorm: y = w * round(xhat), xhat = x * rstd (stat type).
  const auto xf = rows.reshape({n, s.norm_features}).to(st);
  const auto gf = grad.reshape({n, s.norm_features}).to(st);
  const auto r = rstd.reshape({n, 1});
  const auto xhat = xf * r;
  if (need_dw) out.dweight = (gf * xhat.to(dt).to(st)).sum(0).to(dt);
  if (need_dx) {
    const auto gw = gf * weight->to(st);
    out.dx = (r * (gw - xhat * (gw * xhat).mean(-1, /*keepdim=*/true))).to(dt).view({s.m, s.k});
  }
  return out;
}

at::Tensor dense(const at::Tensor& a, const at::Tensor& w, const OptTensor& b) {
  return b ? at::addmm(*b, a, w.t()) : at::mm(a, w.t());
}

// act(a @ w^T + b) and its pre-activation: the device's fused kernel where it takes the inputs,
// ATen's addmm + activation for whatever it leaves undefined.
DenseAct dense_act(const at::Tensor& a, const at::Tensor& w, const OptTensor& b,
                   ProjectorActivation act, bool keep_pre, FusedDenseFn fused) {
  DenseAct r = fused ? fused(a, w, b, act, keep_pre) : DenseAct{};
  if (!r.out.defined() && !r.pre.defined()) r.pre = dense(a, w, b);
  if (!r.out.defined()) r.out = activation_forward(r.pre, act);
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_forward(
    const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const OptTensor& norm_weight, const OptTensor& norm_bias,
    const ProjectorOptions& opt, FusedDenseFn fused_dense, ShuffleNormFn shuffle_norm,
    ShuffleGemmFn shuffle_gemm) {
  const auto s = check_mlp_projector(x, w1, b1, w2, b2, norm_weight, norm_bias, opt);
  // GEMM1 + b1 reading its rows itself where the device can: through the shuffle's index map
  // without a norm; or with the norm's statistics from a pre-pass, the norm applied inside the
  // GEMM: InternVL (shuffle, then LayerNorm over the row) and Qwen's mergers (the merged rows as
  // they are, r = 1: LayerNorm / RMSNorm per token before the merge, or LayerNorm after it).
  at::Tensor shuffled_pre;
  NormOut normed;
  bool fused_norm = false;
  const bool gemm_reads = shuffle_gemm != nullptr && s.m > 0;
  const auto stats = x.options().dtype(stat_type(x.scalar_type()));
  const bool internvl = opt.shuffle > 1 && opt.norm == ProjectorNorm::kLayerNorm &&
                        opt.norm_post && s.groups == 1;
  const bool merger = opt.shuffle <= 1 && opt.merge > 1 && opt.norm != ProjectorNorm::kNone;
  if (gemm_reads && opt.shuffle > 1 && opt.norm == ProjectorNorm::kNone) {
    shuffled_pre = shuffle_gemm(x, opt.shuffle, w1, b1, {}).pre;  // (M, N1) or undefined
    if (shuffled_pre.defined()) {  // no rows, no statistics (distinct empty outputs)
      normed = {at::Tensor(), at::empty({0}, stats), at::empty({0}, stats)};
      fused_norm = true;
    }
  } else if (gemm_reads && shuffle_norm != nullptr && (internvl || merger)) {
    // (shuffle_norm is only a gate here: VLMKERN_PROJECTOR_SHUFFLE_NORM=aten turns this off too)
    // (B, H, W, C) views and r of the GEMM's rows and of the statistics' rows: InternVL's grid
    // for both; a merger's (1, M, 1, K) rows, and its (1, M * groups, 1, norm_features) tokens
    const at::Tensor rows = internvl ? x : x.reshape({1, s.m, 1, s.k});
    const at::Tensor stat_rows =
        internvl ? x : rows.reshape({1, s.m * s.groups, 1, s.norm_features});
    const int64_t r = internvl ? opt.shuffle : 1;
    auto [pre, mean, rstd] =
        shuffle_gemm(rows, r, w1, b1, {stat_rows, r, norm_weight, norm_bias, opt.eps, s.groups,
                                       opt.norm == ProjectorNorm::kRmsNorm});
    if (pre.defined()) {
      shuffled_pre = pre;
      normed = {at::Tensor(), mean, rstd};
      fused_norm = true;
    }
  }
  if (!fused_norm && shuffle_norm != nullptr && internvl && s.m > 0) {
    normed = {at::empty({s.m, s.k}, x.options()), at::empty({s.m, 1}, stats),
              at::empty({s.m, 1}, stats)};
    fused_norm = shuffle_norm(x, opt.shuffle, norm_weight, norm_bias, opt.eps, normed.y,
                              normed.mean, normed.rstd);
  }
  if (!fused_norm) normed = norm_forward(projector_rows(x, s, opt), norm_weight, norm_bias, s, opt);
  auto [xn, mean, rstd] = normed;
  // h (the pre-activation) is an output whenever there is a second Linear, or an activation to
  // differentiate; a single identity Linear returns its output alone.
  const bool keep_h = w2.has_value() || opt.activation != ProjectorActivation::kNone;
  auto [a, h] = shuffled_pre.defined()
                    ? DenseAct{activation_forward(shuffled_pre, opt.activation), shuffled_pre}
                    : dense_act(xn, w1, b1, opt.activation, keep_h, fused_dense);
  const auto none = [&] { return at::empty({0}, x.options()); };
  if (w2) {
    auto out = dense_act(a, *w2, b2, ProjectorActivation::kNone, false, fused_dense).out;
    // GEMM2's input, kept for dw2 (as eager autograd keeps it) unless it is hidden itself.
    const bool identity = opt.activation == ProjectorActivation::kNone;
    return {out.view(s.out_sizes), h, identity ? none() : a, mean, rstd};
  }
  auto hidden = keep_h ? h : none();
  return {a.view(s.out_sizes), hidden, none(), mean, rstd};
}

ProjectorGrads mlp_projector_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& w1, const OptTensor& w2,
                                           const OptTensor& norm_weight, const OptTensor& norm_bias,
                                           const at::Tensor& hidden, const at::Tensor& act,
                                           const at::Tensor& mean, const at::Tensor& rstd,
                                           const ProjectorOptions& opt, std::array<bool, 7> mask,
                                           DenseActBackwardFn dense_act_backward) {
  const auto s = check_mlp_projector(x, w1, std::nullopt, w2, std::nullopt, norm_weight,
                                     norm_bias, opt);
  check_projector_saved(grad_out, hidden, act, mean, rstd, x, s, opt, w2.has_value());
  const auto g = grad_out.reshape({s.m, s.d});
  const bool norm = opt.norm != ProjectorNorm::kNone;
  const bool need_dxn = mask[0] || (norm && (mask[5] || mask[6]));
  const bool need_dh = need_dxn || mask[1] || mask[2];
  at::Tensor dx, dw1, db1, dw2, db2, dnw, dnb;

  const bool identity = opt.activation == ProjectorActivation::kNone;
  at::Tensor da = g, dh;
  if (w2) {
    if (mask[3]) {
      dw2 = at::mm(g.t(), act.numel() > 0 ? act : activation_forward(hidden, opt.activation));
    }
    if (mask[4]) db2 = g.sum(0);
    if (need_dh && !identity && dense_act_backward != nullptr && s.m > 0) {
      dh = dense_act_backward(g, *w2, hidden.view({s.m, s.n1}), opt.activation);
    }
    if (need_dh && !dh.defined()) da = at::mm(g, *w2);
  }
  if (!need_dh) return {dx, dw1, db1, dw2, db2, dnw, dnb};
  if (!dh.defined()) {
    dh = identity ? da : activation_backward(da, hidden.view({s.m, s.n1}), opt.activation);
  }
  if (mask[2]) db1 = dh.sum(0);
  at::Tensor rows;
  if (mask[1] || need_dxn) rows = projector_rows(x, s, opt);
  if (mask[1]) {
    auto xn = norm ? norm_forward(rows, norm_weight, norm_bias, s, opt).y : rows;
    dw1 = at::mm(dh.t(), xn);
  }
  if (!need_dxn) return {dx, dw1, db1, dw2, db2, dnw, dnb};
  const auto dxn = at::mm(dh, w1);
  auto ng = norm_backward(dxn, rows, norm_weight, norm_bias, mean, rstd, s, opt, mask[0], mask[5],
                          mask[6]);
  dnw = ng.dweight;
  dnb = ng.dbias;
  if (mask[0]) {
    dx = opt.shuffle > 1
             ? shuffle_op(ng.dx.view({x.size(0), x.size(1) / opt.shuffle,
                                      x.size(2) / opt.shuffle, s.k}),
                          opt.shuffle, true)
             : ng.dx.reshape(x.sizes());
  }
  return {dx, dw1, db1, dw2, db2, dnw, dnb};
}

}  // namespace vlmkern
