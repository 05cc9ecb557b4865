// Pixel-shuffle GEMM for Hopper (sm_90a): out (M, N) = shuffle(x) (M, K) @ w (N, K)^T + bias, the
// shuffled matrix never written. An A row (b, i, j) is r*r runs of C contiguous channels, one
// per token (r*i + dy, r*j + dx) of x: every 16-byte chunk of a 64-wide k tile is one cp.async
// from its token (C a multiple of 8), so A and w both stream by cp.async, three tiles deep, into
// 128-byte swizzled K-major shared tiles that two warpgroups of wgmma consume (wgmma_gemm.cuh).
// The epilogue adds the bias in fp32 and rounds once, or (packed Qwen3-VL at r = 1) the bilinear
// positions + bias computed from four table rows per token. With a norm (InternVL's LayerNorm,
// Qwen's merger LayerNorm / RMSNorm; statistics from a pre-pass), each thread normalizes the A
// chunks it copied in shared memory once they land, while the previous tile's wgmma runs: the
// normalized rows never reach global memory.
// Include only from cuda/instantiations/shuffle_gemm_*.cu (CuTe headers, sm_90a only).
#pragma once

#include <cstdint>

#include "cuda/kernels/norm_affine.cuh"
#include "cuda/kernels/wgmma_gemm.cuh"
#include "cuda/shuffle_gemm.h"

