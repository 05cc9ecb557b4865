// Argument checks of mlp_projector / mlp_projector_backward (CPU and CUDA share them, and the fake
// kernel in python/vlmkern/ops/mlp_projector.py repeats them word for word).
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <string>

#include "common/checks.h"
#include "common/mlp_projector.h"
#include "common/pixel_shuffle.h"

namespace vlmkern {
namespace {

constexpr const char* kOp = "mlp_projector";

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name,
                  const char* op = kOp) {
  VLMKERN_CHECK(t.scalar_type() == x.scalar_type(), op, name, " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
  VLMKERN_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ",
                x.device());
}

void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* what) {
  VLMKERN_CHECK(t.dim() == 1 && t.size(0) == n, kOp, name, " must have shape (", n, ",) ", what,
                ", got ", t.sizes());
}

// factor * factor * c, or -1 when it overflows int64.
int64_t grouped_features(int64_t c, int64_t factor) {
  int64_t out = 0;
  if (c10::mul_overflows(c, factor * factor, &out)) return -1;
  return out;
}

}  // namespace

ProjectorOptions parse_projector_options(std::string_view activation, std::string_view norm,
                                         std::string_view norm_position, double eps,
                                         int64_t shuffle, int64_t merge) {
  ProjectorOptions opt{};
  if (activation == "gelu") {
    opt.activation = ProjectorActivation::kGelu;
  } else if (activation == "gelu_tanh") {
    opt.activation = ProjectorActivation::kGeluTanh;
  } else if (activation == "quick_gelu") {
    opt.activation = ProjectorActivation::kQuickGelu;
  } else if (activation == "none") {
    opt.activation = ProjectorActivation::kNone;
  } else {
    VLMKERN_CHECK(false, kOp, "activation must be one of 'gelu', 'gelu_tanh', 'quick_gelu', ",
                  "'none'; got '", std::string(activation), "'");
  }
  if (norm == "none") {
    opt.norm = ProjectorNorm::kNone;
  } else if (norm == "layernorm") {
    opt.norm = ProjectorNorm::kLayerNorm;
  } else if (norm == "rmsnorm") {
    opt.norm = ProjectorNorm::kRmsNorm;
  } else {
    VLMKERN_CHECK(false, kOp, "norm must be one of 'none', 'layernorm', 'rmsnorm'; got '",
                  std::string(norm), "'");
  }
  VLMKERN_CHECK(norm_position == "pre" || norm_position == "post", kOp,
                "norm_position must be 'pre' or 'post'; got '", std::string(norm_position), "'");
  opt.norm_post = norm_position == "post";
  VLMKERN_CHECK(std::isfinite(eps) && eps >= 0, kOp, "eps must be a finite number >= 0, got ",
                eps);
  opt.eps = eps;
  VLMKERN_CHECK(shuffle >= 0 && shuffle <= kMaxScale, kOp, "shuffle must be in [0, ", kMaxScale,
                "], got ", shuffle);
  VLMKERN_CHECK(merge >= 0 && merge <= kMaxScale, kOp, "merge must be in [0, ", kMaxScale,
                "], got ", merge);
  opt.shuffle = shuffle > 1 ? shuffle : 1;
  opt.merge = merge > 1 ? merge : 1;
  VLMKERN_CHECK(opt.shuffle == 1 || opt.merge == 1, kOp, "shuffle=", shuffle, " and merge=", merge,
                " cannot both be > 1");
  return opt;
}

