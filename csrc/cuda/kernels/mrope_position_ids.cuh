// Device code for mrope_position_ids: one CTA per row, one contiguous chunk of the row per thread.
// The per-chunk passes are those of common/mrope_position_ids_core.h (shared with the CPU path);
// here they are composed with CTA-wide exclusive scans. No ATen/torch includes.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/mrope_position_ids_core.h"

namespace vlmkern {

constexpr int kMropeThreads = 256;  // threads (= chunks) per row
constexpr int kMropeWarps = kMropeThreads / 32;
static_assert(kMropeThreads % 32 == 0 && kMropeThreads <= 1024, "whole warps per CTA");

// Warp shuffle of a struct made of int64 fields, one 64-bit word at a time.
template <typename T>
__device__ __forceinline__ T mrope_shfl_up(const T& v, int delta) {
  static_assert(sizeof(T) % 8 == 0, "int64 fields only");
  constexpr int kWords = sizeof(T) / 8;
  long long w[kWords];  // (kWords,) registers
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_up_sync(0xffffffffu, w[i], delta);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// vals: (kMropeThreads,) smem, one summary per chunk, written by the caller. Afterwards vals[i]
// holds the exclusive prefix (combine of chunks 0..i-1) and *total the combine of all chunks.
// Warp 0 scans: 8 chunks per lane sequentially, then a shuffle scan across lanes. Call from all
// threads (it synchronizes the CTA before and after).
template <typename T>
__device__ void mrope_block_exclusive_scan(T* vals, T* total, const T identity) {
  constexpr int kPerLane = kMropeThreads / 32;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    T acc = identity;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc = mrope::combine(acc, vals[lane * kPerLane + j]);
    T inc = acc;  // inclusive prefix over lanes 0..lane
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const T other = mrope_shfl_up(inc, d);
      if (lane >= d) inc = mrope::combine(other, inc);
    }
    T run = mrope_shfl_up(inc, 1);
    if (lane == 0) run = identity;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const T v = vals[lane * kPerLane + j];
      vals[lane * kPerLane + j] = run;
      run = mrope::combine(run, v);
    }
    if (lane == 31) *total = inc;
  }
  __syncthreads();
}

// Sum (kMax = false) or max (kMax = true) of one int64 per thread, returned to every thread.
// red: (kMropeWarps,) smem scratch.
template <bool kMax>
__device__ int64_t mrope_block_reduce(int64_t v, int64_t* red) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const int64_t o = __shfl_down_sync(0xffffffffu, v, d);
    v = kMax ? (o > v ? o : v) : v + o;
  }
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kMropeWarps; ++w) v = kMax ? (red[w] > v ? red[w] : v) : v + red[w];
  return v;
}

// Tokens [lo, hi) of the row: thread i owns chunk i of ceil(S / kMropeThreads) tokens.
__device__ __forceinline__ void mrope_chunk(const mrope::Args& a, int64_t* lo, int64_t* hi) {
  const int64_t len = (a.seq + kMropeThreads - 1) / kMropeThreads;
  const int64_t l = static_cast<int64_t>(threadIdx.x) * len;
  *lo = l < a.seq ? l : a.seq;
  *hi = *lo + len < a.seq ? *lo + len : a.seq;
}

// Passes A and B with their scans: leaves per-chunk exclusive prefixes in sa / sb and the row
// totals in *ta / *tb.
template <typename K>
__device__ __forceinline__ void mrope_scan_ab(const K& kind, int64_t b, int64_t lo, int64_t hi,
                                              mrope::ScanA* sa, mrope::ScanB* sb,
                                              mrope::ScanA* ta, mrope::ScanB* tb) {
  sa[threadIdx.x] = mrope::pass_a(kind, b, lo, hi);
  mrope_block_exclusive_scan(sa, ta, mrope::identity_a());
  sb[threadIdx.x] = mrope::pass_b(kind, b, lo, hi, sa[threadIdx.x]);
  mrope_block_exclusive_scan(sb, tb, mrope::identity_b());
}

