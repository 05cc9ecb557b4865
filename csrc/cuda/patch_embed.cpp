// CUDA registration of patch_embed / _packed / _varlen (+ backwards): the ATen composite of
// common/patch_embed*.cpp under a device guard, with image mode's patch matrix built by one
// kernel (cuda/patchify.h: dtype conversion and aligned zero-padded rows) and its per-token
// addend (bias + positions) read in a cuBLASLt GEMM's epilogue (cuda/lt_matmul.h), packed
// mode's bilinear positions + bias written by one kernel (cuda/position_rows.h) as that addend;
// or, with VLMKERN_PATCH_EMBED_GEMM=implicit, image mode as one implicit-GEMM kernel that reads
// the pixels itself (cuda/patch_gemm.h, sm_90a), and its weight gradient likewise
// (cuda/patch_wgrad.h), and packed Qwen3-VL as one GEMM computing the positions in its epilogue
// (cuda/shuffle_gemm.h). No host syncs: grid_thw is never read back (its
// values are validated on the CPU path only).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/checks.h"
#include "common/patch_embed.h"
#include "cuda/lt_matmul.h"
#include "cuda/patch_gemm.h"
#include "cuda/patch_wgrad.h"
#include "cuda/patchify.h"
#include "cuda/position_rows.h"
#include "cuda/shuffle_gemm_aten.h"
#include "ops.h"

