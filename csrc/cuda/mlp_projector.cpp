// CUDA registration of mlp_projector and its backward: the shared ATen composite (cuBLAS GEMMs,
// ATen elementwise kernels, no host syncs) under a guard for x's device, InternVL's pixel
// shuffle + LayerNorm as one kernel (cuda/shuffle_layer_norm.h); with
// VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused, a shuffled projector's first Linear reads its rows
// through the shuffle's index map (cuda/shuffle_gemm.h), InternVL's LayerNorm applied in it from
// a statistics pass (no normalized copy); with
// VLMKERN_PROJECTOR_GEMM=cutlass, its two Linears run on the fused CUTLASS GEMM + bias + GELU
// kernel (cuda/gemm_bias_act.h) where the device and the inputs allow, else on ATen as before;
// with VLMKERN_PROJECTOR_DGELU=fused, the backward's dGELU runs in the epilogue of its g @ w2
// GEMM (cuda/gemm_dgelu.h).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "common/checks.h"
#include "common/mlp_projector.h"
#include "cuda/gemm_bias_act.h"
#include "cuda/gemm_dgelu.h"
#include "cuda/shuffle_gemm_aten.h"
#include "cuda/shuffle_layer_norm.h"
#include "ops.h"

namespace vlmkern {
namespace {

// VLMKERN_PROJECTOR_GEMM, read on every call (a getenv): "aten" (or unset) keeps cuBLAS;
// "cutlass" takes the fused cooperative kernel for both Linears where it can, "cutlass_wide" the
// same on 128 x 256 tiles; "cutlass_pingpong" the pingpong kernel for GEMM1 + GELU (+ aux) and
// cuBLAS for the rest; "cutlass_sm80" the CUTLASS 2.x kernel for both Linears on any sm_80+ GPU.
// The default stays "aten": on the first H100 run the cooperative kernel was correct but
// 0.57-1.13x the ATen path (bench/results/2026-11-22-h100-6f8743a); pingpong, wide and sm80 have
// not run yet.
enum class ProjectorGemm { kAten, kCutlass, kCutlassPingpong, kCutlassWide, kCutlassSm80 };

ProjectorGemm projector_gemm() {
  const char* env = std::getenv("VLMKERN_PROJECTOR_GEMM");
  const std::string_view v = env ? env : "";
  VLMKERN_CHECK(v.empty() || v == "aten" || v == "cutlass" || v == "cutlass_pingpong" ||
                    v == "cutlass_wide" || v == "cutlass_sm80",
                "mlp_projector", "VLMKERN_PROJECTOR_GEMM must be 'aten', 'cutlass', "
                "'cutlass_pingpong', 'cutlass_wide' or 'cutlass_sm80', got '", std::string(v),
                "'");
  if (v == "cutlass") return ProjectorGemm::kCutlass;
  if (v == "cutlass_wide") return ProjectorGemm::kCutlassWide;
  if (v == "cutlass_sm80") return ProjectorGemm::kCutlassSm80;
  return v == "cutlass_pingpong" ? ProjectorGemm::kCutlassPingpong : ProjectorGemm::kAten;
}

// A "fused" / "aten" switch read from the environment on every call (a getenv): true for
// "fused", false for "aten", `unset_fused` when unset; any other value raises, naming `op`.
bool fused_switch(const char* var, const char* op, bool unset_fused) {
  const char* env = std::getenv(var);
  const std::string_view v = env ? env : "";
  VLMKERN_CHECK(v.empty() || v == "fused" || v == "aten", op, var, " must be 'fused' or 'aten', "
                "got '", std::string(v), "'");
  return v.empty() ? unset_fused : v == "fused";
}

// A CUTLASS kernel's workspace of `bytes` on `like`'s device from the caching allocator, or an
// undefined tensor for none.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return {};
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The FusedDenseFn of the CUDA composite: a (M, K) row-major with any row stride, w (N, K) and b
// contiguous, bf16 / fp16, on a compute-capability-9.0 device (8.0+ for kSm80), sizes and
// pointers 16-byte aligned.
// GELU gets the fused epilogue (writing `pre` as its aux output when asked); the other
// activations take the identity kernel and leave the activation to the composite.
DenseAct cutlass_dense_with(GemmSchedule sched, const at::Tensor& a, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, ProjectorActivation act,
                            bool keep_pre) {
  const auto dt = a.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return {};
  if (a.dim() != 2 || a.size(0) == 0 || a.stride(1) != 1 || !w.is_contiguous() ||
      (b && !b->is_contiguous())) {
    return {};
  }
  const bool gelu = act == ProjectorActivation::kGelu;
  if (gelu && !keep_pre) return {};  // only gelu + aux is compiled (the op always keeps GEMM1's h)
  GemmBiasActParams p{};
  p.schedule = sched;
  p.dtype = dt == at::kBFloat16 ? GemmDtype::kBFloat16 : GemmDtype::kFloat16;
  p.act = gelu ? GemmActivation::kGelu : GemmActivation::kIdentity;
  p.m = a.size(0);
  p.n = w.size(0);
  p.k = w.size(1);
  p.a = a.const_data_ptr();
  p.lda = a.size(0) == 1 ? a.size(1) : a.stride(0);  // one row: its stride is never used
  p.w = w.const_data_ptr();
  p.bias = b ? b->const_data_ptr() : nullptr;
  p.device = a.get_device();
  // Eligibility first, so a fallback allocates nothing: the (M, N) outputs will come from the
  // caching allocator (512-byte aligned blocks), so W's aligned-if-eligible address stands in.
  p.out = const_cast<void*>(p.w);  // a stand-in address for the check only, never written
  p.aux = gelu ? p.out : nullptr;
  if (gemm_bias_act_unsupported(p) != nullptr) return {};
  auto out = at::empty({p.m, p.n}, a.options());
  auto pre = gelu ? at::empty({p.m, p.n}, a.options()) : out;
  p.out = out.mutable_data_ptr();
  p.aux = gelu ? pre.mutable_data_ptr() : nullptr;
  const at::Tensor ws = workspace(gemm_bias_act_workspace_size(p), a);
  C10_CUDA_CHECK(gemm_bias_act(p, ws.defined() ? ws.mutable_data_ptr() : nullptr,
                               c10::cuda::getCurrentCUDAStream(p.device).stream()));
  if (gelu) return {out, pre};
  return {act == ProjectorActivation::kNone ? out : at::Tensor(), out};
}

DenseAct cutlass_dense(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b,
                       ProjectorActivation act, bool keep_pre) {
  return cutlass_dense_with(GemmSchedule::kCooperative, a, w, b, act, keep_pre);
}

DenseAct cutlass_wide_dense(const at::Tensor& a, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, ProjectorActivation act,
                            bool keep_pre) {
  return cutlass_dense_with(GemmSchedule::kCooperativeWide, a, w, b, act, keep_pre);
}

DenseAct cutlass_sm80_dense(const at::Tensor& a, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, ProjectorActivation act,
                            bool keep_pre) {
  return cutlass_dense_with(GemmSchedule::kSm80, a, w, b, act, keep_pre);
}

// Pingpong is compiled for GELU + aux only: anything else (GEMM2, other activations) returns
// nothing and stays on cuBLAS.
DenseAct cutlass_pingpong_dense(const at::Tensor& a, const at::Tensor& w,
                                const std::optional<at::Tensor>& b, ProjectorActivation act,
                                bool keep_pre) {
  if (act != ProjectorActivation::kGelu) return {};
  return cutlass_dense_with(GemmSchedule::kPingpong, a, w, b, act, keep_pre);
}

// VLMKERN_PROJECTOR_DGELU, read per call: "aten" (or unset) runs g @ w2 on cuBLAS, then ATen's
// gelu_backward; "fused" computes dh = gelu'(hidden) * (g @ w2) in one sm_90a CUTLASS GEMM's
// epilogue (cuda/gemm_dgelu.h). Off by default until a GPU run shows it beats cuBLAS + the
// elementwise pass (the forward's CUTLASS GEMM did not on the first H100 run).
bool dgelu_fused() {
  return fused_switch("VLMKERN_PROJECTOR_DGELU", "mlp_projector_backward", false);
}

// The DenseActBackwardFn of the CUDA composite: exact GELU; g (M, D) with unit column stride,
// w2 (D, N1) and pre (M, N1) contiguous, all bf16 / fp16 of one dtype; the kernel's alignment
// rules on a compute-capability-9.0 device; else undefined (nothing allocated).
at::Tensor cutlass_dgelu(const at::Tensor& g, const at::Tensor& w2, const at::Tensor& pre,
                         ProjectorActivation act) {
  const auto dt = g.scalar_type();
  if (act != ProjectorActivation::kGelu || (dt != at::kBFloat16 && dt != at::kHalf) ||
      w2.scalar_type() != dt || pre.scalar_type() != dt || g.dim() != 2 || g.stride(1) != 1 ||
      !w2.is_contiguous() || !pre.is_contiguous()) {
    return {};
  }
  GemmDGeluParams p{};
  p.dtype = dt == at::kBFloat16 ? GemmDtype::kBFloat16 : GemmDtype::kFloat16;
  p.m = g.size(0);
  p.n = w2.size(1);
  p.k = g.size(1);
  p.g = g.const_data_ptr();
  p.ldg = g.size(0) == 1 ? g.size(1) : g.stride(0);  // one row: its stride is never used
  p.w = w2.const_data_ptr();
  p.pre = pre.const_data_ptr();
  p.device = g.get_device();
  // Eligibility first, so a fallback allocates nothing: dh comes from the caching allocator
  // (aligned blocks), so pre's address stands in for it in the check.
  p.out = const_cast<void*>(p.pre);
  if (gemm_dgelu_unsupported(p) != nullptr) return {};
  auto dh = at::empty({p.m, p.n}, pre.options());
  p.out = dh.mutable_data_ptr();
  const at::Tensor ws = workspace(gemm_dgelu_workspace_size(p), g);
  C10_CUDA_CHECK(gemm_dgelu(p, ws.defined() ? ws.mutable_data_ptr() : nullptr,
                            c10::cuda::getCurrentCUDAStream(p.device).stream()));
  return dh;
}

// VLMKERN_PROJECTOR_SHUFFLE_NORM, read per call: "fused" (or unset) runs InternVL's pixel shuffle
// + LayerNorm as one kernel; "aten" keeps the shuffle copy and ATen's LayerNorm (to compare).
bool shuffle_norm_fused() {
  return fused_switch("VLMKERN_PROJECTOR_SHUFFLE_NORM", "mlp_projector", true);
}

// The shuffle + LayerNorm kernel's arguments for fp16 / bf16 x (B, H, W, C) with unit channel
// stride at r, weight / bias of x's dtype, contiguous (or none); out, mean and rstd unset;
// nullopt for inputs it does not take.
std::optional<ShuffleLnArgs> shuffle_ln_args(const at::Tensor& x, int64_t r,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias, double eps,
                                             bool rms) {
  const auto dt = x.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || x.dim() != 4 || x.stride(3) != 1 ||
      x.size(3) > INT32_MAX || r < 1 || r > INT32_MAX) {
    return std::nullopt;
  }
  for (const auto* p : {&weight, &bias}) {
    if (*p && ((*p)->scalar_type() != dt || !(*p)->is_contiguous())) return std::nullopt;
  }
  ShuffleLnArgs a;
  a.x = x.const_data_ptr();
  a.weight = weight ? weight->const_data_ptr() : nullptr;
  a.bias = bias ? bias->const_data_ptr() : nullptr;
  a.gh = x.size(1) / r;
  a.gw = x.size(2) / r;
  a.rows = x.size(0) * a.gh * a.gw;
  a.stride_b = x.stride(0);
  a.stride_h = x.stride(1);
  a.stride_w = x.stride(2);
  a.r = static_cast<int>(r);
  a.c = static_cast<int>(x.size(3));
  a.k = static_cast<int>(r * r * x.size(3));
  a.eps = static_cast<float>(eps);
  a.rms = rms ? 1 : 0;
  return a;
}

ShuffleLnDtype ln_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? ShuffleLnDtype::kBFloat16 : ShuffleLnDtype::kFloat16;
}

