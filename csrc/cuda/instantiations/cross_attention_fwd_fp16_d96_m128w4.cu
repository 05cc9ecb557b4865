// cross_attention forward instantiation: __half, head dim padded to 96,
// 128-row CTAs of 4 warps x 32 rows (two m16 tiles per warp). One per file: parallel,
// short nvcc runs.
#include "cuda/kernels/cross_attention_launch.cuh"

namespace vlmkern {
template cudaError_t launch_xattn_fwd<__half, 96, 4, 2>(
    const XattnCudaParams&, cudaStream_t);
}  // namespace vlmkern
