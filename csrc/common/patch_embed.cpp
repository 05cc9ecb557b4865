// Image-mode patch embedding (CLIP, SigLIP, InternViT, BLIP-2, Mllama): checks, then one GEMM per
// image whose epilogue addend is bias + (resized) positions, CLS row written at offset 0; and the
// backward (dW, db, d positions through the bicubic resize, d CLS, d pixels). Shared helpers too.
#include "common/patch_embed.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/upsample_bicubic2d.h>
#include <ATen/ops/upsample_bicubic2d_backward.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <string>

#include "common/patch_embed_detail.h"

namespace vlmkern {
namespace patch_embed_detail {

std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

void check_dtype_device(const char* op, const at::Tensor& pixels, const char* pixels_name,
                        const at::Tensor& weight) {
  const auto wt = weight.scalar_type();
  VLMKERN_CHECK(wt == at::kFloat || wt == at::kDouble || wt == at::kHalf || wt == at::kBFloat16,
                op, "weight must be float32, float64, float16 or bfloat16, got ",
                dtype_name(wt));
  VLMKERN_CHECK(pixels.scalar_type() == at::kByte || pixels.scalar_type() == wt, op,
                pixels_name, " must be uint8 or weight's dtype ", dtype_name(wt), ", got ",
                dtype_name(pixels.scalar_type()));
  VLMKERN_CHECK(weight.device() == pixels.device(), op, "weight is on ", weight.device(),
                " but ", pixels_name, " is on ", pixels.device());
}

void check_param(const char* op, const std::optional<at::Tensor>& t, const char* name,
                 int64_t rank, const char* layout, const at::Tensor& weight) {
  if (!t) return;
  check_rank(*t, rank, op, name, layout);
  VLMKERN_CHECK(t->device() == weight.device(), op, name, " is on ", t->device(),
                " but weight is on ", weight.device());
  VLMKERN_CHECK(t->scalar_type() == weight.scalar_type(), op, name, " dtype ",
                dtype_name(t->scalar_type()), " does not match weight dtype ",
                dtype_name(weight.scalar_type()));
  VLMKERN_CHECK(t->size(rank - 1) == weight.size(0), op, name, " has width ", t->size(rank - 1),
                " but weight has D=", weight.size(0), " outputs");
}

void check_norm(const char* op, const PixelNorm& norm, int64_t channels) {
  if (norm.mean) {
    VLMKERN_CHECK(static_cast<int64_t>(norm.mean->size()) == channels, op, "mean has ",
                  norm.mean->size(), " values but there are C=", channels, " channels");
    for (size_t c = 0; c < norm.mean->size(); ++c) {
      VLMKERN_CHECK(std::isfinite((*norm.mean)[c]), op, "mean must be finite, got ",
                    (*norm.mean)[c], " at channel ", c);
    }
  }
  if (norm.std) {
    VLMKERN_CHECK(static_cast<int64_t>(norm.std->size()) == channels, op, "std has ",
                  norm.std->size(), " values but there are C=", channels, " channels");
    for (size_t c = 0; c < norm.std->size(); ++c) {
      VLMKERN_CHECK((*norm.std)[c] != 0.0 && std::isfinite((*norm.std)[c]), op,
                    "std must be finite and nonzero, got ", (*norm.std)[c], " at channel ", c);
    }
  }
  VLMKERN_CHECK(std::isfinite(norm.rescale) && norm.rescale != 0.0, op,
                "rescale must be finite and nonzero, got ", norm.rescale);
}

std::pair<at::Tensor, at::Tensor> fold_weight(const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const PixelNorm& norm) {
  const int64_t d = weight.size(0), c = weight.size(1);
  int64_t k = 1;
  for (int64_t i = 1; i < weight.dim(); ++i) k *= weight.size(i);
  if (!norm.active()) return {weight.reshape({d, k}), bias ? *bias : at::Tensor()};
  // One pass over the weight for the scaled copy (each channel's slice times its scale as a
  // scalar, computed in the dtype's opmath, fp32 for fp16 / bf16, rounded once to the dtype;
  // scalars keep host data off the device: CUDA-graph safe) and one for the per-channel sums of
  // the bias correction. On the 2-core CPU at CLIP-L's 1024 x 588 weight this costs ~0.1-0.2 ms a
  // call; fp64 copies of the weight cost ~1 ms, and a broadcast multiply of bf16 by an fp32
  // tensor of scales ~2 ms (mixed-dtype copies).
  const at::Tensor w = weight.reshape({d, c, k / c});
  const auto st = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Contiguous whatever the weight's strides (a channels_last Conv weight included), so the
  // (D, K) view below is the (C, kh, kw) order of a row.
  at::Tensor folded = at::empty_like(w, at::MemoryFormat::Contiguous);
  for (int64_t ch = 0; ch < c; ++ch) {
    at::Tensor slice = folded.select(1, ch);
    at::mul_out(slice, w.select(1, ch), norm.scale(ch));
  }
  at::Tensor b_out;
  if (bias || norm.mean) {
    // A copy even for an fp64 bias (to() would return the caller's tensor, updated in place).
    at::Tensor b64 = bias ? bias->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true)
                          : at::zeros({d}, w.options().dtype(at::kDouble));
    if (norm.mean) {
      const at::Tensor sums = at::sum(w, {2}, /*keepdim=*/false, st).to(at::kDouble);  // (D, C)
      for (int64_t ch = 0; ch < c; ++ch) b64.sub_(sums.select(1, ch), norm.offset(ch));
    }
    b_out = b64.to(weight.scalar_type());
  }
  return {folded.view({d, k}), b_out};
}

at::Tensor normalize_rows(const at::Tensor& x, const PixelNorm& norm, int64_t channel_dim) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xf = at::empty(x.sizes(), x.options().dtype(ct));
  for (int64_t ch = 0; ch < x.size(channel_dim); ++ch) {
    xf.select(channel_dim, ch)
        .copy_(x.select(channel_dim, ch))
        .mul_(norm.scale(ch))
        .sub_(norm.offset(ch));
  }
  return xf.to(x.scalar_type());
}

