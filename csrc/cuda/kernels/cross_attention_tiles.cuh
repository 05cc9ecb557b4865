// Building blocks of the CUDA cross-attention forward (cross_attention_fwd.cuh): sm_80+ PTX
// wrappers (mma.sync m16n8k16 with fp32 accumulation, ldmatrix, cp.async with zero fill), the
// global -> shared tile copy, and the per-row key visibility of one 64-key tile as a bit mask.
// No ATen/torch includes.
//
// Fragment layout of mma.m16n8k16 (lane = 4 * g + t, g = lane / 4 in 0..7, t = lane % 4):
//   A (16 x 16, row-major) regs a0..a3: (row g, cols 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..),
//     (g + 8, 2t + 8..);  B (16 x 8, "col-major") b0, b1: (k rows 2t..2t+1, col g), (2t + 8.., g);
//   C (16 x 8) fp32 c0..c3: (row g, cols 2t, 2t + 1), (row g + 8, cols 2t, 2t + 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/cross_attention.h"

namespace vlmkern::xattn_cuda {

constexpr int kBlockM = 64;    // query rows per CTA (4 warps x 16); forward: 16 x kWarps
constexpr int kBlockN = 64;    // keys per K/V tile
constexpr int kThreads = 128;  // 4 warps; forward: 32 x kWarps

// Row pitch (elements) of a (rows, kHeadDimPad) smem tile: +8 elements (16 bytes) so the 8 rows an
// ldmatrix reads fall on 8 distinct 16-byte bank groups (pitch / 16 bytes is odd for every pad).
template <int kHeadDimPad>
constexpr int smem_pitch() {
  return kHeadDimPad + 8;
}

// Dynamic smem of the forward: Q (kRows, pitch) + 2 stages of K and V (kBlockN, pitch), all T.
template <typename T, int kHeadDimPad, int kRows>
constexpr int smem_bytes() {
  return (kRows + 4 * kBlockN) * smem_pitch<kHeadDimPad>() * static_cast<int>(sizeof(T));
}

// Whether the forward's tile copies (load_tile_async) split into whole 16-byte chunks per thread
// for CTAs of kWarps warps: the (16 kWarps, kHeadDimPad) Q tile always does; the (kBlockN,
// kHeadDimPad) K / V tiles need kBlockN * kHeadDimPad / 8 to be a multiple of 32 kWarps (8 warps:
// pads 64, 96 and 128, not 80).
template <int kHeadDimPad, int kWarps>
constexpr bool fwd_tiles_divide() {
  return kBlockN * (kHeadDimPad / 8) % (32 * kWarps) == 0 &&
         16 * kWarps * (kHeadDimPad / 8) % (32 * kWarps) == 0;
}

// ---- PTX wrappers -------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 -> one register of two T (lo in the low half: the lower column of an A fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] its fragment
// (lane holds row lane / 4, elements 2 (lane % 4), +1; transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async copy; src_bytes == 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- global -> shared ---------------------------------------------------------------------------

// dst (kRows, pitch) smem <- rows [0, rows) of src (row stride `row_stride` elements, head dim
// contiguous), columns [0, d); rows >= rows and columns in [d, kHeadDimPad) are zero-filled so
// padded dot products and P V over out-of-range keys add exact zeros. All kCtaThreads threads of
// the CTA call it.
template <typename T, int kRows, int kHeadDimPad, int kCtaThreads = kThreads>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t row_stride,
                                                int rows, int d) {
  constexpr int kChunks = kHeadDimPad / 8;  // 16-byte chunks per row
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  const uint32_t base = smem_addr(dst);
  static_assert(kRows * kChunks % kCtaThreads == 0, "whole 16-byte chunks per thread");
#pragma unroll 1  // unrolled, the addresses are hoisted out of the key loop and spill
  for (int it = 0; it < kRows * kChunks / kCtaThreads; ++it) {
    const int c = it * kCtaThreads + static_cast<int>(threadIdx.x);
    const int r = c / kChunks, ch = c % kChunks;
    const bool in = r < rows && ch * 8 < d;
    const T* s = in ? src + r * row_stride + ch * 8 : src;
    cp_async_16(base + static_cast<uint32_t>((r * kPitch + ch * 8) * sizeof(T)), s, in ? 16 : 0);
  }
}

// ---- visibility ---------------------------------------------------------------------------------

// Bits [lo - j0, hi - j0) of a 64-key tile starting at key j0 (clamped to the tile).
__device__ __forceinline__ uint64_t span_bits(int64_t lo, int64_t hi, int64_t j0) {
  const int64_t a = lo - j0 < 0 ? 0 : (lo - j0 > 64 ? 64 : lo - j0);
  const int64_t b = hi - j0 < 0 ? 0 : (hi - j0 > 64 ? 64 : hi - j0);
  if (a >= b) return 0;
  const uint64_t upto_b = b == 64 ? ~0ull : (1ull << b) - 1;
  return upto_b & ~((1ull << a) - 1);  // a < 64 here
}

__device__ __forceinline__ int64_t read_index(const XattnDevIndex& ix, int64_t off) {
  return ix.is64 ? static_cast<const int64_t*>(ix.data)[off]
                 : static_cast<const int32_t*>(ix.data)[off];
}

