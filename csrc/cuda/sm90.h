// Whether a CUDA device runs our sm_90a-only kernels (wgmma / TMA code: compute capability 9.0
// exactly, H100 / H200) or our sm_80+ CUTLASS kernel, and the shape / alignment rules of their
// GEMMs. Torch-free; shared by the dispatchers of those kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vlmkern {

// The device's compute capability as 10 * major + minor, 0 when the query fails (leaving no
// sticky CUDA error for a fallback path to trip on).
inline int compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return 10 * major + minor;
}

inline bool is_sm90(int device) { return compute_capability(device) == 90; }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Why a 16-bit TMA GEMM of (M, N, K) whose A rows are `lda` elements apart cannot run, or
// nullptr: CUTLASS's problem shape is int, and TMA needs 16-byte row strides (8 bf16 / fp16
// elements). The caller checks its pointers with aligned16 and the device with is_sm90.
inline const char* tma_gemm_shape_unsupported(int64_t m, int64_t n, int64_t k, int64_t lda) {
  constexpr int64_t kMaxInt = INT32_MAX;
  if (m < 1 || n < 1 || k < 1 || m > kMaxInt || n > kMaxInt || k > kMaxInt) {
    return "M, N, K must be in [1, 2^31)";
  }
  if (k % 8 != 0 || n % 8 != 0 || lda % 8 != 0 || lda < k) {
    return "K, N and A's row stride must be multiples of 8 (and the stride >= K)";
  }
  return nullptr;
}

}  // namespace vlmkern
