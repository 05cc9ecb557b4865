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

#include <cutlass/arch/barrier.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cstdint>
#include <cute/tensor.hpp>
#include <type_traits>

#include "cuda/patch_gemm.h"

namespace vlmkern {
namespace patch_gemm_detail {

constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 64;
constexpr int kThreads = 256;   // two warpgroups, one per 64 rows of the tile
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
struct Gemm;  // the GEMM element type and its wgmma atom (fp32 accumulation, K-major A and B)
template <>
struct Gemm<PatchifyDtype::kFloat16> {
  using T = cutlass::half_t;
  using Atom = cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};
template <>
struct Gemm<PatchifyDtype::kBFloat16> {
  using T = cutlass::bfloat16_t;
  using Atom = cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};

template <class T>
using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<T>;  // 8 rows x 64 k, 128-byte swizzle
template <class T, int kStages>
using SmemLayout = decltype(cute::tile_to_shape(
    SmemAtom<T>{}, cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kBlockK>{},
                                    cute::Int<kStages>{})));

template <class T>
struct SharedStorage {
  alignas(1024) T a[kStagesA * kBlockM * kBlockK];  // (128 rows, 64 k, 2): SW128 K-major tiles
  alignas(1024) T b[kStagesB * kBlockN * kBlockK];  // (128 n, 64 k, 3)
  int64_t row_base[kBlockM];  // pixel offset of each tile row's patch origin, -1 past M
  int k_offset[kMaxKp];       // (k_tiles * 64,) in-patch offset of feature k, -1 past K
};

// Byte offset of element (row, k) (k even: the pair k, k + 1) in one SW128 K-major stage: rows
// of 128 bytes in 8-row 1024-byte atoms, the 16-byte chunk index XOR the row within the atom
// (CuTe's GMMA::Layout_K_SW128_Atom on a 1024-byte aligned base).
__device__ __forceinline__ uint32_t sw128_offset(int row, int k_bytes) {
  return static_cast<uint32_t>((row >> 3) * 1024 + (row & 7) * 128 +
                               ((((k_bytes >> 4) ^ (row & 7))) << 4) + (k_bytes & 15));
}

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

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One wgmma batch on stage (sa, sb): arrive, the first kSteps k16 steps of the tile, commit, with
// no branch between the wgmmas (a branch makes ptxas fence every one).
template <int kSteps, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void mma_steps(Mma& mma, const FragA& a, const FragB& b, Acc& acc,
                                          int sa, int sb) {
  using namespace cute;
  warpgroup_arrive();
#pragma unroll
  for (int kb = 0; kb < kSteps; ++kb) gemm(mma, a(_, _, kb, sa), b(_, _, kb, sb), acc);
  warpgroup_commit_batch();
}

template <PatchifyDtype kIn, PatchifyDtype kOut>
__global__ void __launch_bounds__(kThreads, 2) patch_gemm_kernel(PatchGemmArgs a) {
  using namespace cute;
  using T = typename Gemm<kOut>::T;
  using In = typename Elem<kIn>::type;
  using TiledMma = decltype(make_tiled_mma(typename Gemm<kOut>::Atom{},
                                           Layout<Shape<_2, _1, _1>>{}));  // 2 warpgroups on M
  extern __shared__ char smem_raw[];
  // The dynamic shared base is 16-byte aligned; SW128 tiles need 1024 (the launcher adds slack).
  auto& s = *reinterpret_cast<SharedStorage<T>*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_tiles));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(a.n_tiles)) * kBlockM;
  const int n0 = n_tile * kBlockN;

  // ---- tables: in-patch offsets per k, patch origin per tile row -------------------------------
  const int kt_cols = a.k_tiles * kBlockK;
  for (int k = tid; k < kt_cols; k += kThreads) {
    int off = -1;
    if (k < a.k) {
      int ch, i, j;
      if (a.channels_last) {  // k = (i*P + j)*C + ch
        ch = k % a.channels;
        j = (k / a.channels) % a.patch;
        i = k / (a.channels * a.patch);
      } else {  // k = (ch*P + i)*P + j
        j = k % a.patch;
        i = (k / a.patch) % a.patch;
        ch = k / (a.patch * a.patch);
      }
      off = static_cast<int>(ch * a.stride_c + i * a.stride_h + j * a.stride_w);
    }
    s.k_offset[k] = off;
  }
  if (tid < kBlockM) {
    const int64_t m = m0 + tid;  // row m = (b, ph, pw)
    int64_t base = -1;
    if (m < a.m) {
      const int64_t b = m / a.l, rem = m - b * a.l;
      const int64_t ph = rem / a.gw, pw = rem - ph * a.gw;
      base = b * a.stride_b + ph * a.patch * a.stride_h + pw * a.patch * a.stride_w;
    }
    s.row_base[tid] = base;
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
    const int o0 = s.k_offset[kt * kBlockK + 2 * lane], o1 = s.k_offset[kt * kBlockK + 2 * lane + 1];
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
      const uint32_t addr = a_smem + stage * (kBlockM * kBlockK * 2) + sw128_offset(row, 4 * lane);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(bits));
    }
  };
  // w: 128 rows x 8 chunks of 16 bytes per tile; thread -> chunk tid % 8 of rows tid / 8 + 32 j.
  const T* __restrict__ w = static_cast<const T*>(a.w);
  const uint32_t b_smem = static_cast<uint32_t>(__cvta_generic_to_shared(s.b));
  auto issue_b = [&](int kt, int stage) {
    const int chunk = tid & 7, k = kt * kBlockK + chunk * 8;
#pragma unroll
    for (int j = 0; j < kBlockN / 32; ++j) {
      const int row = (tid >> 3) + 32 * j, n = n0 + row;
      const bool valid = n < a.d && k < a.kp;
      const T* src = valid ? w + static_cast<int64_t>(n) * a.kp + k : w;
      cp_async_16(b_smem + stage * (kBlockN * kBlockK * 2) + sw128_offset(row, chunk * 16), src,
                  valid);
    }
  };

  // ---- wgmma views ----------------------------------------------------------------------------
  TiledMma mma;
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
    // k16 steps of this tile: 4, fewer in a last tile past kp (each count a branch-free batch)
    const int steps = min(kBlockK / 16, (a.kp - kt * kBlockK + 15) / 16);
    switch (steps) {
      case 1: mma_steps<1>(mma, tCrA, tCrB, acc, sa, sb); break;
      case 2: mma_steps<2>(mma, tCrA, tCrB, acc, sa, sb); break;
      case 3: mma_steps<3>(mma, tCrA, tCrB, acc, sa, sb); break;
      default: mma_steps<4>(mma, tCrA, tCrB, acc, sa, sb); break;
    }
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

  // ---- epilogue: + addend in fp32, one rounding, pairs of columns per store ---------------------
  // A thread's accumulators cover two tile rows, r0 and r0 + 8 (GMMA's C layout): their (b, l)
  // divisions are done once each.
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  const int r0 = get<0>(coord(0));
  int64_t out_row[2], add_row[2];
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t m = m0 + r0 + 8 * h;
    const int64_t b = m / a.l, l = m - b * a.l;
    live[h] = m < a.m;
    out_row[h] = b * a.out_batch_stride + l * a.out_row_stride;
    add_row[h] = l * a.addend_row_stride;
  }
  const T* __restrict__ addend = static_cast<const T*>(a.addend);
  T* __restrict__ out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < size(acc); i += 2) {  // (i, i + 1): columns n, n + 1 of one row
    const int h = get<0>(coord(i)) == r0 ? 0 : 1;
    const int n = n0 + get<1>(coord(i));
    if (!live[h] || n >= a.d) continue;
    const bool both = n + 1 < a.d;
    float v0 = acc(i), v1 = acc(i + 1);
    if (addend != nullptr) {
      const T* add = addend + add_row[h] + n;
      v0 += static_cast<float>(add[0]);
      if (both) v1 += static_cast<float>(add[1]);
    }
    T* dst = out + out_row[h] + n;
    if (both && a.pair_stores) {
      const uint32_t bits = uint32_t{T(v0).raw()} | (uint32_t{T(v1).raw()} << 16);
      *reinterpret_cast<uint32_t*>(dst) = bits;
    } else {
      dst[0] = T(v0);
      if (both) dst[1] = T(v1);
    }
  }
}

}  // namespace patch_gemm_detail

template <PatchifyDtype kIn, PatchifyDtype kOut>
cudaError_t PatchGemmVariant<kIn, kOut>::run(const PatchGemmArgs& a, cudaStream_t stream) {
  using T = typename patch_gemm_detail::Gemm<kOut>::T;
  constexpr size_t kSmem = sizeof(patch_gemm_detail::SharedStorage<T>) + 1024;  // + alignment
  auto* kernel = &patch_gemm_detail::patch_gemm_kernel<kIn, kOut>;
  // Per call: the attribute belongs to the current device (a host call, never captured).
  const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (attr != cudaSuccess) return attr;
  const int64_t m_tiles = (a.m + patch_gemm_detail::kBlockM - 1) / patch_gemm_detail::kBlockM;
  const int64_t blocks = m_tiles * a.n_tiles;  // n fastest: the CTAs of one row tile share A in L2
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  patch_gemm_detail::patch_gemm_kernel<kIn, kOut>
      <<<static_cast<unsigned>(blocks), patch_gemm_detail::kThreads, kSmem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace vlmkern
