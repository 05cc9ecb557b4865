// cross_attention forward instantiation: __half, head dim padded to 96,
// 128-row CTAs (8 warps). One per file: parallel, short nvcc runs.
#include "cuda/kernels/cross_attention_launch.cuh"

namespace vlmkern {
template cudaError_t launch_xattn_fwd<__half, 96, 8>(const XattnCudaParams&, cudaStream_t);
}  // namespace vlmkern