// grid (B,), block (kMropeThreads,). counts: (B, 2) int64 out: image / video blocks per row.
// K: mrope::Kinds<token bytes, mask bytes>, reads tokens (B, S) and attention_mask (B, S).
template <typename K>
__global__ void __launch_bounds__(kMropeThreads)
    mrope_position_ids_count_kernel(const mrope::Args a, const K kind,
                                    int64_t* __restrict__ counts) {
  __shared__ mrope::ScanA sa[kMropeThreads];  // (kMropeThreads,) smem
  __shared__ mrope::ScanB sb[kMropeThreads];  // (kMropeThreads,) smem
  __shared__ mrope::ScanA ta;
  __shared__ mrope::ScanB tb;
  const int64_t b = blockIdx.x;
  int64_t lo, hi;
  mrope_chunk(a, &lo, &hi);
  mrope_scan_ab(kind, b, lo, hi, sa, sb, &ta, &tb);
  if (threadIdx.x == 0) {
    counts[2 * b] = tb.starts[0];
    counts[2 * b + 1] = tb.starts[1];
  }
}

// grid (B,), block (kMropeThreads,). counts: (B, 2) int64 from the count kernel.
// Writes a.pos (3, B, S) and a.deltas (B, 1); an inconsistent row gets -1 positions, delta 0.
template <typename K>
__global__ void __launch_bounds__(kMropeThreads)
    mrope_position_ids_write_kernel(const mrope::Args a, const K kind,
                                    const int64_t* __restrict__ counts) {
  __shared__ mrope::ScanA sa[kMropeThreads];  // (kMropeThreads,) smem
  __shared__ mrope::ScanB sb[kMropeThreads];  // (kMropeThreads,) smem
  __shared__ mrope::ScanC sc[kMropeThreads];  // (kMropeThreads,) smem
  __shared__ mrope::ScanA ta;
  __shared__ mrope::ScanB tb;
  __shared__ mrope::ScanC tc;
  __shared__ int64_t red[kMropeWarps];  // (kMropeWarps,) smem
  __shared__ int bad_row;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) bad_row = 0;
  int64_t lo, hi;
  mrope_chunk(a, &lo, &hi);
  mrope_scan_ab(kind, b, lo, hi, sa, sb, &ta, &tb);

  // Blocks of each modality in rows 0..b-1: where this row starts in the grid lists.
  int64_t own[2] = {0, 0};
  for (int64_t r = threadIdx.x; r < b; r += kMropeThreads) {
    own[0] += counts[2 * r];
    own[1] += counts[2 * r + 1];
  }
  int64_t offset[2];
  offset[0] = mrope_block_reduce<false>(own[0], red);
  offset[1] = mrope_block_reduce<false>(own[1], red);

  mrope::ChunkIn in{sa[threadIdx.x], sb[threadIdx.x], {offset[0], offset[1]}, 0};
  sc[threadIdx.x] = mrope::pass_c(a, kind, b, lo, hi, in);
  mrope_block_exclusive_scan(sc, &tc, mrope::identity_c());
  in.p = sc[threadIdx.x].advance;

  mrope::RowError err{mrope::kOk, 0, 0, 0, 0, 0};
  const int64_t best = mrope::pass_d(a, kind, b, lo, hi, in, &err);
  if (err.code != mrope::kOk) atomicOr(&bad_row, 1);
  const int64_t row_max = mrope_block_reduce<true>(best, red);
  if (threadIdx.x == 0) {
    mrope::RowError last{mrope::kOk, 0, 0, 0, 0, 0};
    mrope::finish_row(a, b, ta, tb, offset, row_max, &last);
    if (last.code != mrope::kOk) atomicOr(&bad_row, 1);
  }
  __syncthreads();
  if (bad_row != 0) {
    const mrope::RowOut out(a, b);
    for (int64_t s = lo; s < hi; ++s) out.store(s, -1, -1, -1);
    if (threadIdx.x == 0) a.deltas[b] = 0;
  }
}

}  // namespace vlmkern
