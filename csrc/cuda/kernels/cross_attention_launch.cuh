// launch_xattn_fwd<T, kHeadDimPad, kWarps, kMT>: the grid / smem set-up of
// cross_attention_fwd_kernel (kWarps warps of 16 kMT query rows each), included by the
// one-instantiation-per-file sources in cuda/instantiations/. No ATen/torch includes.
#pragma once

#include "cuda/cross_attention.h"
#include "cuda/kernels/cross_attention_fwd.cuh"

namespace vlmkern {

template <typename T, int kHeadDimPad, int kWarps, int kMT>
cudaError_t launch_xattn_fwd(const XattnCudaParams& p, cudaStream_t stream) {
  using namespace xattn_cuda;
  constexpr int kRows = 16 * kMT * kWarps;
  // the glue's choice is this instance
  if (p.block_m != kRows || p.warp_rows != 16 * kMT) return cudaErrorInvalidValue;
  // grid.x: kRows-row windows (B * ceil(Sq / kRows), ceil(B / images_per_cta) when a CTA runs
  // several images, or ceil(total_q / kRows) packed), grid.y: q heads (<= 65535, checked by the
  // glue), grid.z: split-KV runs.
  const int64_t m_tiles = (p.seq_q + kRows - 1) / kRows;
  const int images = p.images_per_cta;
  if (images < 1 || (images > 1 && (p.packed || m_tiles > 1 || p.num_splits > 1))) {
    return cudaErrorInvalidValue;
  }
  const int64_t windows = p.packed ? m_tiles : (p.batch + images - 1) / images * m_tiles;
  if (windows == 0 || p.heads_q == 0) return cudaSuccess;
  if (windows > INT32_MAX) return cudaErrorInvalidConfiguration;
  constexpr int kSmem = smem_bytes<T, kHeadDimPad, kRows>();
  static_assert(kSmem <= 227 * 1024, "over the sm_90 opt-in smem per block");
  auto* kernel = &cross_attention_fwd_kernel<T, kHeadDimPad, kWarps, kMT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kSmem);
  if (err != cudaSuccess) return err;
  // grid.z: split-KV runs (1 unless the glue chose more; never for packed input).
  if (p.num_splits < 1 || (p.packed && p.num_splits > 1)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(windows), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.num_splits));
  kernel<<<grid, 32 * kWarps, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vlmkern