ProjectorShape check_mlp_projector(const at::Tensor& x, const at::Tensor& w1,
                                   const std::optional<at::Tensor>& b1,
                                   const std::optional<at::Tensor>& w2,
                                   const std::optional<at::Tensor>& b2,
                                   const std::optional<at::Tensor>& norm_weight,
                                   const std::optional<at::Tensor>& norm_bias,
                                   const ProjectorOptions& opt) {
  const auto dt = x.scalar_type();
  VLMKERN_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                kOp, "x must be a floating-point tensor (float32, float16, bfloat16 or float64), ",
                "got ", dt);
  check_rank(w1, 2, kOp, "w1", "(N1, K)");
  check_like_x(w1, x, "w1");
  ProjectorShape s{};
  s.n1 = w1.size(0);
  s.k = w1.size(1);
  VLMKERN_CHECK(s.k >= 1, kOp, "w1 must have at least one input feature (K >= 1), got shape ",
                w1.sizes());
  if (b1) {
    check_like_x(*b1, x, "b1");
    check_vector(*b1, s.n1, "b1", "(N1 = rows of w1)");
  }
  s.d = s.n1;
  if (w2) {
    check_rank(*w2, 2, kOp, "w2", "(D, N1)");
    check_like_x(*w2, x, "w2");
    VLMKERN_CHECK(w2->size(1) == s.n1, kOp, "w2 must have shape (D, N1) with N1 = ", s.n1,
                  " (rows of w1), got ", w2->sizes());
    s.d = w2->size(0);
  }
  if (b2) {
    VLMKERN_CHECK(w2.has_value(), kOp,
                  "b2 is given but w2 is None (a single-Linear projector has its bias in b1)");
    check_like_x(*b2, x, "b2");
    check_vector(*b2, s.d, "b2", "(D = rows of w2)");
  }

  s.factor = opt.shuffle > 1 ? opt.shuffle : opt.merge;
  if (opt.shuffle > 1) {
    const int64_t r = opt.shuffle;
    check_rank(x, 4, kOp, "x", "(B, H, W, C) when shuffle > 1");
    const int64_t b = x.size(0), h = x.size(1), w = x.size(2);
    s.c = x.size(3);
    VLMKERN_CHECK(h % r == 0, kOp, "x height H=", h, " is not divisible by shuffle=", r);
    VLMKERN_CHECK(w % r == 0, kOp, "x width W=", w, " is not divisible by shuffle=", r);
    VLMKERN_CHECK(grouped_features(s.c, r) == s.k, kOp, "x channels C=", s.c,
                  " times shuffle*shuffle=", r * r, " must equal K=", s.k, " (columns of w1)");
    s.m = b * (h / r) * (w / r);
    s.out_sizes = {b, h / r, w / r, s.d};
  } else if (opt.merge > 1) {
    const int64_t f = opt.merge;
    VLMKERN_CHECK(x.dim() >= 1, kOp, "x must have at least 1 dim (..., C), got a 0-D tensor");
    s.c = x.size(-1);
    VLMKERN_CHECK(grouped_features(s.c, f) == s.k, kOp, "x channels C=", s.c,
                  " times merge*merge=", f * f, " must equal K=", s.k, " (columns of w1)");
    const int64_t tokens = x.numel() / s.c;
    VLMKERN_CHECK(tokens % (f * f) == 0, kOp, "x has ", tokens,
                  " tokens, not divisible by merge*merge=", f * f);
    s.m = tokens / (f * f);
    s.out_sizes = {s.m, s.d};
  } else {
    VLMKERN_CHECK(x.dim() >= 1, kOp, "x must have at least 1 dim (..., K), got a 0-D tensor");
    s.c = x.size(-1);
    VLMKERN_CHECK(s.c == s.k, kOp, "x has ", s.c, " features (last dim) but w1 has K=", s.k,
                  " (columns)");
    s.m = x.numel() / s.k;
    s.out_sizes = x.sizes().vec();
    s.out_sizes.back() = s.d;
  }

  const bool grouped = !opt.norm_post && s.factor > 1;
  s.groups = grouped ? s.factor * s.factor : 1;
  s.norm_features = grouped ? s.c : s.k;
  if (opt.norm == ProjectorNorm::kNone) {
    VLMKERN_CHECK(!norm_weight, kOp, "norm_weight is given but norm='none'");
    VLMKERN_CHECK(!norm_bias, kOp, "norm_bias is given but norm='none'");
    return s;
  }
  const char* norm_name = opt.norm == ProjectorNorm::kLayerNorm ? "layernorm" : "rmsnorm";
  VLMKERN_CHECK(norm_weight.has_value(), kOp, "norm='", norm_name, "' needs norm_weight");
  VLMKERN_CHECK(!norm_bias || opt.norm == ProjectorNorm::kLayerNorm, kOp,
                "norm_bias is given but norm='rmsnorm' has no bias");
  const char* what = opt.norm_post ? "(the K features after the shuffle / merge)"
                                   : "(the C features of x, norm_position='pre')";
  check_like_x(*norm_weight, x, "norm_weight");
  check_vector(*norm_weight, s.norm_features, "norm_weight", what);
  if (norm_bias) {
    check_like_x(*norm_bias, x, "norm_bias");
    check_vector(*norm_bias, s.norm_features, "norm_bias", what);
  }
  return s;
}

void check_projector_saved(const at::Tensor& grad_out, const at::Tensor& hidden,
                           const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                           const at::Tensor& x,
                           const ProjectorShape& s, const ProjectorOptions& opt, bool has_w2) {
  const char* op = "mlp_projector_backward";
  check_like_x(grad_out, x, "grad_out", op);
  VLMKERN_CHECK(grad_out.sizes() == at::IntArrayRef(s.out_sizes), op, "grad_out must have the ",
                "output's shape ", at::IntArrayRef(s.out_sizes), ", got ", grad_out.sizes());
  check_like_x(hidden, x, "hidden", op);
  const bool keep_h = has_w2 || opt.activation != ProjectorActivation::kNone;
  const auto h_sizes = keep_h ? std::vector<int64_t>{s.m, s.n1} : std::vector<int64_t>{0};
  VLMKERN_CHECK(hidden.sizes() == at::IntArrayRef(h_sizes), op, "hidden must have shape ",
                at::IntArrayRef(h_sizes), ", got ", hidden.sizes());
  // act: GEMM2's input as the forward kept it, or (0,) (recomputed from hidden).
  check_like_x(act, x, "act", op);
  const bool act_ok = act.sizes() == at::IntArrayRef({0}) ||
                      (has_w2 && opt.activation != ProjectorActivation::kNone &&
                       act.sizes() == at::IntArrayRef({s.m, s.n1}));
  VLMKERN_CHECK(act_ok, op, "act must have shape [", s.m, ", ", s.n1, "] (two Linears with an "
                "activation) or [0], got ", act.sizes());
  const auto st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> stats{s.m, s.groups}, none{0};
  const bool has_mean = opt.norm == ProjectorNorm::kLayerNorm;
  const bool has_rstd = opt.norm != ProjectorNorm::kNone;
  for (const auto& [t, name, has] : {std::tuple{&mean, "mean", has_mean},
                                     std::tuple{&rstd, "rstd", has_rstd}}) {
    const auto& want = has ? stats : none;
    VLMKERN_CHECK(t->scalar_type() == st && t->device() == x.device(), op, name, " must be ", st,
                  " on ", x.device(), ", got ", t->scalar_type(), " on ", t->device());
    VLMKERN_CHECK(t->sizes() == at::IntArrayRef(want), op, name, " must have shape ",
                  at::IntArrayRef(want), ", got ", t->sizes());
  }
}

}  // namespace vlmkern
