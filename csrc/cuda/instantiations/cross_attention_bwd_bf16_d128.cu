// cross_attention backward instantiation: __nv_bfloat16, head dim padded to 128 (one per file: parallel,
// short nvcc runs).
#include "cuda/kernels/cross_attention_bwd_launch.cuh"

namespace vlmkern {
template cudaError_t launch_xattn_bwd<__nv_bfloat16, 128>(const XattnBwdParams&, cudaStream_t);
}  // namespace vlmkern