at::Tensor no_grad_output(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace patch_embed_detail

namespace {

using namespace patch_embed_detail;
constexpr const char* kOp = "patch_embed";

struct ImageGeom {
  int64_t b, c, p, gh, gw, l, d, s;
  bool cls, resize, channels_last;
};

ImageGeom check_image(const at::Tensor& pixels, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& pos_embed, bool has_cls,
                      const PixelNorm& norm, bool channels_last, std::string_view pos_interp) {
  check_rank(pixels, 4, kOp, "pixels", channels_last ? "(B, H, W, C)" : "(B, C, H, W)");
  check_rank(weight, 4, kOp, "weight", "(D, C, P, P)");
  check_dtype_device(kOp, pixels, "pixels", weight);
  VLMKERN_CHECK(pos_interp == "bicubic" || pos_interp == "none", kOp,
                "pos_interp must be 'bicubic' or 'none', got '", pos_interp, "'");
  ImageGeom g{};
  g.channels_last = channels_last;
  g.b = pixels.size(0);
  g.c = pixels.size(channels_last ? 3 : 1);
  const int64_t h = pixels.size(channels_last ? 1 : 2), w = pixels.size(channels_last ? 2 : 3);
  g.p = weight.size(2);
  g.d = weight.size(0);
  VLMKERN_CHECK(g.p >= 1 && weight.size(3) == g.p, kOp,
                "weight must have a square patch (D, C, P, P) with P >= 1, got shape ",
                weight.sizes());
  VLMKERN_CHECK(weight.size(1) == g.c && g.c >= 1, kOp, "pixels has C=", g.c,
                " channels but weight expects C=", weight.size(1));
  VLMKERN_CHECK(h % g.p == 0, kOp, "pixels height H=", h, " is not divisible by the patch size P=",
                g.p);
  VLMKERN_CHECK(w % g.p == 0, kOp, "pixels width W=", w, " is not divisible by the patch size P=",
                g.p);
  g.gh = h / g.p;
  g.gw = w / g.p;
  g.l = g.gh * g.gw;
  g.cls = has_cls;
  check_param(kOp, bias, "bias", 1, "(D,)", weight);
  check_param(kOp, pos_embed, "pos_embed", 2, "(L, D)", weight);
  check_norm(kOp, norm, g.c);
  if (pos_embed) {
    const int64_t rows = pos_embed->size(0) - (has_cls ? 1 : 0);
    const char* plus = has_cls ? " + 1 (CLS)" : "";
    if (pos_interp == "none") {
      VLMKERN_CHECK(rows == g.l, kOp, "pos_embed has ", pos_embed->size(0), " rows but the (",
                    g.gh, ", ", g.gw, ") grid needs ", g.l, plus, " (pos_interp='none')");
      g.s = 0;
    } else {
      // Checked before the square root: with a CLS token, 0 rows leave rows = -1 (sqrt = NaN).
      VLMKERN_CHECK(rows >= 1, kOp, "pos_embed has ", pos_embed->size(0),
                    " rows: it needs at least 1 patch position", plus);
      int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(rows))));
      while (s * s > rows) --s;
      while ((s + 1) * (s + 1) <= rows) ++s;
      VLMKERN_CHECK(s * s == rows, kOp, "pos_embed has ", pos_embed->size(0),
                    " rows: not a square S*S table", plus);
      g.s = s;
      g.resize = s != g.gh || s != g.gw;
    }
  }
  return g;
}

