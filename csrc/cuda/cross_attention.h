// Torch-free parameter blocks and launchers of the CUDA cross-attention forward and backward
// (flash-attention 2 style, csrc/cuda/kernels/cross_attention_{fwd,bwd}.cuh). Filled by
// cuda/cross_attention.cpp from the shared checks (common/cross_attention.h); nvcc never sees ATen.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vlmkern {

// An int32 / int64 index tensor on the device (strides in elements).
struct XattnDevIndex {
  const void* data = nullptr;
  int is64 = 0;
  int64_t stride[4] = {};
};

enum class XattnDtype : int { kFloat16, kBFloat16 };

struct XattnCudaParams {
  const void* q = nullptr;  // (B, Sq, Hq, D), stride(3) == 1, 16-byte aligned rows
  const void* k = nullptr;  // (B, Sk, Hk, D)
  const void* v = nullptr;  // (B, Sk, Hk, D)
  void* out = nullptr;      // (B, Sq, Hq, D) dense, q's dtype
  float* lse = nullptr;     // (B, Hq, Sq) dense fp32, natural log
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};  // (B, S, H), elements
  int64_t batch = 0, seq_q = 0, seq_k = 0;
  int heads_q = 0, heads_k = 0, head_dim = 0;
  XattnDtype dtype = XattnDtype::kBFloat16;
  float scale_log2 = 0.f;  // scale * log2(e)
  int uniform_masked_rows = 0;
  int has_ranges = 0;  // ranges (B, Sq, R, 2), relative to the sequence's keys
  XattnDevIndex ranges;
  int64_t num_ranges = 0;
  int packed = 0;  // cu_q, cu_k (N + 1,), batch == 1
  XattnDevIndex cu_q, cu_k;
  int64_t num_segments = 0;
  int prefix_lm = 0;  // prefix (B or N,)
  XattnDevIndex prefix;
  // Forward CTA: block_m query rows (64: 4 warps; 32: 2 warps, for windows of <= 32 rows;
  // 128: 8 warps, head-dim pads 64 / 96 / 128, only when forced), warp_rows per warp (16; 32:
  // block_m 128 on 4 warps, only when forced).
  int block_m = 64;
  int warp_rows = 16;
  // Split-KV (not packed): num_splits > 1 runs grid.z = num_splits CTAs per window over disjoint
  // runs of the key tiles, writing partials that cuda_cross_attention_combine merges into out
  // and lse.
  int num_splits = 1;
  float* o_part = nullptr;    // (num_splits, B, Sq, Hq, D) fp32
  float* lse_part = nullptr;  // (num_splits, B, Hq, Sq) fp32, natural log
  // Forward, dense input with Sq <= block_m and num_splits == 1 only: each CTA runs this many
  // images (batch rows) of its q head one after the other, grid.x = ceil(B / images_per_cta);
  // the Q tile is loaded once when q's batch stride is 0 (Q-Former / Perceiver queries
  // broadcast over the images). 1: one image per CTA.
  int images_per_cta = 1;
};

// The backward's extra tensors (csrc/cuda/kernels/cross_attention_bwd.cuh); `a` holds the
// forward's inputs and visibility (a.out / a.lse unused).
struct XattnBwdParams {
  XattnCudaParams a;
  const void* dout = nullptr;   // (B, Sq, Hq, D) grad of out, stride(3) == 1, 16-byte aligned rows
  const void* out = nullptr;    // (B, Sq, Hq, D) forward output, stride(3) == 1
  int64_t dout_stride[3] = {}, out_stride[3] = {};  // (B, S, H), elements
  const float* lse = nullptr;   // (B, Hq, Sq) dense fp32, natural log (-inf: row saw nothing)
  const float* dlse = nullptr;  // (B, Hq, Sq) dense fp32 grad of lse, or null
  float* delta = nullptr;       // (B, Hq, Sq) dense fp32 workspace: rowsum(dO * O) - dlse
  void* dq = nullptr;           // (B, Sq, Hq, D) dense, q's dtype
  void* dk = nullptr;           // (B, Sk, Hk, D) dense
  void* dv = nullptr;           // (B, Sk, Hk, D) dense
  float scale = 0.f;            // softmax scale (a.scale_log2 = scale * log2(e))
};

// Head dims the CUDA kernel takes (anything else is rejected by the glue before launching).
inline bool xattn_cuda_head_dim_ok(int64_t d) {
  return d == 64 || d == 72 || d == 80 || d == 96 || d == 128;
}

// Enqueues the forward on `stream`; returns the launch status (no sync, graph-capture safe).
cudaError_t cuda_cross_attention_fwd(const XattnCudaParams& p, cudaStream_t stream);

// Dynamic shared memory per block of the forward at head dim `head_dim` with block_m-row CTAs
// (0 for a head dim the kernel does not take): the 128-row CTA at D = 128 takes 102 KiB, over the 99 KiB
// opt-in of sm_86 / sm_89 parts.
size_t cuda_cross_attention_fwd_smem_bytes(int head_dim, int block_m);

// Merges the split-KV partials of p (num_splits > 1) into p.out and p.lse on `stream`
// (cuda/cross_attention_combine.cu).
cudaError_t cuda_cross_attention_combine(const XattnCudaParams& p, cudaStream_t stream);

// Dynamic shared memory per block the backward's largest kernel needs at head dim `head_dim`
// (the glue compares it with the device's opt-in limit: sm_86 / sm_89 parts have 99 KiB).
size_t cuda_cross_attention_bwd_smem_bytes(int head_dim);

// Enqueues the backward (delta, dK / dV, dQ kernels) on `stream`; no sync, no atomics.
cudaError_t cuda_cross_attention_bwd(const XattnBwdParams& p, cudaStream_t stream);

// One instantiation per (element type, head dim padded to 16[, forward warps per CTA, m16 tiles
// per warp]) in cuda/instantiations/.
template <typename T, int kHeadDimPad, int kWarps, int kMT = 1>
cudaError_t launch_xattn_fwd(const XattnCudaParams& p, cudaStream_t stream);
template <typename T, int kHeadDimPad>
cudaError_t launch_xattn_bwd(const XattnBwdParams& p, cudaStream_t stream);

}  // namespace vlmkern