namespace vlmkern {
namespace {

bool patchify_dtype(at::ScalarType t, PatchifyDtype* out) {
  switch (t) {
    case at::kByte: *out = PatchifyDtype::kUInt8; return true;
    case at::kFloat: *out = PatchifyDtype::kFloat32; return true;
    case at::kHalf: *out = PatchifyDtype::kFloat16; return true;
    case at::kBFloat16: *out = PatchifyDtype::kBFloat16; return true;
    default: return false;
  }
}

// The pixel fields PatchifyParams and PatchGemmParams share: pixels (B, C, H, W) or, channels
// last, (B, H, W, C) at any strides, a (gh, gw) grid of P-sized patches.
template <class Params>
void set_pixels(Params& p, const at::Tensor& pixels, bool channels_last, int64_t patch,
                int64_t gh, int64_t gw) {
  const int cdim = channels_last ? 3 : 1, hdim = channels_last ? 1 : 2;
  const int wdim = channels_last ? 2 : 3;
  p.pixels = pixels.const_data_ptr();
  p.batch = pixels.size(0);
  p.gh = gh;
  p.gw = gw;
  p.channels = static_cast<int>(pixels.size(cdim));
  p.patch = static_cast<int>(patch);
  p.channels_last = channels_last ? 1 : 0;
  p.stride_b = pixels.stride(0);
  p.stride_c = pixels.stride(cdim);
  p.stride_h = pixels.stride(hdim);
  p.stride_w = pixels.stride(wdim);
}

// The PatchMatrixFn of the composite: pixels (B, C, H, W) / (B, H, W, C) at any strides -> out
// (B*gh*gw, kp) on the current stream; false (ATen's copy instead) for dtypes it does not take.
bool cuda_patch_matrix(const at::Tensor& pixels, bool channels_last, int64_t patch, int64_t gh,
                       int64_t gw, const at::Tensor& out) {
  PatchifyParams p;
  if (!patchify_dtype(pixels.scalar_type(), &p.in_dtype) ||
      !patchify_dtype(out.scalar_type(), &p.out_dtype)) {
    return false;
  }
  set_pixels(p, pixels, channels_last, patch, gh, gw);
  p.out = out.mutable_data_ptr();
  p.kp = static_cast<int>(out.size(1));
  if (patchify_unsupported(p) != nullptr) return false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pixels.device().index()).stream();
  C10_CUDA_CHECK(cuda_patchify(p, stream));
  return true;
}

[[maybe_unused]] const bool kPatchMatrixInstalled = (set_cuda_patch_matrix(&cuda_patch_matrix), true);

// The AddendGemmFn: one cuBLASLt batched matmul, blocks (B, L, D) = rows (B, L, kp) @ w (D, kp)^T
// + addend (L, D), with w and the addend at batch stride 0 (read per image, never broadcast into
// a buffer); false (ATen's baddbmm) when cuBLASLt is not linked or takes no algorithm.
bool cuda_addend_gemm(const at::Tensor& blocks, const at::Tensor& rows, const at::Tensor& w,
                      const at::Tensor& addend) {
  const int64_t b = rows.size(0);
  const at::Tensor add = addend.contiguous();  // (L, D): a (D,) bias expanded over L has pitch 0
  static constexpr float kOne = 1.0f;
  const LtMatmul mm{rows, w.unsqueeze(0).expand({b, w.size(0), w.size(1)}),
                    add.unsqueeze(0).expand({b, add.size(0), add.size(1)}), blocks, &kOne, &kOne,
                    /*device_scalars=*/false};
  return lt_matmul(mm);
}

[[maybe_unused]] const bool kAddendGemmInstalled = (set_cuda_addend_gemm(&cuda_addend_gemm), true);

// VLMKERN_PATCH_EMBED_GEMM, read per call: "lt" (or unset) builds the patch matrix and runs the
// cuBLASLt GEMM above (the backward's dW: patch matrix + mm); "implicit" runs the implicit-GEMM
// kernels (cuda/patch_gemm.h forward, cuda/patch_wgrad.h dW) where they take the inputs (sm_90a,
// fp16 / bf16 weights, pixels uint8 or that dtype), else the same fallbacks.
bool implicit_selected() {
  const char* env = std::getenv("VLMKERN_PATCH_EMBED_GEMM");
  const std::string_view v = env ? env : "";
  VLMKERN_CHECK(v.empty() || v == "lt" || v == "implicit", "patch_embed",
                "VLMKERN_PATCH_EMBED_GEMM must be 'lt' or 'implicit', got '", std::string(v),
                "'");
  return v == "implicit";
}

// The ImplicitPatchGemmFn: blocks (B, L, D) = patches(pixels) @ w (D, kp)^T + addend in one
// kernel, the patch rows gathered from pixels into shared memory.
bool cuda_implicit_patch_gemm(const at::Tensor& pixels, bool channels_last, int64_t patch,
                              int64_t gh, int64_t gw, const at::Tensor& w,
                              const at::Tensor& addend, const at::Tensor& blocks) {
  if (!implicit_selected() || blocks.stride(2) != 1) return false;
  PatchGemmParams p;
  if (!patchify_dtype(pixels.scalar_type(), &p.in_dtype) ||
      !patchify_dtype(w.scalar_type(), &p.dtype)) {
    return false;
  }
  const at::Tensor wc = w.contiguous();  // (D, kp): already contiguous from the fold / pad
  at::Tensor add;                        // (L, D) or (D,) with unit column stride
  if (addend.defined()) {
    add = addend.stride(-1) == 1 ? addend : addend.contiguous();
    p.addend = add.const_data_ptr();
    p.addend_row_stride = add.dim() == 2 ? add.stride(0) : 0;
  }
  set_pixels(p, pixels, channels_last, patch, gh, gw);
  p.w = wc.const_data_ptr();
  p.d = wc.size(0);
  p.kp = static_cast<int>(wc.size(1));
  p.out = blocks.mutable_data_ptr();
  p.out_batch_stride = blocks.stride(0);
  p.out_row_stride = blocks.stride(1);
  p.device = pixels.device().index();
  if (patch_gemm_unsupported(p) != nullptr) return false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.device).stream();
  C10_CUDA_CHECK(cuda_patch_gemm(p, stream));
  return true;
}

[[maybe_unused]] const bool kImplicitGemmInstalled =
    (set_cuda_implicit_patch_gemm(&cuda_implicit_patch_gemm), true);

