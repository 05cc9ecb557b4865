// Launches the CUDA cross-attention forward / backward: picks the instantiation (element type,
// head dim padded to a multiple of 16: 72 runs the 80 kernel with zero-filled smem columns; the
// forward's rows per CTA, p.block_m = warps x p.warp_rows, as the glue chose). The
// instantiations are compiled one per file in cuda/instantiations/cross_attention_{fwd,bwd}_*.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cross_attention.h"
#include "cuda/kernels/cross_attention_bwd.cuh"

namespace vlmkern {
namespace {

// The instance for head-dim pad kHeadDimPad, or an error where its tile copy does not divide over
// kWarps warps (8 warps at pad 80: not instantiated, the glue rejects it first).
template <typename T, int kHeadDimPad, int kWarps, int kMT>
cudaError_t launch_pad(const XattnCudaParams& p, cudaStream_t stream) {
  if constexpr (xattn_cuda::fwd_tiles_divide<kHeadDimPad, kWarps>()) {
    return launch_xattn_fwd<T, kHeadDimPad, kWarps, kMT>(p, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

template <typename T, int kWarps, int kMT = 1>
cudaError_t launch_warps(const XattnCudaParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_pad<T, 64, kWarps, kMT>(p, stream);
    case 72:
    case 80: return launch_pad<T, 80, kWarps, kMT>(p, stream);
    case 96: return launch_pad<T, 96, kWarps, kMT>(p, stream);
    case 128: return launch_pad<T, 128, kWarps, kMT>(p, stream);
    default: return cudaErrorInvalidValue;  // the glue rejects other head dims first
  }
}

template <typename T>
cudaError_t launch_type(const XattnCudaParams& p, cudaStream_t stream) {
  switch (p.block_m) {
    case 64: return launch_warps<T, 4>(p, stream);
    case 32: return launch_warps<T, 2>(p, stream);
    case 128: return p.warp_rows == 32 ? launch_warps<T, 4, 2>(p, stream)
                                       : launch_warps<T, 8>(p, stream);
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

template <int kRows>
size_t fwd_smem_bytes(int head_dim) {
  using xattn_cuda::smem_bytes;
  switch (head_dim) {
    case 64: return smem_bytes<__half, 64, kRows>();
    case 72:
    case 80: return smem_bytes<__half, 80, kRows>();
    case 96: return smem_bytes<__half, 96, kRows>();
    case 128: return smem_bytes<__half, 128, kRows>();
    default: return 0;
  }
}

}  // namespace

cudaError_t cuda_cross_attention_fwd(const XattnCudaParams& p, cudaStream_t stream) {
  return p.dtype == XattnDtype::kFloat16 ? launch_type<__half>(p, stream)
                                         : launch_type<__nv_bfloat16>(p, stream);
}

size_t cuda_cross_attention_fwd_smem_bytes(int head_dim, int block_m) {
  switch (block_m) {  // the same for fp16 and bf16
    case 32: return fwd_smem_bytes<32>(head_dim);
    case 64: return fwd_smem_bytes<64>(head_dim);
    case 128: return fwd_smem_bytes<128>(head_dim);
    default: return 0;
  }
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
