// CUDA cross-attention forward, flash-attention 2 style (sm_80+ mma.sync, fp32 accumulation).
//
// One CTA = one q head x one window of kRows = 16 * kMT * kWarps rows of q's S dim; kWarps warps,
// each owning kMT m16 tiles (16 kMT rows): 4 warps / 64 rows by default, 2 warps / 32 rows when
// the glue sees <= 32 rows per (batch, head) (Q-Former / Perceiver learned queries, decode,
// decode GQA rows): then no warp runs on zero rows and, with less smem and fewer registers per
// CTA, an SM can hold more (image, head) CTAs. 8 warps / 128 rows (head-dim pads 64, 96, 128;
// only when VLMKERN_XATTN_BLOCK_M=128 forces it, an unmeasured experiment) stream each K / V
// tile once for twice the rows of the 64-row CTA. 4 warps x 32 rows (kMT = 2, flash-attention
// 2's shape for long sequences; VLMKERN_XATTN_WARP_ROWS=32, unmeasured) also halve the K / V
// fragment loads from smem per mma: each K / V fragment feeds both of the warp's m16 tiles, and
// each row's tile visibility is computed once, by one thread, into smem. The Q tile is loaded
// once into smem (its A fragments re-read by ldmatrix); K / V tiles of kBlockN = 64 keys stream
// through a 2-stage cp.async smem pipeline; S = Q Kᵀ and O += P V run on m16n8k16 tensor
// cores, the online softmax in fp32 registers in the log2 domain (scores pre-multiplied by
// scale * log2(e), exp2f), masked keys -inf. Head dims not a multiple of 16 (72) are
// zero-padded to kHeadDimPad (80) in smem only.
//
// Sequences ("segments"): batch row b (grid.x = B * ceil(Sq / kRows)), or images_per_cta batch
// rows one after the other (Sq <= kRows, grid.x = ceil(B / images_per_cta): several (image,
// head) pairs per CTA, the Q tile loaded once for queries broadcast over the batch), or with
// cu_seqlens the
// packed rows of the window: grid.x = ceil(total_q / kRows) and the CTA runs one pass per
// segment that overlaps its window (binary search on device, no host sync, no idle CTAs), each
// pass with its own keys and writing only its own rows.
//
// Per pass, each row's visible keys (RowVis) give the CTA's key span (union over rows): tiles
// outside it are never loaded; inside it, per-element masks come from 64-bit tile bit masks.
// Rows that see nothing: out = 0, lse = -inf ("zero"), or every key ("uniform", HF).
//
// Split-KV (num_splits > 1, dense / ranges / prefix-LM, not packed): grid.z splits the CTA's key
// span into num_splits runs of whole tiles; each CTA writes its rows' partial output (normalized
// by its own sum, fp32) and partial lse to o_part / lse_part, and
// cross_attention_combine_kernel (cross_attention_combine.cuh) merges them.
// No ATen/torch includes.
#pragma once

#include "cuda/kernels/cross_attention_tiles.cuh"

namespace vlmkern::xattn_cuda {

// Largest segment s in [0, n) with cu[s] <= row (cu_seqlens are trusted to be non-decreasing).
__device__ __forceinline__ int64_t find_segment(const XattnDevIndex& cu, int64_t n, int64_t row) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (read_index(cu, mid * cu.stride[0]) <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Min start / max end over the CTA's rows (kWarps warps) that see something (empty: lo >= hi).
template <int kWarps = kThreads / 32>
__device__ __forceinline__ void cta_key_span(const RowVis (&vis)[2], int64_t* s_lo,
                                             int64_t* s_hi, int64_t& lo, int64_t& hi) {
  lo = INT64_MAX;
  hi = 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (vis[r].lo < vis[r].hi) {
      lo = vis[r].lo < lo ? vis[r].lo : lo;
      hi = vis[r].hi > hi ? vis[r].hi : hi;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const int64_t l2 = __shfl_xor_sync(0xffffffffu, lo, off);
    const int64_t h2 = __shfl_xor_sync(0xffffffffu, hi, off);
    lo = l2 < lo ? l2 : lo;
    hi = h2 > hi ? h2 : hi;
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    lo = s_lo[w] < lo ? s_lo[w] : lo;
    hi = s_hi[w] > hi ? s_hi[w] : hi;
  }
}

// Masks the warp's (16, 64) score tile s (C fragments of 8 key blocks), scales it into the log2
// domain, and applies the online-softmax update: s becomes P, m / l (running max, this thread's
// partial sum) and o (the rescaled output) of the thread's rows g and g + 8.
template <int kDBlocks>
__device__ __forceinline__ void softmax_tile(float (&s)[8][4], const uint64_t (&bits)[2],
                                             float scale_log2, float (&m)[2], float (&l)[2],
                                             float (&o)[kDBlocks][4]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nb * 8 + 2 * t + e;
        const bool seen = (bits[r] >> col) & 1ull;
        const float x = seen ? s[nb][2 * r + e] * scale_log2 : -INFINITY;
        s[nb][2 * r + e] = x;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: P = 0, no NaN
    const float alpha = exp2f(m[r] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = exp2f(s[nb][2 * r + e] - m_use);
        s[nb][2 * r + e] = pv;
        sum += pv;
      }
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) {
      o[nb][2 * r] *= alpha;
      o[nb][2 * r + 1] *= alpha;
    }
  }
}