// The ImplicitPatchWgradFn (VLMKERN_PATCH_EMBED_GEMM=implicit): dW^T = X^T G over splits of the
// token rows into fp32 partials (cuda/patch_wgrad.h), summed here and returned as (D, kp) in the
// gradient's dtype; undefined where the kernel does not take the inputs.
at::Tensor cuda_implicit_patch_wgrad(const at::Tensor& pixels, bool channels_last, int64_t patch,
                                     int64_t gh, int64_t gw, const at::Tensor& tokens, int64_t kp,
                                     const PixelNorm& norm) {
  if (!implicit_selected() || tokens.stride(2) != 1) return {};
  PatchWgradParams p;
  if (!patchify_dtype(pixels.scalar_type(), &p.in_dtype) ||
      !patchify_dtype(tokens.scalar_type(), &p.dtype)) {
    return {};
  }
  set_pixels(p, pixels, channels_last, patch, gh, gw);
  p.grad = tokens.const_data_ptr();
  p.g_batch_stride = tokens.size(0) == 1 ? 0 : tokens.stride(0);
  p.g_row_stride = tokens.size(1) == 1 ? 0 : tokens.stride(1);
  p.d = tokens.size(2);
  p.kp = static_cast<int>(kp);
  p.normalize = norm.active();
  if (p.normalize && p.channels <= kPatchWgradMaxChannels) {
    for (int c = 0; c < p.channels; ++c) {
      p.scale[c] = static_cast<float>(norm.scale(c));
      p.offset[c] = static_cast<float>(norm.offset(c));
    }
  }
  p.device = pixels.device().index();
  if (patch_wgrad_unsupported(p) != nullptr) return {};
  p.splits = patch_wgrad_splits(p);
  at::Tensor ws = at::empty({p.splits, kp, p.d}, tokens.options().dtype(at::kFloat));
  p.ws = ws.mutable_data_ptr<float>();
  C10_CUDA_CHECK(cuda_patch_wgrad(p, c10::cuda::getCurrentCUDAStream(p.device).stream()));
  // (D, kp) in the gradient's dtype, one rounding: the transpose and the cast are one copy.
  return ws.sum(0).t().to(tokens.scalar_type(), /*non_blocking=*/false, /*copy=*/false,
                          at::MemoryFormat::Contiguous);
}

[[maybe_unused]] const bool kImplicitWgradInstalled =
    (set_cuda_implicit_patch_wgrad(&cuda_implicit_patch_wgrad), true);

// The PositionRowsFn: one kernel (cuda/position_rows.h) writes packed mode's (N, D) addend; false
// (ATen's gathers) for fp64.
bool cuda_position_rows_fn(const at::Tensor& table, const at::Tensor& index,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& out) {
  PositionRowsParams p;
  switch (out.scalar_type()) {
    case at::kFloat: p.dtype = PositionRowsDtype::kFloat32; break;
    case at::kHalf: p.dtype = PositionRowsDtype::kFloat16; break;
    case at::kBFloat16: p.dtype = PositionRowsDtype::kBFloat16; break;
    default: return false;
  }
  p.table = table.const_data_ptr();
  p.index = index.const_data_ptr<int64_t>();
  p.weight = weight.const_data_ptr<float>();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;  // (D,), alive until launched
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.n = out.size(0);
  p.d = out.size(1);
  C10_CUDA_CHECK(cuda_position_rows(p, c10::cuda::getCurrentCUDAStream(out.device().index())
                                           .stream()));
  return true;
}

[[maybe_unused]] const bool kPositionRowsInstalled =
    (set_cuda_position_rows(&cuda_position_rows_fn), true);

