// Torch-free launcher of the patchify kernel (cuda/patchify.cu): pixels -> the patch matrix of a
// stride = kernel conv, converted to the GEMM dtype and zero-padded to aligned rows.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vlmkern {

enum class PatchifyDtype : int { kUInt8, kFloat32, kFloat16, kBFloat16 };

// out[m, k] for m = (b, ph, pw) row-major over (B, gh, gw) and k < K = C*P*P:
//   NCHW (channels_last = 0): k = (c*P + i)*P + j;  NHWC (1): k = (i*P + j)*C + c;
//   value pixels[b, c, ph*P + i, pw*P + j] (strides in elements below), converted to out_dtype;
//   out[m, k] = 0 for K <= k < kp. out is (M, kp) contiguous.
struct PatchifyParams {
  const void* pixels = nullptr;
  void* out = nullptr;
  PatchifyDtype in_dtype = PatchifyDtype::kFloat32;
  PatchifyDtype out_dtype = PatchifyDtype::kFloat32;
  int64_t batch = 0, gh = 0, gw = 0;   // M = batch * gh * gw rows
  int channels = 0, patch = 0;         // C, P
  int kp = 0;                          // row width, >= C*P*P
  int channels_last = 0;
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;  // pixel strides (elements)
};

// Why `p` cannot take the kernel (nullptr when it can): an unsupported dtype pair (the input
// must be uint8 or out_dtype), kp not a multiple of 8 (16-byte row chunks), negative strides, an
// in-patch offset past 2^31, or an offset table past 48 KiB of shared memory.
const char* patchify_unsupported(const PatchifyParams& p);

// Enqueues the kernel on `stream`; returns the launch status (no synchronization).
cudaError_t cuda_patchify(const PatchifyParams& p, cudaStream_t stream);

}  // namespace vlmkern