template <typename T, int kHeadDimPad, int kWarps, int kMT = 1>
__global__ void __launch_bounds__(32 * kWarps)
    cross_attention_fwd_kernel(const XattnCudaParams p) {
  static_assert(kHeadDimPad % 16 == 0, "mma k-chunks of 16");
  static_assert(kWarps == 2 || kWarps == 4 || kWarps == 8, "32-, 64- or 128-row CTAs");
  static_assert(kMT == 1 || (kMT == 2 && kWarps == 4), "32 rows per warp: 4 warps only");
  static_assert(fwd_tiles_divide<kHeadDimPad, kWarps>(), "whole tile-copy chunks per thread");
  constexpr int kWarpRows = 16 * kMT;         // query rows per warp: kMT m16 tiles
  constexpr int kRows = kWarpRows * kWarps;   // query rows per CTA
  constexpr int kCtaThreads = 32 * kWarps;
  static_assert(kMT == 1 || kCtaThreads == kRows, "kMT > 1: thread i owns row i's tile bits");
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  constexpr int kKChunks = kHeadDimPad / 16;  // mma k steps of S = Q Kᵀ
  constexpr int kDBlocks = kHeadDimPad / 8;   // 8-column blocks of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);  // (kRows, kPitch) T, smem
  T* s_k = s_q + kRows * kPitch;             // 2 stages x (kBlockN, kPitch) T, smem
  T* s_v = s_k + 2 * kBlockN * kPitch;       // 2 stages x (kBlockN, kPitch) T, smem
  __shared__ int64_t s_lo[kWarps], s_hi[kWarps];  // (kWarps,) per-warp key span
  // kMT = 2: thread i computes row i's visibility bits of each tile here, for the 4 lanes that
  // hold the row (one per row instead of four, and one RowVis of registers per thread).
  __shared__ uint64_t s_bits[kMT > 1 ? kRows : 1];  // (kRows,) when kMT > 1

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int d = p.head_dim;
  const int64_t h = blockIdx.y, hk = h / (p.heads_q / p.heads_k);
  // (first) batch row, first row of the window in q's S dim, rows in it
  const auto [b, w0, window_rows] =
      cta_window(p.packed, blockIdx.x, p.seq_q, kRows, p.images_per_cta);

  // Q tile (kRows, kHeadDimPad) -> smem, zero-filled past the window and past D.
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + w0 * p.q_stride[1] +
               h * p.q_stride[2];
  load_tile_async<T, kRows, kHeadDimPad, kCtaThreads>(s_q, q, p.q_stride[1], window_rows, d);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // The warp's A fragments are re-read from s_q (ldmatrix) at every k step: keeping the whole
  // (16, kHeadDimPad) Q in registers would spill at kHeadDimPad = 128. m16 tile mt of the warp
  // starts 16 mt rows further.
  const uint32_t q_frag_addr = smem_addr(s_q + (warp * kWarpRows + (lane & 15)) * kPitch +
                                         (lane >> 4) * 8);

  // Passes: dense, batch rows b .. b + images_per_cta - 1 (one unless the glue packs images);
  // packed, the segments from the window's first.
  int64_t seg = b, seg_end = b + p.images_per_cta < p.batch ? b + p.images_per_cta : p.batch;
  if (p.packed) {
    seg = find_segment(p.cu_q, p.num_segments, w0);
    seg_end = p.num_segments;
  }
  for (; seg < seg_end; ++seg) {
    const int64_t bi = p.packed ? b : seg;  // the pass's batch row
    if (bi != b && p.q_stride[0] != 0) {  // a later image with its own queries: the previous
      // pass's trailing barrier freed s_q; no cp.async is in flight
      load_tile_async<T, kRows, kHeadDimPad, kCtaThreads>(s_q, q + (bi - b) * p.q_stride[0],
                                                          p.q_stride[1], window_rows, d);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    }
    const auto [q_begin, q_end, k_begin, k_end] = segment_span(p, seg);
    if (p.packed) {
      // past the window, or only empty segments left (fixed-length cu_seqlens end in them)
      if (q_begin >= w0 + kRows || q_begin >= p.seq_q) break;
      if (q_end <= w0 || q_begin == q_end) continue;  // ends before the window, or empty
    }
    const int64_t lq = q_end - q_begin, lk = k_end - k_begin;

    // The thread's rows g and g + 8 of each of the warp's kMT m16 tiles.
    int64_t row[kMT][2];
    bool valid[kMT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row[mt][r] = w0 + warp * kWarpRows + mt * 16 + g + 8 * r;
        valid[mt][r] = row[mt][r] >= q_begin && row[mt][r] < q_end;
      }
    }
    // kMT = 1: the visibility of the thread's two rows; kMT = 2: of row w0 + threadIdx.x (whose
    // tile bits go to s_bits), vis[1] empty.
    RowVis vis[2];
    if constexpr (kMT == 1) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        vis[r] = row_visibility(p, valid[0][r], bi, row[0][r], row[0][r] - q_begin, lq, lk, seg);
      }
    } else {
      const int64_t own = w0 + threadIdx.x;
      vis[0] = row_visibility(p, own >= q_begin && own < q_end, bi, own, own - q_begin, lq, lk,
                              seg);
    }
    int64_t span_lo, span_hi;
    cta_key_span<kWarps>(vis, s_lo, s_hi, span_lo, span_hi);
    int64_t kb_begin = span_lo < span_hi ? span_lo / kBlockN : 0;
    int64_t kb_end = span_lo < span_hi ? (span_hi + kBlockN - 1) / kBlockN : 0;
    if (gridDim.z > 1) {  // split-KV: this CTA takes run blockIdx.z of the span's tiles
      const int64_t run = (kb_end - kb_begin + gridDim.z - 1) / gridDim.z;
      const int64_t lo = kb_begin + static_cast<int64_t>(blockIdx.z) * run;
      kb_end = lo + run < kb_end ? lo + run : kb_end;
      kb_begin = lo < kb_end ? lo : kb_end;  // an empty run: partial 0, lse -inf
    }

    float o[kMT][kDBlocks][4];  // (kWarpRows, kHeadDimPad) fp32 output accumulator, registers
    float m[kMT][2], l[kMT][2];  // log2-domain max, partial sums
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nb = 0; nb < kDBlocks; ++nb) {
        o[mt][nb][0] = o[mt][nb][1] = o[mt][nb][2] = o[mt][nb][3] = 0.f;
      }
      m[mt][0] = m[mt][1] = -INFINITY;
      l[mt][0] = l[mt][1] = 0.f;
    }

    const T* k = static_cast<const T*>(p.k) + bi * p.k_stride[0] + k_begin * p.k_stride[1] +
                 hk * p.k_stride[2];
    const T* v = static_cast<const T*>(p.v) + bi * p.v_stride[0] + k_begin * p.v_stride[1] +
                 hk * p.v_stride[2];
    auto load_kv = [&](int64_t kb, int stage) {  // tile kb -> stage: (kBlockN, kPitch) K and V
      const int64_t j0 = kb * kBlockN;
      const int n = static_cast<int>(lk - j0 < kBlockN ? lk - j0 : kBlockN);
      load_tile_async<T, kBlockN, kHeadDimPad, kCtaThreads>(
          s_k + stage * kBlockN * kPitch, k + j0 * p.k_stride[1], p.k_stride[1], n, d);
      load_tile_async<T, kBlockN, kHeadDimPad, kCtaThreads>(
          s_v + stage * kBlockN * kPitch, v + j0 * p.v_stride[1], p.v_stride[1], n, d);
      cp_async_commit();
    };
    if (kb_begin < kb_end) load_kv(kb_begin, 0);

    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int stage = static_cast<int>((kb - kb_begin) & 1);
      const int64_t j0 = kb * kBlockN;
      // Prefetch the next tile into the other stage (freed by the __syncthreads at the end of
      // the previous iteration).
      if (kb + 1 < kb_end) load_kv(kb + 1, stage ^ 1);
      if constexpr (kMT > 1) {  // read after the __syncthreads below; the last reads of the
        s_bits[threadIdx.x] = tile_bits(p, vis[0], j0, lk);  // previous tile are behind the
      }                                                      // loop's trailing __syncthreads
      if (kb + 1 < kb_end) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* sk = s_k + stage * kBlockN * kPitch;  // (kBlockN, kPitch) T, smem
      const T* sv = s_v + stage * kBlockN * kPitch;  // (kBlockN, kPitch) T, smem

      // S = Q Kᵀ: (16, kBlockN) fp32 per m16 tile, 8 C fragments of 8 keys; each K fragment
      // serves the warp's kMT tiles.
      float s[kMT][8][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
        }
      }