// The ShuffleNormFn of the CUDA composite: shuffle_ln_args' inputs, 16-byte aligned rows; else
// false.
bool cuda_shuffle_norm(const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, const at::Tensor& xn,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  auto a = shuffle_ln_args(x, r, weight, bias, eps, /*rms=*/false);
  if (!a) return false;
  a->out = xn.mutable_data_ptr();
  a->mean = mean.mutable_data_ptr<float>();
  a->rstd = rstd.mutable_data_ptr<float>();
  if (shuffle_layer_norm_unsupported(*a) != nullptr) return false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(cuda_shuffle_layer_norm(*a, ln_dtype(x), stream));
  return true;
}

// VLMKERN_PROJECTOR_SHUFFLE_GEMM, read per call: "aten" (or unset) shuffles into a copy and runs
// cuBLAS; "fused" runs the first Linear of a shuffled projector (Idefics3 / SmolVLM without a
// norm; InternVL with its LayerNorm: a statistics pass, then the GEMM normalizes its A tiles) as
// one sm_90a GEMM reading its rows through the shuffle's index map (cuda/shuffle_gemm.h). Off by
// default until a GPU run shows it beats copy + cuBLAS.
bool shuffle_gemm_fused() {
  return fused_switch("VLMKERN_PROJECTOR_SHUFFLE_GEMM", "mlp_projector", false);
}

