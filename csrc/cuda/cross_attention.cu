// Launches the CUDA cross-attention forward / backward: picks the instantiation (element type,
// head dim padded to a multiple of 16: 72 runs the 80 kernel with zero-filled smem columns; the
// forward's rows per CTA, p.block_m = 16 x warps, as the glue chose). The instantiations are
// compiled one per file in cuda/instantiations/cross_attention_{fwd,bwd}_*.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cross_attention.h"
#include "cuda/kernels/cross_attention_bwd.cuh"

namespace vlmkern {
namespace {

template <typename T, int kWarps>
cudaError_t launch_warps(const XattnCudaParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_xattn_fwd<T, 64, kWarps>(p, stream);
    case 72:
    case 80: return launch_xattn_fwd<T, 80, kWarps>(p, stream);
    case 96: return launch_xattn_fwd<T, 96, kWarps>(p, stream);
    case 128: return launch_xattn_fwd<T, 128, kWarps>(p, stream);
    default: return cudaErrorInvalidValue;  // the glue rejects other head dims first
  }
}

template <typename T>
cudaError_t launch_type(const XattnCudaParams& p, cudaStream_t stream) {
  switch (p.block_m) {
    case 64: return launch_warps<T, 4>(p, stream);
    case 32: return launch_warps<T, 2>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_type_bwd(const XattnBwdParams& p, cudaStream_t stream) {
  switch (p.a.head_dim) {
    case 64: return launch_xattn_bwd<T, 64>(p, stream);
    case 72:
    case 80: return launch_xattn_bwd<T, 80>(p, stream);
    case 96: return launch_xattn_bwd<T, 96>(p, stream);
    case 128: return launch_xattn_bwd<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;  // the glue rejects other head dims first
  }
}

}  // namespace

cudaError_t cuda_cross_attention_fwd(const XattnCudaParams& p, cudaStream_t stream) {
  return p.dtype == XattnDtype::kFloat16 ? launch_type<__half>(p, stream)
                                         : launch_type<__nv_bfloat16>(p, stream);
}

size_t cuda_cross_attention_bwd_smem_bytes(int head_dim) {
  using xattn_cuda::dkdv_smem_bytes;
  using xattn_cuda::dq_smem_bytes;
  auto most = [](int a, int b) { return static_cast<size_t>(a > b ? a : b); };
  switch (head_dim) {  // the same for fp16 and bf16
    case 64: return most(dq_smem_bytes<__half, 64>(), dkdv_smem_bytes<__half, 64>());
    case 72:
    case 80: return most(dq_smem_bytes<__half, 80>(), dkdv_smem_bytes<__half, 80>());
    case 96: return most(dq_smem_bytes<__half, 96>(), dkdv_smem_bytes<__half, 96>());
    case 128: return most(dq_smem_bytes<__half, 128>(), dkdv_smem_bytes<__half, 128>());
    default: return 0;
  }
}

cudaError_t cuda_cross_attention_bwd(const XattnBwdParams& p, cudaStream_t stream) {
  return p.a.dtype == XattnDtype::kFloat16 ? launch_type_bwd<__half>(p, stream)
                                           : launch_type_bwd<__nv_bfloat16>(p, stream);
}

}  // namespace vlmkern