#pragma unroll
      for (int kc = 0; kc < kKChunks; ++kc) {
        uint32_t qf[kMT][4];  // (16, 16) T A fragments of Q, registers
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          ldmatrix_x4(qf[mt], q_frag_addr + (mt * 16 * kPitch + kc * 16) *
                                                static_cast<uint32_t>(sizeof(T)));
        }
#pragma unroll
        for (int n2 = 0; n2 < 4; ++n2) {  // keys 16 n2 .. 16 n2 + 15
          uint32_t bk[4];
          ldmatrix_x4(bk, smem_addr(sk + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * kPitch +
                                    kc * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(s[mt][2 * n2], qf[mt], bk[0], bk[1]);
            mma_16816<T>(s[mt][2 * n2 + 1], qf[mt], bk[2], bk[3]);
          }
        }
      }

#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        uint64_t bits[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if constexpr (kMT == 1) {
            bits[r] = tile_bits(p, vis[r], j0, lk);
          } else {
            bits[r] = s_bits[warp * kWarpRows + mt * 16 + g + 8 * r];
          }
        }
        softmax_tile<kDBlocks>(s[mt], bits, p.scale_log2, m[mt], l[mt], o[mt]);
      }

      // O += P V: P (16, kBlockN) per m16 tile as 4 A fragments of 16 keys, V (kBlockN,
      // kHeadDimPad); each V fragment serves the warp's kMT tiles.
