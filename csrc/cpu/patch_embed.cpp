// CPU registration of patch_embed / _packed / _varlen (+ backwards): the device-independent
// ATen composite of common/patch_embed*.cpp (at::mm through MKL/oneDNN, ATen bicubic resize).
#include <torch/library.h>

#include "common/patch_embed.h"
#include "ops.h"

namespace vlmkern {

at::Tensor patch_embed_cpu(const at::Tensor& pixels, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed,
                       const std::optional<at::Tensor>& cls_token,
                       std::optional<at::ArrayRef<double>> mean,
                       std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
                       std::string_view pos_interp) {
  return patch_embed_forward(pixels, weight, bias, pos_embed, cls_token, {mean, std, rescale},
                             channels_last, pos_interp);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward_cpu(
    const at::Tensor& grad, const at::Tensor& pixels, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pos_embed, bool has_cls,
    std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, bool channels_last,
    std::string_view pos_interp, std::array<bool, 5> output_mask) {
  return patch_embed_backward(grad, pixels, weight, has_bias, pos_embed, has_cls,
                              {mean, std, rescale}, channels_last, pos_interp, output_mask);
}

std::tuple<at::Tensor, at::Tensor> patch_embed_packed_cpu(
    const at::Tensor& patches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale) {
  return patch_embed_packed_forward(patches, weight, bias, grid_thw, pos_embed,
                                    spatial_merge_size, {mean, std, rescale},
                                    /*check_grid=*/patches.device().is_cpu());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_packed_backward_cpu(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight, bool has_bias,
    const at::Tensor& grid_thw, const std::optional<at::Tensor>& pos_embed,
    int64_t spatial_merge_size, std::optional<at::ArrayRef<double>> mean,
    std::optional<at::ArrayRef<double>> std, double rescale, std::array<bool, 4> output_mask) {
  return patch_embed_packed_backward(grad, patches, weight, has_bias, grid_thw, pos_embed,
                                     spatial_merge_size, {mean, std, rescale}, output_mask);
}

std::tuple<at::Tensor, at::Tensor> patch_embed_varlen_cpu(
    at::TensorList pixels, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
    std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> std,
    double rescale, bool channels_last, std::string_view pos_interp) {
  return patch_embed_varlen_forward(pixels, weight, bias, pos_embed, cls_token,
                                    {mean, std, rescale}, channels_last, pos_interp);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
patch_embed_varlen_backward_cpu(const at::Tensor& grad, at::TensorList pixels,
                               const at::Tensor& weight, bool has_bias,
                               const std::optional<at::Tensor>& pos_embed, bool has_cls,
                               std::optional<at::ArrayRef<double>> mean,
                               std::optional<at::ArrayRef<double>> std, double rescale,
                               bool channels_last, std::string_view pos_interp,
                               std::array<bool, 5> output_mask) {
  return patch_embed_varlen_backward(grad, pixels, weight, has_bias, pos_embed, has_cls,
                                     {mean, std, rescale}, channels_last, pos_interp,
                                     output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
  m.impl("patch_embed_packed", &patch_embed_packed_cpu);
  m.impl("patch_embed_packed_backward", &patch_embed_packed_backward_cpu);
  m.impl("patch_embed_varlen", &patch_embed_varlen_cpu);
  m.impl("patch_embed_varlen_backward", &patch_embed_varlen_backward_cpu);
}

}  // namespace vlmkern