// Width of the GEMM rows for K = C*P*P patch features. On CUDA, K rounded up to a multiple of 8
// and zero-padded, so every operand row starts 16-byte aligned, which cuBLAS's fast (TMA / wgmma,
// cp.async) kernels need; P = 14 gives K = 588 -> 592. The zeros add nothing. The CPU keeps K
// (no such alignment cliff there; padding only adds copies). The padded path passed the whole CPU
// patch_embed suite with padding forced on when it was written.
int64_t gemm_width(const at::Tensor& like, int64_t k) {
  return like.is_cuda() ? (k + 7) / 8 * 8 : k;
}

PatchMatrixFn cuda_patch_matrix = nullptr;  // set by the CUDA build (set_cuda_patch_matrix)
AddendGemmFn cuda_addend_gemm = nullptr;    // set by the CUDA build (set_cuda_addend_gemm)
PositionRowsFn cuda_position_rows = nullptr;  // set by the CUDA build (set_cuda_position_rows)
PositionGemmFn cuda_position_gemm = nullptr;  // set by the CUDA build (set_cuda_position_gemm)
ImplicitPatchGemmFn cuda_implicit_gemm = nullptr;  // set_cuda_implicit_patch_gemm
ImplicitPatchWgradFn cuda_implicit_wgrad = nullptr;  // set_cuda_implicit_patch_wgrad

// pixels -> (B*gh*gw, kp) rows in `dtype`: K features in (C, ph, pw) order, or (ph, pw, C)
// channels-last, then kp - K zero columns. One kernel on CUDA, else ATen's strided copy.
at::Tensor patch_matrix(const at::Tensor& pixels, const ImageGeom& g, at::ScalarType dtype,
                        int64_t kp) {
  const int64_t k = g.c * g.p * g.p;
  at::Tensor out = at::empty({g.b * g.l, kp}, pixels.options().dtype(dtype));  // (M, kp)
  if (pixels.is_cuda() && cuda_patch_matrix != nullptr &&
      cuda_patch_matrix(pixels, g.channels_last, g.p, g.gh, g.gw, out)) {
    return out;
  }
  // uint8 on the CPU: converted in one contiguous pass first; a strided copy that also casts
  // each element ran ~2x slower than the float path's at CLIP-L's 336² image.
  const at::Tensor px = pixels.scalar_type() == dtype || pixels.is_cuda() ? pixels
                                                                          : pixels.to(dtype);
  at::Tensor view;
  if (g.channels_last) {  // (B, gh, P, gw, P, C) -> (B, gh, gw, P, P, C)
    view = px.unflatten(1, {g.gh, g.p}).unflatten(3, {g.gw, g.p}).permute({0, 1, 3, 2, 4, 5});
  } else {  // (B, C, gh, P, gw, P) -> (B, gh, gw, C, P, P)
    view = px.unflatten(2, {g.gh, g.p}).unflatten(4, {g.gw, g.p}).permute({0, 2, 4, 1, 3, 5});
  }
  if (kp > k) out.narrow(1, k, kp - k).zero_();
  out.narrow(1, 0, k).view(view.sizes()).copy_(view);
  return out;
}

