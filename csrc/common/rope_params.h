// Torch-free description of one table-driven RoPE launch, shared by the CPU and CUDA kernels.
// Every RoPE flavour (1D, Qwen vision 2D, M-RoPE sectioned / interleaved) is the same rotation:
// frequency f in [0, rotary_dim/2) takes its position from axis freq_axis[f] and has inverse
// frequency inv_freq[f]; angle = float(pos) * inv_freq[f] in fp32 (as HF computes it); the pair
// (f, f + rotary_dim/2) of every head is rotated by it (rotate_half convention).
// Alternatively (cos_sin_input) cos/sin come from tensors (B, S, R) as in HF's
// apply_rotary_pos_emb: out[i] = x[i]*cos[i] + rotate_half(x)[i]*sin[i] over the first R dims.
#pragma once

#include <cstdint>
#include <cstring>

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
  // cos/sin input mode: (B, S, R) tensors (strides in elements, 0 to broadcast), any float dtype.
  bool cos_sin_input = false;
  const void* cos = nullptr;
  const void* sin = nullptr;
  RopeDtype cos_sin_dtype = RopeDtype::kFloat32;
  int64_t cos_stride[3] = {}, sin_stride[3] = {};
};

// Element of a float tensor of dtype `dt` (fp16/bf16 decoded by bit manipulation, host or device).
#if defined(__CUDACC__)
#define VLMKERN_HOST_DEVICE __host__ __device__
#else
#define VLMKERN_HOST_DEVICE
#endif
VLMKERN_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

VLMKERN_HOST_DEVICE inline float rope_load_float(const void* ptr, RopeDtype dt, int64_t i) {
  switch (dt) {
    case RopeDtype::kFloat32: return static_cast<const float*>(ptr)[i];
    case RopeDtype::kFloat64: return static_cast<float>(static_cast<const double*>(ptr)[i]);
    case RopeDtype::kBFloat16: {
      return float_from_bits(uint32_t{static_cast<const uint16_t*>(ptr)[i]} << 16);
    }
    case RopeDtype::kFloat16: {
      const uint16_t h = static_cast<const uint16_t*>(ptr)[i];
      const uint32_t sign = uint32_t{h & 0x8000u} << 16;
      uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
      if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);  // inf / nan
      } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
      } else if (man == 0) {
        bits = sign;  // +-0
      } else {        // subnormal: normalise
        int e = -1;
        do {
          man <<= 1;
          ++e;
        } while ((man & 0x400u) == 0);
        bits = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
      }
      return float_from_bits(bits);
    }
  }
  return 0.0f;
}

}  // namespace vlmkern
