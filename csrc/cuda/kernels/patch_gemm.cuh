// Implicit-GEMM patch embedding for Hopper (sm_90a): out (M, D) = patches (M, K) @ w (D, kp)^T +
// addend, where patches is never written to global memory. Each 128 x 128 output tile is computed
// by two warpgroups (64 rows each) with wgmma (CuTe's SM90 GMMA atoms, both operands in shared
// memory, 128-byte swizzled K-major tiles of 64 k). Every thread gathers its share of the A tile
// (pixels -> the patchify kernel's element order, uint8 converted exactly) into registers one tile
// ahead and stores it to shared memory while the previous tile's wgmma runs; w arrives by
// cp.async, three tiles deep. The epilogue adds the (L, D) addend (bias + positions) in fp32 and
// writes each image's token rows at their batch / row strides (CLS rows skipped by the caller).
// Include only from cuda/instantiations/patch_gemm_*.cu (CuTe headers, sm_90a only).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/kernels/patchify.cuh"
#include "cuda/kernels/wgmma_gemm.cuh"
#include "cuda/patch_gemm.h"

namespace vlmkern {
namespace patch_gemm_detail {

using namespace wgmma_gemm;
constexpr int kStagesA = 2;     // A: registers one tile ahead + two shared buffers
constexpr int kStagesB = 3;     // w: cp.async two tiles ahead
constexpr int kMaxKp = 4096;    // offset table: 16 KiB of shared memory
constexpr int kRowsPerThread = kBlockM / (kThreads / 32);  // 16: a warp fills one row at a time

template <PatchifyDtype D>
struct Elem;  // storage type as loaded (raw bits for 16-bit floats)
template <>
struct Elem<PatchifyDtype::kUInt8> { using type = uint8_t; };
template <>
struct Elem<PatchifyDtype::kFloat16> { using type = uint16_t; };
template <>
struct Elem<PatchifyDtype::kBFloat16> { using type = uint16_t; };

template <PatchifyDtype D>
struct Gemm;  // the GEMM element type
template <>
struct Gemm<PatchifyDtype::kFloat16> { using T = cutlass::half_t; };
template <>
struct Gemm<PatchifyDtype::kBFloat16> { using T = cutlass::bfloat16_t; };

template <class T>
struct SharedStorage {
  alignas(1024) T a[kStagesA * kBlockM * kBlockK];  // (128 rows, 64 k, 2): SW128 K-major tiles
  alignas(1024) T b[kStagesB * kBlockN * kBlockK];  // (128 n, 64 k, 3)
  int64_t row_base[kBlockM];  // pixel offset of each tile row's patch origin, -1 past M
  int k_offset[kMaxKp];       // (k_tiles * 64,) in-patch offset of feature k, -1 past K
};

// 16-bit GEMM element bits of an input element: uint8 -> float -> fp16 / bf16 (exact for 0..255);
// a 16-bit float input already is the GEMM dtype.
template <class T, class In>
__device__ __forceinline__ uint32_t to_bits(In v) {
  if constexpr (std::is_same_v<In, uint8_t>) {
    return static_cast<uint32_t>(T(static_cast<float>(v)).raw());
  } else {
    return static_cast<uint32_t>(v);
  }
}

template <PatchifyDtype kIn, PatchifyDtype kOut>
__global__ void __launch_bounds__(kThreads, 2) patch_gemm_kernel(PatchGemmArgs a) {
  using namespace cute;
  using T = typename Gemm<kOut>::T;
  using In = typename Elem<kIn>::type;
  extern __shared__ char smem_raw[];
  auto& s = aligned_smem<SharedStorage<T>>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_tiles));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(a.n_tiles)) * kBlockM;
  const int n0 = n_tile * kBlockN;

  // ---- tables: in-patch offsets per k, patch origin per tile row -------------------------------
  const int kt_cols = a.k_tiles * kBlockK;
  for (int k = tid; k < kt_cols; k += kThreads) {
    s.k_offset[k] = k < a.k ? patch_feature_offset(k, a.channels, a.patch, a.channels_last,
                                                   a.stride_c, a.stride_h, a.stride_w)
                            : -1;
  }
  if (tid < kBlockM) {
    const int64_t m = m0 + tid;  // row m = (b, ph, pw)
    s.row_base[tid] = m < a.m ? patch_row(m, a.l, a.gw, a.patch, a.stride_b, a.stride_h,
                                          a.stride_w).base
                              : -1;
  }
  __syncthreads();

  // ---- producers ------------------------------------------------------------------------------
  // A: lane -> the k pair (2 lane, 2 lane + 1) of the 64-wide tile; warp -> rows warp + 8 r.
  const In* __restrict__ pixels = static_cast<const In*>(a.pixels);
  In regs[kRowsPerThread][2];  // the next A tile, as loaded
  // Two adjacent source elements (NCHW, P even: every pair of a patch row) take one load of both
  // when every row base is even (a.pair_loads: even strides and base, checked by the launcher).
  using Pair = std::conditional_t<sizeof(In) == 1, uint16_t, uint32_t>;
  auto load_a = [&](int kt) {
    const int o0 = s.k_offset[kt * kBlockK + 2 * lane];
    const int o1 = s.k_offset[kt * kBlockK + 2 * lane + 1];
    const bool pair = a.pair_loads && o0 >= 0 && o1 == o0 + 1 && (o0 & 1) == 0;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int64_t base = s.row_base[warp + 8 * r];
      if (pair && base >= 0) {
        const Pair v = *reinterpret_cast<const Pair*>(pixels + base + o0);
        regs[r][0] = static_cast<In>(v);
        regs[r][1] = static_cast<In>(v >> (8 * sizeof(In)));
      } else {
        regs[r][0] = (base >= 0 && o0 >= 0) ? pixels[base + o0] : In(0);
        regs[r][1] = (base >= 0 && o1 >= 0) ? pixels[base + o1] : In(0);
      }
    }
  };
  const uint32_t a_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.a));
  auto store_a = [&](int stage) {
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = warp + 8 * r;
      const uint32_t bits = to_bits<T>(regs[r][0]) | (to_bits<T>(regs[r][1]) << 16);
      const uint32_t addr = a_smem + stage * kStageBytes + sw128_offset(row, 4 * lane);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(bits));
    }
  };
  const T* __restrict__ w = static_cast<const T*>(a.w);
  const uint32_t b_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.b));
  auto issue_b = [&](int kt, int stage) { issue_w(b_smem, w, a.d, a.kp, n0, kt, stage, tid); };

  // ---- wgmma views ----------------------------------------------------------------------------
  TiledMma<T> mma;
  Tensor sA = make_tensor(make_smem_ptr(s.a), SmemLayout<T, kStagesA>{});  // (128, 64, 2)
  Tensor sB = make_tensor(make_smem_ptr(s.b), SmemLayout<T, kStagesB>{});  // (128, 64, 3)
  auto thr = mma.get_thread_slice(tid);
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // descriptors (MMA, MMA_M, MMA_K, 2)
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));  // descriptors (MMA, MMA_N, MMA_K, 3)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // fp32 (64 / thr)
  clear(acc);

  // ---- main loop: wgmma on tile kt while tile kt + 1's A is stored and kt + 2 is fetched --------
  const int kts = a.k_tiles;
  issue_b(0, 0);
  cp_async_commit();
  if (kts > 1) issue_b(1, 1);
  cp_async_commit();
  load_a(0);
  store_a(0);
  if (kts > 1) load_a(1);
  cp_async_wait<1>();  // tile 0 of w
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> visible to wgmma
  __syncthreads();
  for (int kt = 0; kt < kts; ++kt) {
    const int sa = kt & 1, sb = kt % kStagesB;
    warpgroup_fence_operand(acc);
    mma_tile(mma, tCrA, tCrB, acc, sa, sb, kt, a.kp);
    if (kt + 1 < kts) store_a(sa ^ 1);  // registers hold tile kt + 1; its buffer is free
    if (kt + 2 < kts) {
      load_a(kt + 2);
      issue_b(kt + 2, (kt + 2) % kStagesB);  // the stage wgmma kt - 1 read (it has completed)
    }
    cp_async_commit();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    cp_async_wait<1>();  // every group but the newest: tile kt + 1 of w
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
  }

  // ---- epilogue: + addend in fp32, one rounding, each image's token rows ----------------------
  store_tile<T>(acc, thr, m0, n0,
                TileOut{a.addend, a.addend_row_stride, a.out, a.out_batch_stride, a.out_row_stride,
                        a.m, a.l, a.d, a.pair_stores});
}

}  // namespace patch_gemm_detail

template <PatchifyDtype kIn, PatchifyDtype kOut>
cudaError_t PatchGemmVariant<kIn, kOut>::run(const PatchGemmArgs& a, cudaStream_t stream) {
  using namespace patch_gemm_detail;
  using T = typename Gemm<kOut>::T;
  const int64_t m_tiles = (a.m + kBlockM - 1) / kBlockM;
  // n fastest: the CTAs of one row tile run together and share its pixels in L2
  return launch(&patch_gemm_kernel<kIn, kOut>, sizeof(SharedStorage<T>) + 1024,
                m_tiles * a.n_tiles, a, stream);
}

}  // namespace vlmkern
