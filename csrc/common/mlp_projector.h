// MLP projector (VLM connector): argument checks and the device-independent ATen composite of the
// forward and backward, shared by the CPU and CUDA registrations until fused kernels replace them.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace vlmkern {

enum class ProjectorActivation { kGelu, kGeluTanh, kQuickGelu, kNone };
enum class ProjectorNorm { kNone, kLayerNorm, kRmsNorm };

// The string/int options of the schema, parsed and validated.
struct ProjectorOptions {
  ProjectorActivation activation;
  ProjectorNorm norm;
  bool norm_post;  // norm_position == "post": over the K features after the shuffle / merge
  double eps;
  int64_t shuffle;  // pixel-shuffle factor r (1 = none)
  int64_t merge;    // Qwen spatial merge size s: s*s consecutive tokens form one row (1 = none)
};

ProjectorOptions parse_projector_options(std::string_view activation, std::string_view norm,
                                         std::string_view norm_position, double eps,
                                         int64_t shuffle, int64_t merge);

// Sizes of one call. Rows: M tokens after the shuffle / merge, each of K = factor^2 * C features;
// the norm normalizes `groups` groups of `norm_features` features per row.
struct ProjectorShape {
  int64_t m, k, n1, d, factor, c, groups, norm_features;
  std::vector<int64_t> out_sizes;
};

// Checks every argument (messages "vlmkern.mlp_projector: ...", naming the argument).
ProjectorShape check_mlp_projector(const at::Tensor& x, const at::Tensor& w1,
                                   const std::optional<at::Tensor>& b1,
                                   const std::optional<at::Tensor>& w2,
                                   const std::optional<at::Tensor>& b2,
                                   const std::optional<at::Tensor>& norm_weight,
                                   const std::optional<at::Tensor>& norm_bias,
                                   const ProjectorOptions& opt);

// Backward-only checks: grad_out has the output's shape, hidden / mean / rstd the forward's.
void check_projector_saved(const at::Tensor& grad_out, const at::Tensor& hidden,
                           const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                           const at::Tensor& x,
                           const ProjectorShape& s, const ProjectorOptions& opt, bool has_w2);

// One Linear + activation as a device may fuse it: out = act(a (M, K) @ w (N, K)^T + b (N)) and,
// when keep_pre, pre = a @ w^T + b (the pre-activation, (M, N)). A device hook fills what it
// can: both (fused epilogue), only `pre` (the composite applies the activation), or neither (the
// composite runs the whole Linear + activation in ATen).
struct DenseAct {
  at::Tensor out, pre;
};
using FusedDenseFn = DenseAct (*)(const at::Tensor& a, const at::Tensor& w,
                                  const std::optional<at::Tensor>& b, ProjectorActivation act,
                                  bool keep_pre);

// A device's pixel shuffle + LayerNorm in one pass (InternVL: the norm over the K = r*r*C
// features of each shuffled row): x (B, H, W, C) -> xn (M, K) in x's dtype, mean and rstd (M, 1)
// fp32, all preallocated. false: not handled (the composite shuffles, then normalizes).
using ShuffleNormFn = bool (*)(const at::Tensor& x, int64_t r,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps,
                               const at::Tensor& xn, const at::Tensor& mean,
                               const at::Tensor& rstd);

// A norm for the ShuffleGemmFn to apply to its A rows, over `groups` equal runs of each row's
// features (InternVL: 1, the shuffled row; Qwen's mergers: 4, LayerNorm / RMSNorm per merged
// token, or 1, the post-merge LayerNorm): its statistics are those of the rows of stat_rows
// (B', H', W', C') pixel-shuffled at stat_r, M * groups of them in order; weight / bias cover one
// group. stat_rows undefined: no norm.
struct ShuffleGemmNorm {
  at::Tensor stat_rows;
  int64_t stat_r = 1;
  std::optional<at::Tensor> weight, bias;
  double eps = 1e-5;
  int64_t groups = 1;
  bool rms = false;
};

// The ShuffleGemmFn's outputs: pre (M, N), and with a norm its fp32 statistics, mean and rstd
// (M, groups) (RMSNorm: mean (0,)); pre undefined: not handled, nothing allocated or launched.
struct ShuffleGemmOut {
  at::Tensor pre, mean, rstd;
};

// A device's pixel shuffle + first Linear as one GEMM whose A rows are read through the shuffle's
// index map (no shuffled copy; Idefics3 / SmolVLM, or any shuffled projector without a norm; with
// `norm`, a statistics pass, then the rows normalized inside the GEMM, no normalized copy either:
// InternVL, and Qwen's mergers at r = 1 on the merged rows): x (B, H, W, C) -> pre (M, N) =
// shuffle(x) (normalized) @ w^T + b in x's dtype. Undefined pre: not handled (the composite
// shuffles, normalizes, then runs the Linear).
using ShuffleGemmFn = ShuffleGemmOut (*)(const at::Tensor& x, int64_t r, const at::Tensor& w,
                                         const std::optional<at::Tensor>& b,
                                         const ShuffleGemmNorm& norm);

// Forward: (out, hidden = GEMM1 + b1 before the activation, act = GEMM2's input (or (0,)), mean,
// rstd). See torch_bindings.cpp.
// `fused_dense` (optional) runs both Linears where it can, `shuffle_norm` (optional) the shuffle
// and a post-shuffle LayerNorm, `shuffle_gemm` (optional) the shuffle and GEMM1 when there is no
// norm, or with both, the norm + GEMM1 of InternVL (after the shuffle) and of Qwen's mergers (on
// the merged rows) as the statistics pass and one GEMM; the rest of the chain stays ATen's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_forward(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const ProjectorOptions& opt, FusedDenseFn fused_dense = nullptr,
    ShuffleNormFn shuffle_norm = nullptr, ShuffleGemmFn shuffle_gemm = nullptr);

// A device's second-Linear input gradient with the activation's derivative in its epilogue:
// dh (M, N1) = act'(pre (M, N1)) * (g (M, D) @ w2 (D, N1)), g @ w2 never written on its own.
// Undefined: not handled (the composite runs the GEMM, then ATen's activation backward).
using DenseActBackwardFn = at::Tensor (*)(const at::Tensor& g, const at::Tensor& w2,
                                          const at::Tensor& pre, ProjectorActivation act);

// Backward: (dx, dw1, db1, dw2, db2, dnorm_weight, dnorm_bias); undefined where output_mask is off.
// `dense_act_backward` (optional) gives dh where it can.
using ProjectorGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ProjectorGrads mlp_projector_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& w1,
                                           const std::optional<at::Tensor>& w2,
                                           const std::optional<at::Tensor>& norm_weight,
                                           const std::optional<at::Tensor>& norm_bias,
                                           const at::Tensor& hidden, const at::Tensor& act,
                                           const at::Tensor& mean, const at::Tensor& rstd,
                                           const ProjectorOptions& opt,
                                           std::array<bool, 7> output_mask,
                                           DenseActBackwardFn dense_act_backward = nullptr);

}  // namespace vlmkern