#pragma unroll
      for (int kc = 0; kc < kBlockN / 16; ++kc) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          a[mt][0] = pack2<T>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          a[mt][1] = pack2<T>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          a[mt][2] = pack2<T>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          a[mt][3] = pack2<T>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int n2 = 0; n2 < kDBlocks / 2; ++n2) {  // head-dim columns 16 n2 .. 16 n2 + 15
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, smem_addr(sv + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) *
                                              kPitch + n2 * 16 + (lane >> 4) * 8));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<T>(o[mt][2 * n2], a[mt], bv[0], bv[1]);
            mma_16816<T>(o[mt][2 * n2 + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
      __syncthreads();  // both stages free for the next prefetch / pass
    }

    // Epilogue: out (B, Sq, Hq, D) dense in T, lse (B, Hq, Sq) fp32 natural log.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = l[mt][r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (!valid[mt][r]) continue;
        const int64_t rw = row[mt][r];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        // -inf only for a row that saw nothing: a NaN sum (NaN input) stays NaN, so the
        // split-KV combine cannot drop it as an empty run.
        const float row_lse =
            sum == 0.f ? -INFINITY : (m[mt][r] + log2f(sum)) * 0.69314718055994531f;
        if (gridDim.z > 1) {  // partials: o_part (splits, B, Sq, Hq, D), lse_part (splits, B,
          const int64_t z = blockIdx.z;  // Hq, Sq)
          float* po = p.o_part + (((z * p.batch + bi) * p.seq_q + rw) * p.heads_q + h) * d;
#pragma unroll
          for (int nb = 0; nb < kDBlocks; ++nb) {
            if (nb * 8 < d) {
              *reinterpret_cast<float2*>(po + nb * 8 + 2 * t) =
                  make_float2(o[mt][nb][2 * r] * inv, o[mt][nb][2 * r + 1] * inv);
            }
          }
          if (t == 0) p.lse_part[((z * p.batch + bi) * p.heads_q + h) * p.seq_q + rw] = row_lse;
          continue;
        }
        T* out = static_cast<T*>(p.out) + ((bi * p.seq_q + rw) * p.heads_q + h) * d;
#pragma unroll
        for (int nb = 0; nb < kDBlocks; ++nb) {
          if (nb * 8 < d) {
            *reinterpret_cast<uint32_t*>(out + nb * 8 + 2 * t) =
                pack2<T>(o[mt][nb][2 * r] * inv, o[mt][nb][2 * r + 1] * inv);
          }
        }
        if (t == 0) p.lse[(bi * p.heads_q + h) * p.seq_q + rw] = row_lse;
      }
    }
    __syncthreads();  // s_lo / s_hi are rewritten by the next pass
  }
}

}  // namespace vlmkern::xattn_cuda
