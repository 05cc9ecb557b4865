// Building blocks of our Hopper (sm_90a) gather GEMMs, out = gather(A) @ W^T + addend, whose A
// rows are assembled by the kernel itself (kernels/patch_gemm.cuh: pixels -> patch rows;
// kernels/shuffle_gemm.cuh: pixel-shuffled token rows): 128 x 128 x 64 tiles on two warpgroups
// (CuTe's SM90 GMMA atoms, fp32 accumulation, both operands in 128-byte swizzled K-major shared
// tiles), cp.async helpers, the W tile copy, and the epilogue that adds an addend and writes rows
// at batch / row strides. Include only from cuda/instantiations/*.cu (CuTe headers, sm_90a).
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cstdint>
#include <cute/tensor.hpp>
#include <type_traits>

namespace vlmkern::wgmma_gemm {

constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 64;
constexpr int kThreads = 256;  // two warpgroups, one per 64 rows of the tile
constexpr int kStageBytes = kBlockM * kBlockK * 2;  // one (128, 64) 16-bit tile
static_assert(kBlockM == kBlockN, "A and W stages share one shared-memory layout");

// The GEMM element type's wgmma atom: 64 x 128 x 16, fp32 accumulation, K-major A and B.
template <class T>
struct Atom;
template <>
struct Atom<cutlass::half_t> {
  using type = cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};
template <>
struct Atom<cutlass::bfloat16_t> {
  using type = cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};

// Two warpgroups along M, each a 64 x 128 slab of the tile.
template <class T>
using TiledMma = decltype(cute::make_tiled_mma(typename Atom<T>::type{},
                                               cute::Layout<cute::Shape<cute::_2, cute::_1,
                                                                        cute::_1>>{}));

// (128 rows, 64 k, kStages) in 8-row x 64-k SW128 atoms: the layout wgmma's descriptors expect.
template <class T, int kStages>
using SmemLayout = decltype(cute::tile_to_shape(
    cute::GMMA::Layout_K_SW128_Atom<T>{},
    cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kBlockK>{}, cute::Int<kStages>{})));

