// Implicit-GEMM weight gradient of the patch embedding for Hopper (sm_90a): a CTA computes one
// 128 (patch feature f) x 128 (output feature n) tile of dW^T = X^T G over one split of the M
// token rows, 64 rows per k tile, with two warpgroups of wgmma whose operands are both MN-major
// (f, resp. n, contiguous) 128-byte swizzled shared tiles. X^T: every thread gathers its two
// features (f, f + 1) of 16 rows from the pixels into registers one tile ahead (the forward's
// element order, normalized in fp32 and rounded like the forward's conv input) and stores them
// while the previous tile's wgmma runs; G: 16-byte cp.async chunks of 8 features of a row, three
// tiles deep. Row offsets (pixels, G) come from a small per-tile table, filled three tiles ahead.
// The fp32 partial tile goes to ws[split]; the caller sums the splits.
// Include only from cuda/instantiations/patch_wgrad_*.cu (CuTe headers, sm_90a only).
#pragma once

#include <cstdint>

#include "cuda/kernels/patch_gemm.cuh"
#include "cuda/patch_wgrad.h"

namespace vlmkern {
namespace patch_wgrad_detail {

using namespace wgmma_gemm;
using patch_gemm_detail::Elem;
using patch_gemm_detail::Gemm;
constexpr int kStagesX = 2, kStagesG = 3, kTabs = 3;
constexpr int kRowsPerThread = kBlockK / (kThreads / 64);  // 16: 64 rows over 4 thread groups

template <class T>
struct MnAtom;  // 64 x 128 x 16, fp32 accumulation, both operands MN-major
template <>
struct MnAtom<cutlass::half_t> {
  using type = cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::MN, cute::GMMA::Major::MN>;
};
template <>
struct MnAtom<cutlass::bfloat16_t> {
  using type = cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::MN, cute::GMMA::Major::MN>;
};

// (128 f or n, 64 rows, kStages), 64 features x 8 rows SW128 atoms (features contiguous).
template <class T, int kStages>
using MnLayout = decltype(cute::tile_to_shape(
    cute::GMMA::Layout_MN_SW128_Atom<T>{},
    cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kBlockK>{}, cute::Int<kStages>{})));

// Byte offset of element (f, row) of one MN-major SW128 stage (16-bit elements): 64-feature x
// 8-row atoms of 1024 bytes, features-blocks 1024 bytes apart, row-blocks 2048; the 16-byte
// chunk index XOR the row within the atom (CuTe's GMMA::Layout_MN_SW128_Atom tiled to (128, 64)
// on a 1024-byte aligned base; checked on the host).
__host__ __device__ constexpr uint32_t mn_sw128_offset(int f, int row) {
  return static_cast<uint32_t>((f >> 6) * 1024 + (row >> 3) * 2048 + (row & 7) * 128 +
                               (((f & 63) * 2) ^ ((row & 7) << 4)));
}

template <class T>
struct SharedStorage {
  alignas(1024) T x[kStagesX * kBlockM * kBlockK];  // X^T (128 f, 64 rows, 2)
  alignas(1024) T g[kStagesG * kBlockN * kBlockK];  // G^T (128 n, 64 rows, 3)
  int64_t pix_row[kTabs][kBlockK];  // pixel offset of each row's patch origin, -1 past the split
  int64_t grad_row[kTabs][kBlockK];  // G offset of each row, -1 past the split
};

// A 16-bit GEMM element as float (raw bits of T), or uint8 as float.
template <class T, class In>
__device__ __forceinline__ float to_float(In v) {
  if constexpr (std::is_same_v<In, uint8_t>) {
    return static_cast<float>(v);
  } else {
    return static_cast<float>(T::bitcast(v));
  }
}

template <PatchifyDtype kIn, PatchifyDtype kOut>
__global__ void __launch_bounds__(kThreads, 2) patch_wgrad_kernel(PatchWgradArgs a) {
  using namespace cute;
  using T = typename Gemm<kOut>::T;
  using In = typename Elem<kIn>::type;
  extern __shared__ char smem_raw[];
  auto& s = aligned_smem<SharedStorage<T>>(smem_raw);

  const int tid = threadIdx.x;
  const int n_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_tiles));
  const int rest = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.n_tiles));
  const int f_tile = rest % a.kf_tiles, split = rest / a.kf_tiles;
  const int f0 = f_tile * kBlockM, n0 = n_tile * kBlockN;
  const int64_t m_begin = split * a.m_chunk;
  const int64_t m_end = m_begin + a.m_chunk < a.m ? m_begin + a.m_chunk : a.m;
  const int kts = m_end > m_begin ? static_cast<int>((m_end - m_begin + kBlockK - 1) / kBlockK) : 0;

  // The thread's features f0 + 2 p, + 1 (fixed for the CTA) and rows group + 4 r of each tile.
  const int p = tid & 63, group = tid >> 6;
  int off[2];
  float scale[2], offset[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int f = f0 + 2 * p + e;
    off[e] = -1;
    scale[e] = 1.f;
    offset[e] = 0.f;
    if (f < a.k) {
      int ch;
      off[e] = patch_feature_offset(f, a.channels, a.patch, a.channels_last, a.stride_c,
                                    a.stride_h, a.stride_w, &ch);
      if (a.normalize) {
        scale[e] = a.scale[ch];
        offset[e] = a.offset[ch];
      }
    }
  }
  const bool pair = a.pair_loads && off[0] >= 0 && off[1] == off[0] + 1 && (off[0] & 1) == 0;

  auto fill_tab = [&](int t) {  // rows of tile t -> table t % 3 (threads 0..63)
    if (tid < kBlockK) {
      const int64_t m = m_begin + static_cast<int64_t>(t) * kBlockK + tid;
      int64_t pix = -1, grd = -1;
      if (m < m_end) {
        const PatchRow r = patch_row(m, a.l, a.gw, a.patch, a.stride_b, a.stride_h, a.stride_w);
        pix = r.base;
        grd = r.b * a.g_batch_stride + r.l * a.g_row_stride;
      }
      s.pix_row[t % kTabs][tid] = pix;
      s.grad_row[t % kTabs][tid] = grd;
    }
  };

  const In* __restrict__ pixels = static_cast<const In*>(a.pixels);
  using Pair = std::conditional_t<sizeof(In) == 1, uint16_t, uint32_t>;
  constexpr int kBits = 8 * sizeof(In);
  Pair regs[kRowsPerThread];  // the next X tile as loaded, features (f, f + 1) packed low / high
  auto load_x = [&](int t) {
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int64_t base = s.pix_row[t % kTabs][group + 4 * r];
      if (pair && base >= 0) {
        regs[r] = *reinterpret_cast<const Pair*>(pixels + base + off[0]);
      } else {
        const In lo = (base >= 0 && off[0] >= 0) ? pixels[base + off[0]] : In(0);
        const In hi = (base >= 0 && off[1] >= 0) ? pixels[base + off[1]] : In(0);
        regs[r] = static_cast<Pair>(lo | (static_cast<Pair>(hi) << kBits));
      }
    }
  };
  Tensor sX = make_tensor(make_smem_ptr(s.x), MnLayout<T, kStagesX>{});  // (128 f, 64 rows, 2)
  Tensor sG = make_tensor(make_smem_ptr(s.g), MnLayout<T, kStagesG>{});  // (128 n, 64 rows, 3)
  const uint32_t x_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.x));
  const uint32_t g_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.g));
  auto store_x = [&](int stage) {  // features (2 p, 2 p + 1) are adjacent in the MN-major tile
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      uint32_t bits[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // x * scale - offset, two roundings as the CPU path
        const In v = static_cast<In>(regs[r] >> (e * kBits));
        const auto norm = [&] {
          return T(__fsub_rn(__fmul_rn(to_float<T>(v), scale[e]), offset[e])).raw();
        };
        if constexpr (std::is_same_v<In, uint8_t>) {
          bits[e] = norm();
        } else {  // already the GEMM dtype: exact unless normalized
          bits[e] = a.normalize ? norm() : static_cast<uint32_t>(v);
        }
      }
      const uint32_t addr = x_smem + stage * kStageBytes + mn_sw128_offset(2 * p, group + 4 * r);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(bits[0] | (bits[1] << 16)));
    }
  };
  const T* __restrict__ grad = static_cast<const T*>(a.grad);
  auto issue_g = [&](int t) {  // G tile t -> stage t % 3: chunk tid % 16 of rows tid / 16 + 16 j
    const int chunk = tid & 15, n = n0 + chunk * 8;
#pragma unroll
    for (int j = 0; j < kBlockK / 16; ++j) {
      const int row = (tid >> 4) + 16 * j;
      const int64_t gb = s.grad_row[t % kTabs][row];
      const bool valid = gb >= 0 && n < a.d;
      cp_async_16(g_smem + (t % kStagesG) * kStageBytes + mn_sw128_offset(chunk * 8, row),
                  valid ? grad + gb + n : grad, valid);
    }
  };

  using Mma = decltype(make_tiled_mma(typename MnAtom<T>::type{}, Layout<Shape<_2, _1, _1>>{}));
  Mma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sX));  // descriptors (MMA, MMA_M, MMA_K, 2)
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sG));  // descriptors (MMA, MMA_N, MMA_K, 3)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // fp32 (64 / thr)
  clear(acc);

  if (kts > 0) {
    for (int t = 0; t < kTabs && t < kts; ++t) fill_tab(t);
    __syncthreads();
    issue_g(0);
    cp_async_commit();
    if (kts > 1) issue_g(1);
    cp_async_commit();
    load_x(0);
    store_x(0);
    if (kts > 1) load_x(1);
    cp_async_wait<1>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    for (int t = 0; t < kts; ++t) {
      const int sx = t & 1, sg = t % kStagesG;
      warpgroup_fence_operand(acc);
      mma_steps<kBlockK / 16>(mma, tCrA, tCrB, acc, sx, sg);  // rows past the split are zero
      if (t + 1 < kts) store_x(sx ^ 1);  // registers hold tile t + 1; its buffer is free
      if (t + 2 < kts) {  // tables of t + 2 were filled at least one barrier ago
        load_x(t + 2);
        issue_g(t + 2);  // the stage wgmma t - 1 read (it has completed)
      }
      cp_async_commit();
      if (t + 3 < kts) fill_tab(t + 3);  // table t % 3: its last readers ran in iteration t - 2
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      cp_async_wait<1>();  // every group but the newest: tile t + 1 of G
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
    }
  }

  // fp32 partial tile -> ws[split] (kp, D): (i, i + 1) are features n, n + 1 of one f row.
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  float* ws = a.ws + static_cast<int64_t>(split) * a.kp * a.d;
#pragma unroll
  for (int i = 0; i < size(acc); i += 2) {
    const int f = f0 + get<0>(coord(i)), n = n0 + get<1>(coord(i));
    if (f < a.kp && n < a.d) {  // D is a multiple of 8: n + 1 < D too
      *reinterpret_cast<float2*>(ws + static_cast<int64_t>(f) * a.d + n) =
          make_float2(acc(i), acc(i + 1));
    }
  }
}

}  // namespace patch_wgrad_detail

template <PatchifyDtype kIn, PatchifyDtype kOut>
cudaError_t PatchWgradVariant<kIn, kOut>::run(const PatchWgradArgs& a, cudaStream_t stream) {
  using namespace patch_wgrad_detail;
  using T = typename Gemm<kOut>::T;
  return launch(&patch_wgrad_kernel<kIn, kOut>, sizeof(SharedStorage<T>) + 1024,
                static_cast<int64_t>(a.n_tiles) * a.kf_tiles * a.splits, a, stream);
}

}  // namespace vlmkern