// The PositionGemmFn (VLMKERN_PATCH_EMBED_GEMM=implicit): packed Qwen3-VL tokens (N, D) = x (N, K)
// @ w (D, K)^T as one wgmma GEMM (cuda/shuffle_gemm.h at r = 1: x's rows are its A rows) whose
// epilogue computes the bilinear positions + bias from the (4, N) taps; false (the position-rows
// kernel + cuBLASLt) unless the kernel takes the inputs: fp16 / bf16 throughout, K a multiple of
// 8, 16-byte aligned rows, an sm_90a device.
bool cuda_position_gemm_fn(const at::Tensor& tokens, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& table, const at::Tensor& index,
                           const at::Tensor& weight, const at::Tensor& bias) {
  if (!implicit_selected() || table.scalar_type() != x.scalar_type() || tokens.stride(1) != 1 ||
      tokens.stride(0) != tokens.size(1)) {
    return false;
  }
  // Alive until the launch: the parameters hold their pointers.
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();  // (N, K), unit column stride
  const at::Tensor wc = w.contiguous();                            // (D, K)
  const std::optional<at::Tensor> b =
      bias.defined() ? std::optional<at::Tensor>(bias.contiguous()) : std::nullopt;  // (D,)
  // (1, N, 1, K): the GEMM's grid at r = 1, each token row one A row
  std::optional<ShuffleGemmParams> params =
      shuffle_gemm_params(rows.unsqueeze(0).unsqueeze(2), 1, wc, b);
  if (!params) return false;
  ShuffleGemmParams& p = *params;
  p.out = tokens.mutable_data_ptr();
  p.table = table.const_data_ptr();
  p.tap_index = index.const_data_ptr<int64_t>();
  p.tap_weight = weight.const_data_ptr<float>();
  if (shuffle_gemm_unsupported(p) != nullptr) return false;
  C10_CUDA_CHECK(cuda_shuffle_gemm(p, c10::cuda::getCurrentCUDAStream(p.device).stream()));
  return true;
}

[[maybe_unused]] const bool kPositionGemmInstalled =
    (set_cuda_position_gemm(&cuda_position_gemm_fn), true);

}  // namespace

at::Tensor patch_embed_cuda(const at::Tensor& pixels, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed,
                       const std::optional<at::Tensor>& cls_token,
                       std::optional<at::ArrayRef<double>> mean,
                       std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
                       std::string_view pos_interp) {
  const c10::cuda::CUDAGuard guard(pixels.device());
  return patch_embed_forward(pixels, weight, bias, pos_embed, cls_token, {mean, std, rescale},
                             channels_last, pos_interp);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cuda(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls,
    std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
    std::string_view pos_interp, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(pixels.device());
  return patch_embed_backward(grad, pixels, weight, has_bias, pos_embed, has_cls,
                              {mean, std, rescale}, channels_last, pos_interp, output_mask);
}

std::tuple<at::Tensor, at::Tensor> patch_embed_packed_cuda(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale) {
  const c10::cuda::CUDAGuard guard(patches.device());
  return patch_embed_packed_forward(patches, weight, bias, grid_thw, pos_embed,
                                    spatial_merge_size, {mean, std, rescale},
                                    /*check_grid=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward_cuda(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(patches.device());
  return patch_embed_packed_backward(grad, patches, weight, has_bias, grid_thw, pos_embed,
                                     spatial_merge_size, {mean, std, rescale}, output_mask);
}

std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_cuda(
    at::TensorList pixels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    double rescale, bool channels_last, std::string_view pos_interp) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return patch_embed_varlen_forward(pixels, weight, bias, pos_embed, cls_token,
                                    {mean, std, rescale}, channels_last, pos_interp);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward_cuda(const at::Tensor& grad, at::TensorList pixels,
                               const at::Tensor& weight, bool has_bias,
                               const std::optional<at::Tensor>& pos_embed, bool has_cls,
                               std::optional<at::ArrayRef<double>> mean,
                               std::optional<at::ArrayRef<double>> std, double rescale,
                               bool channels_last, std::string_view pos_interp,
                               std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return patch_embed_varlen_backward(grad, pixels, weight, has_bias, pos_embed, has_cls,
                                     {mean, std, rescale}, channels_last, pos_interp,
                                     output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("patch_embed", &patch_embed_cuda);
  m.impl("patch_embed_backward", &patch_embed_backward_cuda);
  m.impl("patch_embed_packed", &patch_embed_packed_cuda);
  m.impl("patch_embed_packed_backward", &patch_embed_packed_backward_cuda);
  m.impl("patch_embed_varlen", &patch_embed_varlen_cuda);
  m.impl("patch_embed_varlen_backward", &patch_embed_varlen_backward_cuda);
}

}  // namespace vlmkern
