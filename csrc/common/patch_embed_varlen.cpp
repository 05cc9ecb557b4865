// Variable-resolution image batches (image mode): a list of images of different sizes in one call,
// packed tokens (each image's [CLS +] patches, positions resized to its own grid) + cu_seqlens,
// filled on the device (no host sync); and the backward (parameter gradients summed over images).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "common/patch_embed.h"
#include "common/patch_embed_detail.h"

namespace vlmkern {
namespace {

using namespace patch_embed_detail;
constexpr const char* kOp = "patch_embed";

// Checks every image (3-D (C, H, W) / (H, W, C)); returns each image's token count.
std::vector<int64_t> varlen_tokens(at::TensorList images, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& pos_embed,
                                   const std::optional<at::Tensor>& cls_token,
                                   const PixelNorm& norm, bool channels_last,
                                   std::string_view pos_interp) {
  std::vector<int64_t> tokens;
  tokens.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    VLMKERN_CHECK(images[i].dim() == 3, kOp, "pixels[", i, "] must be a 3-D tensor ",
                  channels_last ? "(H, W, C)" : "(C, H, W)", ", got ", images[i].dim(),
                  "-D of shape ", images[i].sizes());
    VLMKERN_CHECK(images[i].scalar_type() == images[0].scalar_type(), kOp, "pixels[", i,
                  "] dtype ", dtype_name(images[i].scalar_type()), " differs from pixels[0]'s ",
                  dtype_name(images[0].scalar_type()));
    tokens.push_back(image_tokens(images[i].unsqueeze(0), weight, bias, pos_embed, cls_token,
                                  norm, channels_last, pos_interp));
  }
  return tokens;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_forward(
    at::TensorList images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    const PixelNorm& norm, bool channels_last, std::string_view pos_interp) {
  const auto tokens = varlen_tokens(images, weight, bias, pos_embed, cls_token, norm,
                                    channels_last, pos_interp);
  int64_t total = 0;
  for (const int64_t t : tokens) total += t;
  at::Tensor out = at::empty({total, weight.size(0)}, weight.options());
  at::Tensor cu = at::empty({static_cast<int64_t>(images.size()) + 1},
                            weight.options().dtype(at::kInt));
  int64_t offset = 0;
  cu.narrow(0, 0, 1).fill_(0);
  for (size_t i = 0; i < images.size(); ++i) {
    patch_embed_forward_into(out.narrow(0, offset, tokens[i]).unsqueeze(0),
                             images[i].unsqueeze(0), weight, bias, pos_embed, cls_token, norm,
                             channels_last, pos_interp);
    offset += tokens[i];
    cu.narrow(0, static_cast<int64_t>(i) + 1, 1).fill_(offset);  // a fill, not a host copy
  }
  return {out, cu};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward(const at::Tensor& grad, at::TensorList images,
                            const at::Tensor& weight, bool has_bias,
                            const std::optional<at::Tensor>& pos_embed, bool has_cls,
                            const PixelNorm& norm, bool channels_last,
                            std::string_view pos_interp, std::array<bool, 5> output_mask) {
  const std::optional<at::Tensor> cls =
      has_cls ? std::optional<at::Tensor>(at::empty({weight.size(0)}, weight.options()))
              : std::nullopt;
  const auto tokens =
      varlen_tokens(images, weight, std::nullopt, pos_embed, cls, norm, channels_last, pos_interp);
  int64_t total = 0;
  for (const int64_t t : tokens) total += t;
  check_rank(grad, 2, kOp, "grad", "(T, D)");
  VLMKERN_CHECK(grad.size(0) == total && grad.size(1) == weight.size(0), kOp,
                "grad must have shape [", total, ", ", weight.size(0), "], got ", grad.sizes());
  std::vector<at::Tensor> d_images;
  at::Tensor sums[4];  // weight, bias, pos_embed, cls_token
  int64_t offset = 0;
  for (size_t i = 0; i < images.size(); ++i) {
    auto parts = patch_embed_backward(grad.narrow(0, offset, tokens[i]).unsqueeze(0),
                                      images[i].unsqueeze(0), weight, has_bias, pos_embed,
                                      has_cls, norm, channels_last, pos_interp, output_mask);
    offset += tokens[i];
    if (output_mask[0]) d_images.push_back(std::get<0>(parts).squeeze(0));
    const at::Tensor got[4] = {std::get<1>(parts), std::get<2>(parts), std::get<3>(parts),
                               std::get<4>(parts)};
    for (int k = 0; k < 4; ++k) sums[k] = i == 0 ? got[k] : sums[k].add(got[k]);
  }
  for (int k = 0; k < 4; ++k) {
    const bool wanted = output_mask[k + 1] && (k != 1 || has_bias) &&
                        (k != 2 || pos_embed.has_value()) && (k != 3 || has_cls);
    if (!wanted) {
      sums[k] = no_grad_output(weight);
    } else if (images.empty()) {
      const std::vector<int64_t> shape = k == 0   ? weight.sizes().vec()
                                         : k == 2 ? pos_embed->sizes().vec()
                                                  : std::vector<int64_t>{weight.size(0)};
      sums[k] = at::zeros(shape, weight.options());
    }
  }
  return {d_images, sums[0], sums[1], sums[2], sums[3]};
}

}  // namespace vlmkern