// What one query row sees of its sequence's lk keys: the interval [lo, hi) (full, prefix-LM,
// "uniform" dead rows), or the union of its kv_ranges (use_ranges; [lo, hi) is then their hull).
// Range values are clamped to [0, lk] (the CPU path rejects them; CUDA never syncs to check).
struct RowVis {
  int64_t lo = 0, hi = 0;
  int64_t ranges_off = 0;  // element offset of the row's (R, 2) ranges
  bool use_ranges = false;
};

__device__ __forceinline__ void clamp_range(int64_t& lo, int64_t& hi, int64_t lk) {
  lo = lo < 0 ? 0 : (lo > lk ? lk : lo);
  hi = hi < lo ? lo : (hi > lk ? lk : hi);
}

// The window of CTA `cta` over `len` rows (or keys) in tiles of `tile`: batch b and first index
// w0 (grid.x = B * ceil(len / tile), or ceil(total / tile) packed with b = 0), and how many of
// the tile's rows exist (count).
struct Window {
  int64_t b, w0;
  int count;
};

// images > 1 (the forward's images_per_cta; dense input whose len fits one tile): CTA cta holds
// batch rows images * cta onwards, b is the first.
__device__ __forceinline__ Window cta_window(bool packed, int64_t cta, int64_t len, int tile,
                                             int images = 1) {
  Window w{0, cta * tile, 0};
  if (!packed) {
    const int64_t tiles = (len + tile - 1) / tile;
    w.b = cta / tiles * images;
    w.w0 = (cta % tiles) * tile;
  }
  w.count = static_cast<int>(len - w.w0 < tile ? len - w.w0 : tile);
  return w;
}

// Query rows [q_begin, q_end) and keys [k_begin, k_end) of pass `seg`: all of q and k, or with
// cu_seqlens (packed) segment seg's, clamped (a bad cu_seqlens cannot make a kernel read out of
// bounds).
struct SegmentSpan {
  int64_t q_begin, q_end, k_begin, k_end;
};

__device__ __forceinline__ SegmentSpan segment_span(const XattnCudaParams& p, int64_t seg) {
  SegmentSpan s{0, p.seq_q, 0, p.seq_k};
  if (p.packed) {
    s.q_begin = read_index(p.cu_q, seg * p.cu_q.stride[0]);
    s.q_end = read_index(p.cu_q, (seg + 1) * p.cu_q.stride[0]);
    s.k_begin = read_index(p.cu_k, seg * p.cu_k.stride[0]);
    s.k_end = read_index(p.cu_k, (seg + 1) * p.cu_k.stride[0]);
    clamp_range(s.q_begin, s.q_end, p.seq_q);
    clamp_range(s.k_begin, s.k_end, p.seq_k);
  }
  return s;
}

// Row `i` (of lq rows, index `row` into q's S dim, batch b) of sequence `seg` with lk keys.
__device__ __forceinline__ RowVis row_visibility(const XattnCudaParams& p, bool valid, int64_t b,
                                                 int64_t row, int64_t i, int64_t lq, int64_t lk,
                                                 int64_t seg) {
  RowVis v;
  if (!valid) return v;  // not a row of this sequence: sees nothing, never written
  if (p.has_ranges) {
    v.ranges_off = b * p.ranges.stride[0] + row * p.ranges.stride[1];
    int64_t lo = INT64_MAX, hi = 0;
    for (int64_t r = 0; r < p.num_ranges; ++r) {
      const int64_t o = v.ranges_off + r * p.ranges.stride[2];
      int64_t a = read_index(p.ranges, o), e = read_index(p.ranges, o + p.ranges.stride[3]);
      clamp_range(a, e, lk);
      if (a < e) {
        lo = a < lo ? a : lo;
        hi = e > hi ? e : hi;
      }
    }
    if (lo < hi) {
      v.lo = lo;
      v.hi = hi;
      v.use_ranges = true;
    }
  } else if (p.prefix_lm) {
    int64_t pre = read_index(p.prefix, seg * p.prefix.stride[0]);
    pre = pre < 0 ? 0 : (pre > lk ? lk : pre);
    int64_t causal = i + 1 + lk - lq;
    causal = causal > lk ? lk : causal;
    const int64_t end = pre > causal ? pre : causal;
    v.hi = end > 0 ? end : 0;
  } else {
    v.hi = lk;
  }
  if (v.lo >= v.hi && p.uniform_masked_rows) {  // HF: a row that sees nothing sees every key
    v.lo = 0;
    v.hi = lk;
  }
  return v;
}

// Visible keys of the row in tile [j0, j0 + 64) as bits (bit c: key j0 + c).
__device__ __forceinline__ uint64_t tile_bits(const XattnCudaParams& p, const RowVis& v,
                                              int64_t j0, int64_t lk) {
  if (!v.use_ranges) return span_bits(v.lo, v.hi, j0);
  uint64_t bits = 0;
  for (int64_t r = 0; r < p.num_ranges; ++r) {
    const int64_t o = v.ranges_off + r * p.ranges.stride[2];
    int64_t a = read_index(p.ranges, o), e = read_index(p.ranges, o + p.ranges.stride[3]);
    clamp_range(a, e, lk);
    bits |= span_bits(a, e, j0);
  }
  return bits;
}

}  // namespace vlmkern::xattn_cuda