// Folded weight as (D, kp) in the patch-row order of `g`, zero-padded past K like the rows.
std::pair<at::Tensor, at::Tensor> folded_weight(const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const PixelNorm& norm, const ImageGeom& g,
                                                int64_t kp) {
  auto [w2, b2] = fold_weight(weight, bias, norm);
  const int64_t k = g.c * g.p * g.p;
  if (g.channels_last) {
    w2 = w2.view({g.d, g.c, g.p, g.p}).permute({0, 2, 3, 1}).reshape({g.d, k});
  } else {
    w2 = w2.reshape({g.d, k});
  }
  if (kp > k) w2 = at::constant_pad_nd(w2, {0, kp - k});
  return {w2, b2};
}

// The (gh*gw, D) patch positions: the table as is, or bicubic-resized exactly as HF's
// interpolate_pos_encoding does (same op on the same (1, D, S, S) channels-last view).
at::Tensor grid_positions(const at::Tensor& table, const ImageGeom& g) {
  if (!g.resize) return table;
  const at::Tensor img = table.view({1, g.s, g.s, g.d}).permute({0, 3, 1, 2});
  const at::Tensor up = at::upsample_bicubic2d(img, {g.gh, g.gw}, /*align_corners=*/false);
  return up.permute({0, 2, 3, 1}).reshape({g.l, g.d});
}

}  // namespace

void set_cuda_patch_matrix(PatchMatrixFn fn) { cuda_patch_matrix = fn; }

void set_cuda_addend_gemm(AddendGemmFn fn) { cuda_addend_gemm = fn; }

void set_cuda_position_rows(PositionRowsFn fn) { cuda_position_rows = fn; }

void set_cuda_position_gemm(PositionGemmFn fn) { cuda_position_gemm = fn; }

void set_cuda_implicit_patch_gemm(ImplicitPatchGemmFn fn) { cuda_implicit_gemm = fn; }

void set_cuda_implicit_patch_wgrad(ImplicitPatchWgradFn fn) { cuda_implicit_wgrad = fn; }