// The ShuffleGemmFn of the CUDA composite: fp16 / bf16 x (B, H, W, C) with unit channel stride,
// w (N, r*r*C), b and the norm's weight / bias of x's dtype, contiguous; the kernels' alignment
// rules. Every check (the statistics kernel's too) comes before anything is allocated or
// launched: a fallback costs nothing.
ShuffleGemmOut cuda_shuffle_gemm_fn(const at::Tensor& x, int64_t r, const at::Tensor& w,
                                    const std::optional<at::Tensor>& b,
                                    const ShuffleGemmNorm& norm) {
  std::optional<ShuffleGemmParams> params = shuffle_gemm_params(x, r, w, b);
  if (!params) return {};
  ShuffleGemmParams& p = *params;
  const int64_t m = x.size(0) * (x.size(1) / r) * (x.size(2) / r);
  // Eligibility first: the outputs come from the caching allocator (aligned blocks), so W's
  // address stands in for them in the checks.
  const auto stand_in = static_cast<float*>(const_cast<void*>(p.weight));
  p.out = stand_in;
  std::optional<ShuffleLnArgs> ln;
  if (norm.stat_rows.defined()) {
    ln = shuffle_ln_args(norm.stat_rows, norm.stat_r, norm.weight, norm.bias, norm.eps,
                         norm.rms);
    if (!ln || ln->rows != m * norm.groups || norm.groups > INT32_MAX) return {};
    ln->mean = norm.rms ? nullptr : stand_in;
    ln->rstd = stand_in;
    p.norm_mean = ln->mean;
    p.norm_rstd = stand_in;
    p.norm_weight = ln->weight;
    p.norm_bias = ln->bias;
    p.norm_groups = static_cast<int>(norm.groups);
    p.norm_rms = norm.rms ? 1 : 0;
    if (shuffle_layer_norm_unsupported(*ln) != nullptr) return {};
  }
  if (shuffle_gemm_unsupported(p) != nullptr) return {};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  ShuffleGemmOut out;
  if (ln) {  // the statistics pass: (M, groups) fp32 (RMSNorm: rstd only, mean (0,))
    const auto f32 = x.options().dtype(at::kFloat);
    out.mean = norm.rms ? at::empty({0}, f32) : at::empty({m, norm.groups}, f32);
    out.rstd = at::empty({m, norm.groups}, f32);
    ln->mean = norm.rms ? nullptr : out.mean.mutable_data_ptr<float>();
    ln->rstd = out.rstd.mutable_data_ptr<float>();
    C10_CUDA_CHECK(cuda_shuffle_layer_norm(*ln, ln_dtype(x), stream));
    p.norm_mean = ln->mean;
    p.norm_rstd = ln->rstd;
  }
  out.pre = at::empty({m, w.size(0)}, x.options());
  p.out = out.pre.mutable_data_ptr();
  C10_CUDA_CHECK(cuda_shuffle_gemm(p, stream));
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_projector_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    std::string_view activation, std::string_view norm, std::string_view norm_position, double eps,
    int64_t shuffle, int64_t merge) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  const c10::cuda::CUDAGuard guard(x.device());
  const ProjectorGemm gemm = projector_gemm();
  return mlp_projector_forward(x, w1, b1, w2, b2, norm_weight, norm_bias, opt,
                               gemm == ProjectorGemm::kCutlass           ? &cutlass_dense
                               : gemm == ProjectorGemm::kCutlassWide     ? &cutlass_wide_dense
                               : gemm == ProjectorGemm::kCutlassPingpong ? &cutlass_pingpong_dense
                               : gemm == ProjectorGemm::kCutlassSm80     ? &cutlass_sm80_dense
                                                                         : nullptr,
                               shuffle_norm_fused() ? &cuda_shuffle_norm : nullptr,
                               shuffle_gemm_fused() ? &cuda_shuffle_gemm_fn : nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mlp_projector_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                            const std::optional<at::Tensor>& w2,
                            const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& norm_bias, const at::Tensor& hidden,
                            const at::Tensor& act, const at::Tensor& mean, const at::Tensor& rstd,
                            std::string_view activation, std::string_view norm,
                            std::string_view norm_position, double eps, int64_t shuffle,
                            int64_t merge, std::array<bool, 7> output_mask) {
  const auto opt = parse_projector_options(activation, norm, norm_position, eps, shuffle, merge);
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_projector_backward_impl(grad_out, x, w1, w2, norm_weight, norm_bias, hidden, act,
                                     mean, rstd, opt, output_mask,
                                     dgelu_fused() ? &cutlass_dgelu : nullptr);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("mlp_projector", &mlp_projector_cuda);
  m.impl("mlp_projector_backward", &mlp_projector_backward_cuda);
}

}  // namespace vlmkern
