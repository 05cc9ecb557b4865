// RoPE argument checks and parameter packing, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace vlmkern
