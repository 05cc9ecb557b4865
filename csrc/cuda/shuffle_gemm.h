// Torch-free launcher of the pixel-shuffle GEMM (Hopper sm_90a, wgmma): out = shuffle(x) @ W^T +
// bias, the projector's first Linear reading its A rows straight from the (B, H, W, C) token grid
// through the shuffle's index map (Idefics3 / SmolVLM, or any shuffled projector without a norm):
// the shuffled (M, r*r*C) matrix is never written. Kernel: cuda/kernels/shuffle_gemm.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/gemm_bias_act.h"

namespace vlmkern {

// out[m, n] = sum_f X2[m, f] * w[n, f] + bias[n], X2 the pixel shuffle of x (vlmkern's
// pixel_shuffle, InternVL / Idefics3 order):
// row m = (b, i, j) over (B, H/r, W/r), feature f = (dy*r + dx)*C + c holds x[b, r*i + dy,
// r*j + dx, c]; fp32 accumulation, bias added in fp32, one rounding.
struct ShuffleGemmParams {
  GemmDtype dtype = GemmDtype::kBFloat16;  // x, w, bias, out
  const void* x = nullptr;                 // (B, H, W, C), unit channel stride
  int64_t batch = 0, h = 0, w = 0;
  int c = 0, r = 0;                        // channels, shuffle factor (divides H and W)
  int64_t stride_b = 0, stride_h = 0, stride_w = 0;  // x strides (elements)
  const void* weight = nullptr;            // (N, r*r*C) contiguous
  int64_t n = 0;
  const void* bias = nullptr;              // (N,) contiguous, or nullptr
  void* out = nullptr;                     // (M, N) contiguous, M = B * (H/r) * (W/r)
  int device = 0;                          // CUDA device of every pointer (and of the stream)
  // Packed Qwen3-VL's bilinear positions in the epilogue (table != nullptr; r = 1 and x the
  // (M, K) patch rows as a (1, M, 1, K) grid): row m adds T(T(sum_k table[tap_index[k*M + m]] *
  // tap_weight[k*M + m]) + bias) instead of the bias alone, the taps summed in fp32 in the order
  // k = 0..3: cuda/position_rows.h's addend, never written to global memory.
  const void* table = nullptr;             // (S*S, N) contiguous, the GEMM dtype
  const int64_t* tap_index = nullptr;      // (4, M) table rows
  const float* tap_weight = nullptr;       // (4, M)
  // A norm applied to the A tiles in shared memory (norm_rstd != nullptr), over norm_groups
  // groups of G = K / norm_groups features per row (InternVL: 1 group, the shuffled row; Qwen's
  // mergers at r = 1: the 4 merged tokens, or 1 group for the post-merge norm), feature f in
  // group g = f / G: LayerNorm A[m, f] = T(((X2[m, f] - mean[m, g]) * rstd[m, g]) * gamma[f % G]
  // + beta[f % G]) in fp32 (gamma / beta optional; the shuffle + LayerNorm kernel's write path);
  // RMSNorm (norm_rms) A[m, f] = T(gamma[f % G] * T(X2[m, f] * rstd[m, g])) (Qwen2RMSNorm). The
  // statistics come from cuda/shuffle_layer_norm.h without an output; the normalized rows are
  // never written to global memory.
  const float* norm_mean = nullptr;        // (M, norm_groups) fp32, LayerNorm only
  const float* norm_rstd = nullptr;        // (M, norm_groups) fp32
  const void* norm_weight = nullptr;       // (G,) the GEMM dtype, or nullptr
  const void* norm_bias = nullptr;         // (G,) the GEMM dtype, or nullptr (LayerNorm only)
  int norm_groups = 1;
  int norm_rms = 0;
};

// True when this build has the kernel (CuTe headers found, sm_90a targeted).
bool shuffle_gemm_compiled();

// nullptr when `p` can run on the kernel, else why not: not compiled, a device that is not
// compute capability 9.0, C not a multiple of 8 or x / strides not 16-byte aligned (16-byte
// cp.async chunks), weight / bias / out misaligned, sizes past the kernel's int ranges, a table
// without its taps, a norm with misaligned gamma / beta, groups not dividing K into multiples of
// 8, a LayerNorm without its mean, an RMSNorm with a bias, a table and a norm.
const char* shuffle_gemm_unsupported(const ShuffleGemmParams& p);

// Enqueues the kernel on `stream` (no host synchronization; CUDA-graph capturable). `p` must have
// passed shuffle_gemm_unsupported.
cudaError_t cuda_shuffle_gemm(const ShuffleGemmParams& p, cudaStream_t stream);

// The kernel's arguments, as the launcher derives them from ShuffleGemmParams.
struct ShuffleGemmArgs {
  const void* x;
  const void* weight;
  const void* bias;
  void* out;
  int64_t m;                          // B * (H/r) * (W/r) rows
  int64_t grid_rows, grid_cols;       // H/r, W/r
  int64_t stride_b, stride_h, stride_w;
  int c, r, k;                        // C, r, K = r*r*C
  int n;                              // N output features
  int k_tiles, n_tiles;               // ceil(K / 64), ceil(N / 128)
  int pair_stores;                    // N even and out 4-byte aligned: two-element stores
  const void* table;                  // positions in the epilogue (ShuffleGemmParams), or nullptr
  const int64_t* tap_index;
  const float* tap_weight;
  const float* norm_mean;             // the A tiles' norm (ShuffleGemmParams)
  const float* norm_rstd;             // nullptr: no norm
  const void* norm_weight;
  const void* norm_bias;
  int norm_groups, norm_group_size, norm_rms;  // groups per row, G = K / groups, RMSNorm
};

// One compiled kernel (kernels/shuffle_gemm.cuh), instantiated per GEMM dtype by one file under
// cuda/instantiations/.
template <GemmDtype kDtype>
struct ShuffleGemmVariant {
  static cudaError_t run(const ShuffleGemmArgs& a, cudaStream_t stream);
};

}  // namespace vlmkern
