// Torch-free description of one table-driven RoPE launch, shared by the CPU and CUDA kernels.
// Every RoPE flavour (1D, Qwen vision 2D, M-RoPE sectioned / interleaved) is the same rotation:
// frequency f in [0, rotary_dim/2) takes its position from axis freq_axis[f] and has inverse
// frequency inv_freq[f]; angle = float(pos) * inv_freq[f] in fp32 (as HF computes it); the pair
// (f, f + rotary_dim/2) of every head is rotated by it (rotate_half convention).
#pragma once

#include <cstdint>

namespace vlmkern {

constexpr int kMaxRopeFreqs = 256;  // rotary_dim <= 512

enum class RopeDtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct RopeParams {
  // q, k as (B, S, H, D) views; strides in elements. Outputs may alias inputs (in-place).
  const void* q_in = nullptr;
  const void* k_in = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  int64_t q_in_stride[4] = {}, k_in_stride[4] = {};
  int64_t q_out_stride[4] = {}, k_out_stride[4] = {};
  int64_t batch = 0, seq = 0;
  int heads_q = 0, heads_k = 0, head_dim = 0, rotary_dim = 0;
  // positions (A, B, S), int32 or int64, strides in elements.
  const void* positions = nullptr;
  bool positions_int64 = true;
  int64_t pos_stride[3] = {};
  RopeDtype dtype = RopeDtype::kFloat32;
  float scale = 1.0f;     // multiplies cos and sin (HF attention_scaling)
  bool inverse = false;   // rotate by -angle (the backward)
  bool copy_rest = true;  // write dims [rotary_dim, head_dim) (false when in place)
  float inv_freq[kMaxRopeFreqs] = {};
  int8_t freq_axis[kMaxRopeFreqs] = {};
};

}  // namespace vlmkern
