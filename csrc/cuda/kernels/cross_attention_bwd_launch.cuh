// launch_xattn_bwd<T, kHeadDimPad>: grids / smem of the three backward kernels
// (cross_attention_bwd.cuh: delta, dK / dV, dQ), enqueued in that order on one stream; included
// by the one-instantiation-per-file sources in cuda/instantiations/. No ATen/torch includes.
#pragma once

#include "cuda/cross_attention.h"
#include "cuda/kernels/cross_attention_bwd.cuh"

namespace vlmkern {

template <typename T, int kHeadDimPad>
cudaError_t launch_xattn_bwd(const XattnBwdParams& bp, cudaStream_t stream) {
  using namespace xattn_cuda;
  const XattnCudaParams& p = bp.a;
  if (p.heads_q == 0 || p.batch == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  // 1. delta (B, Hq, Sq): one warp per row, grid-stride past 2^20 blocks.
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  if (rows > 0) {
    const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
    const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
    cross_attention_bwd_delta_kernel<T, kHeadDimPad><<<grid, kThreads, 0, stream>>>(bp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // 2. dK / dV: grid.x = 64-key windows (B * ceil(Sk / 64), packed ceil(total_k / 64)), grid.y =
  //    kv heads.
  const int64_t n_tiles = (p.seq_k + kBlockN - 1) / kBlockN;
  const int64_t k_windows = p.packed ? n_tiles : p.batch * n_tiles;
  if (k_windows > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (k_windows > 0) {
    constexpr int kSmem = dkdv_smem_bytes<T, kHeadDimPad>();
    auto* kernel = &cross_attention_bwd_dkdv_kernel<T, kHeadDimPad>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(k_windows), static_cast<unsigned>(p.heads_k));
    kernel<<<grid, kThreads, kSmem, stream>>>(bp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // 3. dQ: the forward's grid (64-row q windows x q heads).
  const int64_t m_tiles = (p.seq_q + kBlockM - 1) / kBlockM;
  const int64_t q_windows = p.packed ? m_tiles : p.batch * m_tiles;
  if (q_windows > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (q_windows > 0) {
    constexpr int kSmem = dq_smem_bytes<T, kHeadDimPad>();
    auto* kernel = &cross_attention_bwd_dq_kernel<T, kHeadDimPad>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(q_windows), static_cast<unsigned>(p.heads_q));
    kernel<<<grid, kThreads, kSmem, stream>>>(bp);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace vlmkern
