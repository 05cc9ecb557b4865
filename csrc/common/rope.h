// RoPE argument checks and parameter packing, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "common/rope_params.h"

namespace vlmkern {

// Checks q (B, S, Hq, D), k (B, S, Hk, D), positions (A, B, S) and the frequency table, and packs
// everything but the output pointers/strides. `op` names the op in error messages.
RopeParams make_rope_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& positions, at::ArrayRef<double> inv_freq,
                            at::IntArrayRef freq_axis, double scale, bool inverse);

// HF calling convention: cos, sin (B or 1, S, R) given; rotation over the first R dims of q and k.
RopeParams make_rope_cos_sin_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& cos, const at::Tensor& sin, bool inverse);

// rope_ writes q and k where they are: neither may alias itself (e.g. expanded) or the other.
void check_rope_inplace_targets(const at::Tensor& q, const at::Tensor& k);

// Points the params at the outputs (which may be q and k themselves).
void set_rope_outputs(RopeParams& p, const at::Tensor& q_out, const at::Tensor& k_out);

// The device-independent bodies of the rope ops; Device::run(params, q) launches the kernel.
template <typename Device>
struct RopeImpl {
  static std::tuple<at::Tensor, at::Tensor> into_new(RopeParams p, const at::Tensor& q,
                                                     const at::Tensor& k) {
    at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);  // dense layouts kept
    set_rope_outputs(p, q_out, k_out);
    Device::run(p, q);
    return {q_out, k_out};
  }
  static std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& positions,
                                                 at::ArrayRef<double> inv_freq,
                                                 at::IntArrayRef freq_axis, double scale,
                                                 bool inverse) {
    const char* op = inverse ? "rope_backward" : "rope";
    return into_new(make_rope_params(op, q, k, positions, inv_freq, freq_axis, scale, inverse),
                    q, k);
  }
  static std::tuple<at::Tensor, at::Tensor> cos_sin(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    bool inverse) {
    const char* op = inverse ? "rope_cos_sin_backward" : "rope_cos_sin";
    return into_new(make_rope_cos_sin_params(op, q, k, cos, sin, inverse), q, k);
  }
  static void in_place(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                       at::ArrayRef<double> inv_freq, at::IntArrayRef freq_axis, double scale) {
    RopeParams p = make_rope_params("rope_", q, k, positions, inv_freq, freq_axis, scale, false);
    check_rope_inplace_targets(q, k);
    set_rope_outputs(p, q, k);
    Device::run(p, q);
  }
};

}  // namespace vlmkern