namespace patch_embed_detail {

PositionRowsFn cuda_position_rows_hook() { return cuda_position_rows; }

PositionGemmFn cuda_position_gemm_hook() { return cuda_position_gemm; }

void addend_gemm(const at::Tensor& blocks, const at::Tensor& rows, const at::Tensor& w,
                 const at::Tensor& addend) {
  if (blocks.is_cuda() && cuda_addend_gemm != nullptr && cuda_addend_gemm(blocks, rows, w, addend)) {
    return;
  }
  const int64_t b = rows.size(0);
  const at::Tensor wt = w.t();  // (K, D)
  if (blocks.is_cpu() && (rows.scalar_type() == at::kBFloat16 || rows.scalar_type() == at::kHalf)) {
    // CPU, 16-bit: one 2-D addmm per image (oneDNN's GEMM; the batched baddbmm with a broadcast
    // weight measured ~1.2x slower on CLIP-L / SigLIP shapes, on par in fp32).
    for (int64_t i = 0; i < b; ++i) {
      at::Tensor block = blocks.select(0, i);  // (L, D) view: addmm_out writes through it
      at::addmm_out(block, addend, rows.select(0, i), wt);
    }
    return;
  }
  at::Tensor out = blocks;      // a view: baddbmm_out writes through it
  at::baddbmm_out(out, addend.expand({b, addend.size(0), addend.size(1)}), rows,
                  wt.unsqueeze(0).expand({b, wt.size(0), wt.size(1)}));  // w at batch stride 0
}

int64_t image_tokens(const at::Tensor& pixels, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& pos_embed,
                     const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                     bool channels_last, std::string_view pos_interp) {
  const ImageGeom g = check_image(pixels, weight, bias, pos_embed, cls_token.has_value(), norm,
                                  channels_last, pos_interp);
  check_param(kOp, cls_token, "cls_token", 1, "(D,)", weight);
  return (g.cls ? 1 : 0) + g.l;
}

void patch_embed_forward_into(const at::Tensor& out, const at::Tensor& pixels,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& pos_embed,
                              const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                              bool channels_last, std::string_view pos_interp) {
  const ImageGeom g = check_image(pixels, weight, bias, pos_embed, cls_token.has_value(), norm,
                                  channels_last, pos_interp);
  const int64_t first = g.cls ? 1 : 0;
  if (out.numel() == 0) return;
  if (g.cls) {  // CLS row: cls_token + pos_embed[0], as HF's cat-then-add
    at::Tensor row = pos_embed ? cls_token->add(pos_embed->select(0, 0)) : *cls_token;
    out.select(1, 0).copy_(row);
  }
  if (g.l == 0) return;
  const int64_t kp = gemm_width(weight, g.c * g.p * g.p);
  const auto [w2, b2] = folded_weight(weight, bias, norm, g, kp);
  at::Tensor addend = b2;  // (D,) or (L, D): bias and positions, added by the GEMM itself
  if (pos_embed) {
    const at::Tensor pos =
        grid_positions(pos_embed->narrow(0, first, pos_embed->size(0) - first), g);
    addend = b2.defined() ? pos.add(b2) : pos;
  }
  at::Tensor blocks = out.narrow(1, first, g.l);  // (B, L, D) view: the token rows
  if (pixels.is_cuda() && cuda_implicit_gemm != nullptr &&
      cuda_implicit_gemm(pixels, g.channels_last, g.p, g.gh, g.gw, w2, addend, blocks)) {
    return;
  }
  const at::Tensor x = patch_matrix(pixels, g, weight.scalar_type(), kp);  // (B*L, kp)
  const at::Tensor wt = w2.t();
  if (!g.cls && !pos_embed) {  // one GEMM over the whole batch
    at::Tensor flat = out.view({g.b * g.l, g.d});
    addend.defined() ? at::addmm_out(flat, addend, x, wt) : at::mm_out(flat, x, wt);
    return;
  }
  // One batched GEMM writes every image's (L, D) token block in place (batch stride (first + L)
  // * D skips the CLS rows); the per-token addend is broadcast over the batch, not copied.
  const at::Tensor xb = x.view({g.b, g.l, x.size(1)});  // (B, L, K)
  if (addend.defined()) {
    addend_gemm(blocks, xb, w2, addend.dim() == 1 ? addend.expand({g.l, g.d}) : addend);
  } else {
    at::bmm_out(blocks, xb, wt.unsqueeze(0).expand({g.b, wt.size(0), g.d}));  // w: stride 0
  }
}

}  // namespace patch_embed_detail

