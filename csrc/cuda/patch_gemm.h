// Torch-free launcher of the implicit-GEMM patch embedding (Hopper sm_90a, wgmma): tokens =
// patches(pixels) @ W^T + addend, where the patch rows are gathered from the pixels straight into
// shared memory (no patch matrix in global memory) and the addend (bias + positions) is added in
// the epilogue. The kernel is cuda/kernels/patch_gemm.cuh; cuda/patch_gemm.cu dispatches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/patchify.h"

namespace vlmkern {

// out[b, l, n] = sum_k pixel(b, l, k) * w[n, k] + addend[l, n]   for l < L = gh*gw, n < D, where
// pixel(b, l, k) is the patchify kernel's element (cuda/patchify.h: NCHW k = (c*P + i)*P + j,
// NHWC k = (i*P + j)*C + c, the value converted to the GEMM dtype; 0 for k >= C*P*P), summed in
// fp32, plus the addend in fp32, rounded once to the GEMM dtype.
struct PatchGemmParams {
  PatchifyDtype in_dtype = PatchifyDtype::kUInt8;  // pixels: uint8 or `dtype`
  PatchifyDtype dtype = PatchifyDtype::kBFloat16;  // w, addend, out: fp16 or bf16
  const void* pixels = nullptr;                    // (B, C, H, W) or (B, H, W, C), strides below
  int64_t batch = 0, gh = 0, gw = 0;               // M = batch * gh * gw GEMM rows
  int channels = 0, patch = 0;                     // C, P
  int channels_last = 0;
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;  // pixel strides (elements)
  const void* w = nullptr;         // (D, kp) contiguous, zero in columns [C*P*P, kp)
  int64_t d = 0;                   // D output features
  int kp = 0;                      // w's row length, >= C*P*P, a multiple of 8
  const void* addend = nullptr;    // (L, D) at row stride addend_row_stride (0: a (D,) bias), or
  int64_t addend_row_stride = 0;   // nullptr for none; unit column stride
  void* out = nullptr;             // row (b, l) at out + b*out_batch_stride + l*out_row_stride
  int64_t out_batch_stride = 0, out_row_stride = 0;  // unit column stride
  int device = 0;                  // CUDA device of every pointer (and of the stream)
};

// True when this build has the kernel (CUTLASS / CuTe headers found, sm_90a targeted).
bool patch_gemm_compiled();

// nullptr when `p` can run on the kernel, else why not: not compiled, a dtype pair without a
// variant, a device that is not compute capability 9.0, kp not a multiple of 8 or > 4096 (the
// shared offset table), negative strides, in-patch offsets past 2^31, w not 16-byte aligned,
// 2^31 or more output tiles.
const char* patch_gemm_unsupported(const PatchGemmParams& p);

// Enqueues the kernel on `stream` (no host synchronization; CUDA-graph capturable). `p` must have
// passed patch_gemm_unsupported.
cudaError_t cuda_patch_gemm(const PatchGemmParams& p, cudaStream_t stream);

// The kernel's arguments, as the launcher derives them from PatchGemmParams.
struct PatchGemmArgs {
  const void* pixels;
  const void* w;
  const void* addend;
  void* out;
  int64_t m;                          // GEMM rows, batch * l
  int64_t l, gw;                      // tokens per image, patch columns
  int64_t stride_b, stride_h, stride_w;
  int64_t addend_row_stride, out_batch_stride, out_row_stride;
  int d, kp, k;                       // D, w's row length, C*P*P
  int k_tiles;                        // ceil(kp / 64)
  int n_tiles;                        // ceil(D / 128)
  int channels, patch, channels_last;
  int64_t stride_c;
  int pair_stores;                    // out rows and base allow 4-byte (two-element) stores
  int pair_loads;                     // pixel base and row strides even: two-element loads
};

// One compiled kernel (kernels/patch_gemm.cuh), instantiated per (pixel dtype, GEMM dtype) by one
// file under cuda/instantiations/ (patch_gemm.cu dispatches over the compiled ones).
template <PatchifyDtype kIn, PatchifyDtype kOut>
struct PatchGemmVariant {
  static cudaError_t run(const PatchGemmArgs& a, cudaStream_t stream);
};

}  // namespace vlmkern
