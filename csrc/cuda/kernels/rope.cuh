// Device code for RoPE (see common/rope_params.h). One block per token (grid-stride over tokens):
// the block puts the token's cos/sin in shared memory once (computed from the frequency table, or
// read from HF-style cos/sin tensors), then its threads rotate every q and k head of that token,
// V elements per access from each half of the head. No ATen/torch includes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/rope_params.h"

namespace vlmkern {

constexpr int kRopeThreads = 128;

template <typename T>
struct RopeMath {  // fp32 math for fp32/fp16/bf16, fp64 for fp64
  using Acc = float;
  static __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
  static __device__ __forceinline__ T from_acc(float v) { return static_cast<T>(v); }
};
template <>
struct RopeMath<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct RopeMath<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};
template <>
struct RopeMath<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <typename T, int V>
struct alignas(sizeof(T) * V) RopeVec {
  T v[V];
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Rotates (or, for the rest dims, copies) the heads of one token. Work item = (head, V-chunk).
template <typename T, int V>
__device__ __forceinline__ void rope_token_heads(const RopeParams& p, int64_t b, int64_t s,
                                                 const float* s_cos, const float* s_sin) {
  using M = RopeMath<T>;
  using Acc = typename M::Acc;
  using Vec = RopeVec<T, V>;
  const int half = p.rotary_dim / 2;
  const int chunks = half / V;                 // V-chunks per half head
  const int rest_chunks = (p.head_dim - p.rotary_dim) / V;
  const int heads = p.heads_q + p.heads_k;
  for (int item = threadIdx.x; item < heads * chunks; item += blockDim.x) {
    const int h = item / chunks;
    const int f0 = (item - h * chunks) * V;  // first frequency of this chunk
    const bool is_q = h < p.heads_q;
    const int hh = is_q ? h : h - p.heads_q;
    const int64_t* is = is_q ? p.q_in_stride : p.k_in_stride;
    const int64_t* os = is_q ? p.q_out_stride : p.k_out_stride;
    // (D,) row of this head, input and output; element stride is 1 when V > 1
    const T* x = static_cast<const T*>(is_q ? p.q_in : p.k_in) + b * is[0] + s * is[1] + hh * is[2];
    T* y = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * os[0] + s * os[1] + hh * os[2];
    Vec x1, x2, y1, y2;  // (V,) registers: dims f0.. and f0+half..
    if constexpr (V > 1) {
      x1 = *reinterpret_cast<const Vec*>(x + f0);
      x2 = *reinterpret_cast<const Vec*>(x + f0 + half);
    } else {
      x1.v[0] = x[f0 * is[3]];
      x2.v[0] = x[(f0 + half) * is[3]];
    }
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const Acc c1 = static_cast<Acc>(s_cos[f0 + u]), s1 = static_cast<Acc>(s_sin[f0 + u]);
      const Acc c2 = static_cast<Acc>(s_cos[f0 + u + half]);
      const Acc s2 = static_cast<Acc>(s_sin[f0 + u + half]);
      const Acc a = M::to_acc(x1.v[u]), bb = M::to_acc(x2.v[u]);
      // HF: x*cos + rotate_half(x)*sin, each product and the sum rounded (no FMA contraction).
      y1.v[u] = M::from_acc(add_rn(mul_rn(a, c1), -mul_rn(bb, s1)));
      y2.v[u] = M::from_acc(add_rn(mul_rn(bb, c2), mul_rn(a, s2)));
    }
    if constexpr (V > 1) {
      *reinterpret_cast<Vec*>(y + f0) = y1;
      *reinterpret_cast<Vec*>(y + f0 + half) = y2;
    } else {
      y[f0 * os[3]] = y1.v[0];
      y[(f0 + half) * os[3]] = y2.v[0];
    }
  }
  if (!p.copy_rest || rest_chunks == 0) return;
  for (int item = threadIdx.x; item < heads * rest_chunks; item += blockDim.x) {
    const int h = item / rest_chunks;
    const int d0 = p.rotary_dim + (item - h * rest_chunks) * V;
    const bool is_q = h < p.heads_q;
    const int hh = is_q ? h : h - p.heads_q;
    const int64_t* is = is_q ? p.q_in_stride : p.k_in_stride;
    const int64_t* os = is_q ? p.q_out_stride : p.k_out_stride;
    const T* x = static_cast<const T*>(is_q ? p.q_in : p.k_in) + b * is[0] + s * is[1] + hh * is[2];
    T* y = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * os[0] + s * os[1] + hh * os[2];
    if constexpr (V > 1) {
      *reinterpret_cast<Vec*>(y + d0) = *reinterpret_cast<const Vec*>(x + d0);
    } else {
      y[d0 * os[3]] = x[d0 * is[3]];
    }
  }
}

// Fills the token's (R,) cos/sin in shared memory. The backward (p.inverse) rotates by the
// transpose: cos unchanged, sin negated with its halves swapped (equal halves in table mode).
__device__ __forceinline__ void rope_token_cos_sin(const RopeParams& p, int64_t b, int64_t s,
                                                   float* s_cos, float* s_sin) {
  const int half = p.rotary_dim / 2;
  if (p.cos_sin_input) {
    for (int i = threadIdx.x; i < p.rotary_dim; i += blockDim.x) {
      const float c = rope_load_float(
          p.cos, p.cos_sin_dtype, b * p.cos_stride[0] + s * p.cos_stride[1] + i * p.cos_stride[2]);
      const float sn = rope_load_float(
          p.sin, p.cos_sin_dtype, b * p.sin_stride[0] + s * p.sin_stride[1] + i * p.sin_stride[2]);
      s_cos[i] = c;
      if (p.inverse) {
        s_sin[i < half ? i + half : i - half] = -sn;
      } else {
        s_sin[i] = sn;
      }
    }
    return;
  }
  for (int f = threadIdx.x; f < half; f += blockDim.x) {
    const int64_t off = p.freq_axis[f] * p.pos_stride[0] + b * p.pos_stride[1] +
                        s * p.pos_stride[2];
    const int64_t pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                                          : static_cast<const int32_t*>(p.positions)[off];
    // fp32 angle as HF computes it (float(pos) * inv_freq), accurate sincosf (no fast math).
    const float angle = __fmul_rn(static_cast<float>(pos), p.inv_freq[f]);
    float sn, cs;
    sincosf(angle, &sn, &cs);
    cs = __fmul_rn(cs, p.scale);
    sn = __fmul_rn(p.inverse ? -sn : sn, p.scale);
    s_cos[f] = cs;
    s_cos[f + half] = cs;
    s_sin[f] = sn;
    s_sin[f + half] = sn;
  }
}

// q_in/k_in/q_out/k_out: (B, S, H, D) strided (global); positions: (A, B, S) int32/int64;
// cos/sin (cos_sin_input): (B, S, R) strided (global).
template <typename T, int V>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  __shared__ float s_cos[2 * kMaxRopeFreqs];  // (R,) fp32, smem
  __shared__ float s_sin[2 * kMaxRopeFreqs];  // (R,) fp32, smem
  const int64_t tokens = p.batch * p.seq;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t b = t / p.seq, s = t - b * p.seq;
    rope_token_cos_sin(p, b, s, s_cos, s_sin);
    __syncthreads();
    rope_token_heads<T, V>(p, b, s, s_cos, s_sin);
    __syncthreads();  // the next token overwrites s_cos / s_sin
  }
}

}  // namespace vlmkern
