// Launches the split-KV combine of the CUDA cross-attention forward
// (cuda/kernels/cross_attention_combine.cuh) for the partials of XattnCudaParams.
#include "cuda/kernels/cross_attention_combine.cuh"

namespace vlmkern {

cudaError_t cuda_cross_attention_combine(const XattnCudaParams& p, cudaStream_t stream) {
  using namespace xattn_cuda;
  if (p.num_splits < 2 || p.num_splits > kMaxSplits) return cudaErrorInvalidValue;
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  if (rows == 0) return cudaSuccess;
  const int64_t per_block = kCombineThreads / 32;
  const int64_t want = (rows + per_block - 1) / per_block;
  const unsigned blocks = static_cast<unsigned>(want < (1 << 20) ? want : (1 << 20));
  if (p.dtype == XattnDtype::kFloat16) {
    cross_attention_combine_kernel<__half><<<blocks, kCombineThreads, 0, stream>>>(p);
  } else {
    cross_attention_combine_kernel<__nv_bfloat16><<<blocks, kCombineThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace vlmkern
