// Torch-free launcher of the implicit-GEMM weight gradient of the patch embedding (Hopper sm_90a,
// wgmma): dW^T (kp, D) = patches(pixels)^T @ G, the (normalized) patch rows gathered from the
// pixels into shared memory, never written as a matrix. Split over the token rows M into
// fp32 partials the caller sums. Kernel: cuda/kernels/patch_wgrad.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/patchify.h"

namespace vlmkern {

constexpr int kPatchWgradMaxChannels = 4;  // per-channel normalization passed by value

// ws[s, f, n] = sum over rows m of split s of X[m, f] * G[m, n], f < kp, n < D, in fp32, where
// X[m, f] is the patchify kernel's element (cuda/patchify.h; 0 for f >= C*P*P), normalized as
// dtype(float(pixel) * scale[c] - offset[c]) when `normalize` (the forward's conv input), and
// G[m, n] = grad[b * g_batch_stride + l * g_row_stride + n] for m = b * L + l.
struct PatchWgradParams {
  PatchifyDtype in_dtype = PatchifyDtype::kUInt8;  // pixels: uint8 or `dtype`
  PatchifyDtype dtype = PatchifyDtype::kBFloat16;  // grad: fp16 or bf16
  const void* pixels = nullptr;                    // (B, C, H, W) or (B, H, W, C), strides below
  int64_t batch = 0, gh = 0, gw = 0;
  int channels = 0, patch = 0;
  int channels_last = 0;
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;  // pixel strides (elements)
  const void* grad = nullptr;           // token rows of the output gradient, unit column stride
  int64_t g_batch_stride = 0, g_row_stride = 0;
  int64_t d = 0;                        // D features (a multiple of 8)
  int kp = 0;                           // columns of the result, >= C*P*P
  bool normalize = false;
  float scale[kPatchWgradMaxChannels] = {};
  float offset[kPatchWgradMaxChannels] = {};
  float* ws = nullptr;                  // (splits, kp, D) fp32, every element written
  int splits = 1;                       // from patch_wgrad_splits
  int device = 0;
};

// True when this build has the kernel (CuTe headers found, sm_90a targeted).
bool patch_wgrad_compiled();

// nullptr when `p` can run on the kernel, else why not: not compiled, no variant for the dtype
// pair, not compute capability 9.0, D not a multiple of 8 or grad not 16-byte aligned (16-byte
// cp.async rows), normalization over more than 4 channels, offsets past the int ranges.
const char* patch_wgrad_unsupported(const PatchWgradParams& p);

// Splits of the M rows so that the (kp / 128) x (D / 128) tiles fill the GPU about twice.
int patch_wgrad_splits(const PatchWgradParams& p);

// Enqueues the kernel on `stream` (no host synchronization; CUDA-graph capturable).
cudaError_t cuda_patch_wgrad(const PatchWgradParams& p, cudaStream_t stream);

// The kernel's arguments, as the launcher derives them.
struct PatchWgradArgs {
  const void* pixels;
  const void* grad;
  float* ws;
  int64_t m, l, gw;
  int64_t stride_b, stride_c, stride_h, stride_w;
  int64_t g_batch_stride, g_row_stride;
  int64_t m_chunk;                    // rows per split, a multiple of 64
  int d, kp, k, channels, patch, channels_last;
  int kf_tiles, n_tiles, splits;
  int pair_loads, normalize;
  float scale[kPatchWgradMaxChannels], offset[kPatchWgradMaxChannels];
};

template <PatchifyDtype kIn, PatchifyDtype kOut>
struct PatchWgradVariant {
  static cudaError_t run(const PatchWgradArgs& a, cudaStream_t stream);
};

}  // namespace vlmkern
