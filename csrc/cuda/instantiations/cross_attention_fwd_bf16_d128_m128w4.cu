// cross_attention forward instantiation: __nv_bfloat16, head dim padded to 128,
// 128-row CTAs of 4 warps x 32 rows (two m16 tiles per warp). One per file: parallel,
// short nvcc runs.
#include "cuda/kernels/cross_attention_launch.cuh"

namespace vlmkern {
template cudaError_t launch_xattn_fwd<__nv_bfloat16, 128, 4, 2>(
    const XattnCudaParams&, cudaStream_t);
}  // namespace vlmkern