// Byte offset of element (row, k) (k even: the pair k, k + 1) in one SW128 K-major stage: rows
// of 128 bytes in 8-row 1024-byte atoms, the 16-byte chunk index XOR the row within the atom
// (CuTe's GMMA::Layout_K_SW128_Atom on a 1024-byte aligned base; checked on the host).
__device__ __forceinline__ uint32_t sw128_offset(int row, int k_bytes) {
  return static_cast<uint32_t>((row >> 3) * 1024 + (row & 7) * 128 +
                               ((((k_bytes >> 4) ^ (row & 7))) << 4) + (k_bytes & 15));
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

// The dynamic shared base is 16-byte aligned; SW128 tiles need 1024 (launchers add 1 KiB slack).
template <class Storage>
__device__ __forceinline__ Storage& aligned_smem(char* raw) {
  return *reinterpret_cast<Storage*>((reinterpret_cast<uintptr_t>(raw) + 1023) &
                                     ~uintptr_t{1023});
}

// W tile kt (128 rows n0.., 64 k) -> stage `stage` at smem address `base` by cp.async: w (D, kp)
// contiguous; thread tid copies chunk tid % 8 of rows tid / 8 + 32 j; zero past D or kp.
template <class T>
__device__ __forceinline__ void issue_w(uint32_t base, const T* __restrict__ w, int64_t d, int kp,
                                        int n0, int kt, int stage, int tid) {
  const int chunk = tid & 7, k = kt * kBlockK + chunk * 8;
#pragma unroll
  for (int j = 0; j < kBlockN / 32; ++j) {
    const int row = (tid >> 3) + 32 * j, n = n0 + row;
    const bool valid = n < d && k < kp;
    const T* src = valid ? w + static_cast<int64_t>(n) * kp + k : w;
    cp_async_16(base + stage * kStageBytes + sw128_offset(row, chunk * 16), src, valid);
  }
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

// The k16 steps of tile kt that reach real columns (< kp): 4, fewer in a last partial tile.
template <class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void mma_tile(Mma& mma, const FragA& a, const FragB& b, Acc& acc,
                                         int sa, int sb, int kt, int kp) {
  const int steps = min(kBlockK / 16, (kp - kt * kBlockK + 15) / 16);
  switch (steps) {
    case 1: mma_steps<1>(mma, a, b, acc, sa, sb); break;
    case 2: mma_steps<2>(mma, a, b, acc, sa, sb); break;
    case 3: mma_steps<3>(mma, a, b, acc, sa, sb); break;
    default: mma_steps<4>(mma, a, b, acc, sa, sb); break;
  }
}

// Where the epilogue writes: row m = b * l + r of the M rows goes to out + b * out_batch_stride +
// r * out_row_stride (unit column stride), plus addend[r * addend_row_stride + n] (row stride 0:
// a (D,) bias; nullptr: none). With a table, row m instead adds
// T(T(sum_k table[tap_index[k*M + m]][n] * tap_weight[k*M + m]) + addend[n]) (Qwen3-VL's
// bilinear positions + bias, cuda/kernels/position_rows.cuh's function; addend optional).
struct TileOut {
  const void* addend;
  int64_t addend_row_stride;
  void* out;
  int64_t out_batch_stride, out_row_stride;
  int64_t m, l;
  int d;
  int pair_stores;  // every row start 4-byte aligned: two-element stores
  const void* table = nullptr;         // (S*S, d) contiguous, or nullptr
  const int64_t* tap_index = nullptr;  // (4, M)
  const float* tap_weight = nullptr;   // (4, M)
};

// One row's four bilinear taps: table rows and fp32 weights.
template <class T>
struct Taps {
  const T* row[4];
  float w[4];
};

// The position + bias addend of column n for one row's taps: the taps summed in fp32 in tap
// order, rounded to T, plus the bias in fp32, rounded to T (the (N, D) addend's rounding).
template <class T>
__device__ __forceinline__ float tap_addend(const Taps<T>& t, const T* bias, int n) {
  float p = static_cast<float>(t.row[0][n]) * t.w[0];
  p += static_cast<float>(t.row[1][n]) * t.w[1];
  p += static_cast<float>(t.row[2][n]) * t.w[2];
  p += static_cast<float>(t.row[3][n]) * t.w[3];
  float v = static_cast<float>(T(p));
  if (bias != nullptr) v = static_cast<float>(T(v + static_cast<float>(bias[n])));
  return v;
}

// Adds the addend in fp32 to the tile's accumulators, rounds once to T and stores. A thread's
// accumulators cover two tile rows, r0 and r0 + 8 (GMMA's C layout), and (i, i + 1) are columns
// n, n + 1 of one row: the (b, r) divisions are done once per row.
template <class T, class Acc, class Thr>
__device__ __forceinline__ void store_tile(const Acc& acc, const Thr& thr, int64_t m0, int n0,
                                           const TileOut& e) {
  using namespace cute;
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  const int r0 = get<0>(coord(0));
  const T* __restrict__ table = static_cast<const T*>(e.table);
  int64_t out_row[2], add_row[2];
  bool live[2];
  Taps<T> taps[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t m = m0 + r0 + 8 * h;
    const int64_t b = m / e.l, r = m - b * e.l;
    live[h] = m < e.m;
    out_row[h] = b * e.out_batch_stride + r * e.out_row_stride;
    add_row[h] = r * e.addend_row_stride;
    if (table != nullptr) {  // (4, M) taps of row m; past M the first table row, weight 0
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        taps[h].row[k] = table + (live[h] ? e.tap_index[k * e.m + m] : 0) * e.d;
        taps[h].w[k] = live[h] ? e.tap_weight[k * e.m + m] : 0.0f;
      }
    }
  }
  const T* __restrict__ addend = static_cast<const T*>(e.addend);
  T* __restrict__ out = static_cast<T*>(e.out);
#pragma unroll
  for (int i = 0; i < size(acc); i += 2) {
    const int h = get<0>(coord(i)) == r0 ? 0 : 1;
    const int n = n0 + get<1>(coord(i));
    if (!live[h] || n >= e.d) continue;
    const bool both = n + 1 < e.d;
    float v0 = acc(i), v1 = acc(i + 1);
    if (table != nullptr) {
      v0 += tap_addend(taps[h], addend, n);
      if (both) v1 += tap_addend(taps[h], addend, n + 1);
    } else if (addend != nullptr) {
      const T* add = addend + add_row[h] + n;
      v0 += static_cast<float>(add[0]);
      if (both) v1 += static_cast<float>(add[1]);
    }
    T* dst = out + out_row[h] + n;
    if (both && e.pair_stores) {
      const uint32_t bits = uint32_t{T(v0).raw()} | (uint32_t{T(v1).raw()} << 16);
      *reinterpret_cast<uint32_t*>(dst) = bits;
    } else {
      dst[0] = T(v0);
      if (both) dst[1] = T(v1);
    }
  }
}

// Sets the kernel's dynamic smem limit (per call: the attribute belongs to the current device; a
// host call, never captured) and launches `blocks` CTAs of kThreads on `stream`.
template <class Kernel, class Args>
cudaError_t launch(Kernel* kernel, size_t smem, int64_t blocks, const Args& args,
                   cudaStream_t stream) {
  const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (attr != cudaSuccess) return attr;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (blocks == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace vlmkern::wgmma_gemm