at::Tensor patch_embed_forward(const at::Tensor& pixels, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& cls_token, const PixelNorm& norm,
                               bool channels_last, std::string_view pos_interp) {
  const int64_t tokens = image_tokens(pixels, weight, bias, pos_embed, cls_token, norm,
                                      channels_last, pos_interp);
  at::Tensor out = at::empty({pixels.size(0), tokens, weight.size(0)}, weight.options());
  patch_embed_forward_into(out, pixels, weight, bias, pos_embed, cls_token, norm, channels_last,
                           pos_interp);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls, const PixelNorm& norm,
    bool channels_last, std::string_view pos_interp, std::array<bool, 5> output_mask) {
  const ImageGeom g =
      check_image(pixels, weight, std::nullopt, pos_embed, has_cls, norm, channels_last,
                  pos_interp);
  const int64_t first = g.cls ? 1 : 0;
  check_rank(grad, 3, kOp, "grad", "(B, T, D)");
  VLMKERN_CHECK(grad.size(0) == g.b && grad.size(1) == first + g.l && grad.size(2) == g.d, kOp,
                "grad must have shape [", g.b, ", ", first + g.l, ", ", g.d, "], got ",
                grad.sizes());
  VLMKERN_CHECK(grad.scalar_type() == weight.scalar_type() && grad.device() == weight.device(),
                kOp, "grad must be ", dtype_name(weight.scalar_type()), " on ", weight.device());
  VLMKERN_CHECK(!output_mask[0] || pixels.scalar_type() != at::kByte, kOp,
                "pixels is uint8: it has no gradient");
  const at::Tensor tokens = grad.narrow(1, first, g.l);
  const at::Tensor rows = tokens.reshape({g.b * g.l, g.d});  // (M, D)
  at::Tensor d_pixels = no_grad_output(pixels), d_weight = no_grad_output(weight);
  at::Tensor d_bias = no_grad_output(weight), d_pos = no_grad_output(weight);
  at::Tensor d_cls = no_grad_output(weight);
  const int64_t k = g.c * g.p * g.p, kp = gemm_width(weight, k);
  if (output_mask[0]) {  // dX = G @ W' (the scale folds in, the offset does not), back to pixels
    const at::Tensor dx =  // (M, K) view of (M, kp)
        at::mm(rows, folded_weight(weight, std::nullopt, norm, g, kp).first).narrow(1, 0, k);
    d_pixels = at::empty(pixels.sizes(), pixels.options());
    if (channels_last) {
      d_pixels.view({g.b, g.gh, g.p, g.gw, g.p, g.c})
          .copy_(dx.view({g.b, g.gh, g.gw, g.p, g.p, g.c}).permute({0, 1, 3, 2, 4, 5}));
    } else {
      d_pixels.view({g.b, g.c, g.gh, g.p, g.gw, g.p})
          .copy_(dx.view({g.b, g.gh, g.gw, g.c, g.p, g.p}).permute({0, 3, 1, 4, 2, 5}));
    }
  }
  if (output_mask[1]) {  // dW = G^T @ normalize(X), in the weight's (D, C, P, P) layout
    at::Tensor dw_full;  // (D, kp)
    if (pixels.is_cuda() && cuda_implicit_wgrad != nullptr) {
      dw_full = cuda_implicit_wgrad(pixels, channels_last, g.p, g.gh, g.gw, tokens, kp, norm);
    }
    if (!dw_full.defined()) {
      at::Tensor x = patch_matrix(pixels, g, weight.scalar_type(), kp);  // (M, kp)
      if (norm.active()) {
        const at::Tensor xk = x.narrow(1, 0, k);
        x = channels_last ? normalize_rows(xk.view({g.b * g.l, g.p * g.p, g.c}), norm, 2)
                          : normalize_rows(xk.view({g.b * g.l, g.c, g.p * g.p}), norm, 1);
        x = x.view({g.b * g.l, k});
        if (kp > k) x = at::constant_pad_nd(x, {0, kp - k});
      }
      dw_full = at::mm(rows.t(), x);
    }
    const at::Tensor dw = dw_full.narrow(1, 0, k);  // (D, K) view of (D, kp)
    d_weight = channels_last
                   ? dw.view({g.d, g.p, g.p, g.c}).permute({0, 3, 1, 2}).contiguous()
                   : dw.view({g.d, g.c, g.p, g.p}).contiguous();  // a copy only when padded
  }
  if (output_mask[2] && has_bias) d_bias = rows.sum(0);
  const bool need_cls_sum = (output_mask[3] && pos_embed && g.cls) || (output_mask[4] && g.cls);
  const at::Tensor cls_sum = need_cls_sum ? grad.select(1, 0).sum(0) : at::Tensor();
  if (output_mask[3] && pos_embed) {
    at::Tensor dp = tokens.sum(0);  // (L, D)
    if (g.resize && g.l == 0) {
      dp = at::zeros({g.s * g.s, g.d}, weight.options());
    } else if (g.resize) {
      const at::Tensor up = dp.view({1, g.gh, g.gw, g.d}).permute({0, 3, 1, 2});
      dp = at::upsample_bicubic2d_backward(up, {g.gh, g.gw}, {1, g.d, g.s, g.s}, false)
               .permute({0, 2, 3, 1})
               .reshape({g.s * g.s, g.d});
    }
    d_pos = g.cls ? at::cat({cls_sum.unsqueeze(0), dp}) : dp.contiguous();
  }
  if (output_mask[4] && g.cls) d_cls = cls_sum;
  return {d_pixels, d_weight, d_bias, d_pos, d_cls};
}

}  // namespace vlmkern
