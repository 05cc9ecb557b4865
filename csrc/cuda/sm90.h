// Whether a CUDA device runs our sm_90a-only kernels (wgmma / TMA code: compute capability 9.0
// exactly, H100 / H200). Torch-free; shared by the dispatchers of those kernels.
#pragma once

#include <cuda_runtime_api.h>

namespace vlmkern {

// false also when the query fails, leaving no sticky CUDA error for a fallback path to trip on.
inline bool is_sm90(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

}  // namespace vlmkern