namespace vlmkern {
namespace shuffle_gemm_detail {

using namespace wgmma_gemm;
constexpr int kStages = 3;  // A and w: cp.async two tiles ahead

template <GemmDtype D>
struct Elem { using T = cutlass::bfloat16_t; };
template <>
struct Elem<GemmDtype::kFloat16> { using T = cutlass::half_t; };

template <class T>
struct SharedStorage {
  alignas(1024) T a[kStages * kBlockM * kBlockK];  // (128 rows, 64 k, 3): SW128 K-major tiles
  alignas(1024) T b[kStages * kBlockN * kBlockK];  // (128 n, 64 k, 3)
  int64_t row_base[kBlockM];  // x offset of token (r*i, r*j) of each tile row, -1 past M
};

template <GemmDtype kDtype>
__global__ void __launch_bounds__(kThreads, 2) shuffle_gemm_kernel(ShuffleGemmArgs a) {
  using namespace cute;
  using T = typename Elem<kDtype>::T;
  extern __shared__ char smem_raw[];
  auto& s = aligned_smem<SharedStorage<T>>(smem_raw);

  const int tid = threadIdx.x;
  const int n0 = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_tiles)) * kBlockN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(a.n_tiles)) * kBlockM;

  if (tid < kBlockM) {  // row m = (b, i, j): its first token (r*i, r*j)
    const int64_t m = m0 + tid, per_image = a.grid_rows * a.grid_cols;
    int64_t base = -1;
    if (m < a.m) {
      const int64_t b = m / per_image, rem = m - b * per_image;
      const int64_t i = rem / a.grid_cols, j = rem - i * a.grid_cols;
      base = b * a.stride_b + i * a.r * a.stride_h + j * a.r * a.stride_w;
    }
    s.row_base[tid] = base;
  }
  __syncthreads();

  // A tile kt: thread tid copies 16-byte chunk tid % 8 (features f .. f + 7, one token's channels
  // cc .. cc + 7) of rows tid / 8 + 32 j; zero past K or M.
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const uint32_t a_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.a));
  auto issue_a = [&](int kt, int stage) {
    const int chunk = tid & 7, f = kt * kBlockK + chunk * 8;
    // f = (dy r + dx) C + cc
    const int q = f / a.c, cc = f - q * a.c, dy = q / a.r, dx = q - dy * a.r;
    const int64_t k_off = dy * a.stride_h + dx * a.stride_w + cc;
#pragma unroll
    for (int j = 0; j < kBlockM / 32; ++j) {
      const int row = (tid >> 3) + 32 * j;
      const int64_t base = s.row_base[row];
      const bool valid = f < a.k && base >= 0;
      cp_async_16(a_smem + stage * kStageBytes + sw128_offset(row, chunk * 16),
                  valid ? x + base + k_off : x, valid);
    }
  };
  const T* __restrict__ w = static_cast<const T*>(a.weight);
  const uint32_t b_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.b));
  auto issue = [&](int kt) {  // tile kt of A and w -> stage kt % 3, one cp.async group
    if (kt < a.k_tiles) {
      issue_a(kt, kt % kStages);
      issue_w(b_smem, w, a.n, a.k, n0, kt, kt % kStages, tid);
    }
    cp_async_commit();
  };

  // The norm prologue: this thread's own chunks of A tile kt (those issue_a copied: chunk
  // tid % 8, features f .. f + 7 of one norm group (G a multiple of 8), of rows tid / 8 + 32 j),
  // normalized in place once its cp.async group has landed, in fp32 as the statistics kernel's
  // write path / Qwen2RMSNorm; zero-filled chunks (past K or M) stay zero.
  const bool norm = a.norm_rstd != nullptr;
  const T* __restrict__ gamma = static_cast<const T*>(a.norm_weight);
  const T* __restrict__ beta = static_cast<const T*>(a.norm_bias);
  auto normalize_a = [&](int kt) {
    const int chunk = tid & 7, f = kt * kBlockK + chunk * 8;
    if (f >= a.k) return;
    const int grp = f / a.norm_group_size, fg = f - grp * a.norm_group_size;
    alignas(16) T g[8], be[8];  // gamma / beta of group features fg .. fg + 7 (16 bytes)
    using Vec = uint4;
    if (gamma != nullptr) *reinterpret_cast<Vec*>(g) = *reinterpret_cast<const Vec*>(gamma + fg);
    if (beta != nullptr) *reinterpret_cast<Vec*>(be) = *reinterpret_cast<const Vec*>(beta + fg);
#pragma unroll
    for (int j = 0; j < kBlockM / 32; ++j) {
      const int row = (tid >> 3) + 32 * j;
      if (s.row_base[row] < 0) continue;  // past M: zero-filled, never stored
      const int64_t stat = (m0 + row) * a.norm_groups + grp;
      const float mean = a.norm_rms ? 0.f : a.norm_mean[stat], rstd = a.norm_rstd[stat];
      const uint32_t addr =
          a_smem + (kt % kStages) * kStageBytes + sw128_offset(row, chunk * 16);
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
      T* e = reinterpret_cast<T*>(&v);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        float y;
        if (a.norm_rms) {  // weight * (x * rstd).to(dtype), the product rounded again
          y = static_cast<float>(T(static_cast<float>(e[t]) * rstd));
          if (gamma != nullptr) y *= static_cast<float>(g[t]);
        } else {  // the shuffle + LayerNorm kernel's write path, rounding for rounding
          y = layer_norm_value(static_cast<float>(e[t]), mean, rstd, gamma != nullptr,
                               gamma != nullptr ? static_cast<float>(g[t]) : 1.f,
                               beta != nullptr, beta != nullptr ? static_cast<float>(be[t]) : 0.f);
        }
        e[t] = T(y);
      }
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
                   ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
    }
  };

  TiledMma<T> mma;
  Tensor sA = make_tensor(make_smem_ptr(s.a), SmemLayout<T, kStages>{});  // (128, 64, 3)
  Tensor sB = make_tensor(make_smem_ptr(s.b), SmemLayout<T, kStages>{});  // (128, 64, 3)
  auto thr = mma.get_thread_slice(tid);
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // descriptors (MMA, MMA_M, MMA_K, 3)
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));  // descriptors (MMA, MMA_N, MMA_K, 3)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // fp32 (64 / thr)
  clear(acc);

  // Main loop: wgmma on tile kt while tile kt + 2 streams into the stage wgmma kt - 1 read (and,
  // with the norm, this thread's chunks of tile kt + 1 are normalized: a stage wgmma kt does not
  // read). Generic-proxy writes (the normalized chunks) -> fence -> barrier -> wgmma.
  issue(0);
  issue(1);
  cp_async_wait<1>();  // group 0: tile 0
  if (norm) normalize_a(0);
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
  for (int kt = 0; kt < a.k_tiles; ++kt) {
    const int stage = kt % kStages;
    warpgroup_fence_operand(acc);
    mma_tile(mma, tCrA, tCrB, acc, stage, stage, kt, a.k);
    issue(kt + 2);  // wgmma kt - 1 completed before the barrier that ended iteration kt - 1
    cp_async_wait<1>();  // every group but the newest: this thread's copies of tile kt + 1
    if (norm && kt + 1 < a.k_tiles) normalize_a(kt + 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
  }

  store_tile<T>(acc, thr, m0, n0,
                TileOut{a.bias, 0, a.out, 0, a.n, a.m, a.m, a.n, a.pair_stores, a.table,
                        a.tap_index, a.tap_weight});
}

}  // namespace shuffle_gemm_detail

template <GemmDtype kDtype>
cudaError_t ShuffleGemmVariant<kDtype>::run(const ShuffleGemmArgs& a, cudaStream_t stream) {
  using namespace shuffle_gemm_detail;
  using T = typename Elem<kDtype>::T;
  const int64_t m_tiles = (a.m + kBlockM - 1) / kBlockM;
  // n fastest: the CTAs of one row tile run together and share its A rows in L2
  return launch(&shuffle_gemm_kernel<kDtype>, sizeof(SharedStorage<T>) + 1024,
                m_tiles * a.n_tiles, a, stream);
}

}  // namespace vlmkern
