// CUDA cross-attention backward, flash-attention 2 style (sm_80+ mma.sync, fp32 accumulation),
// deterministic: no atomics, every output element written by one thread in a fixed order.
//
// P is recomputed from q, k and the forward's lse: P = exp2(scale·log2(e)·q·k − lse·log2(e)) on
// the visible pairs (exact 0 elsewhere, by select: a "zero" dead row has lse = -inf and no bit).
// With delta_i = rowsum(dO_i ∘ O_i) − dlse_i:  dS = P ∘ (dP − delta), dP = dO Vᵀ,
//   dV = Pᵀ dO,  dK = scale · dSᵀ Q,  dQ = scale · dS K.
// Three kernels:
//   1. delta: one warp per (b, i, h) row.
//   2. dK / dV: one CTA = one window of kBlockN = 64 keys x one kv head (grid.x = B * ceil(Sk /
//      64), packed: ceil(total_k / 64) with one pass per segment overlapping the window, as the
//      forward does for q windows). 4 warps, each owning 16 keys. The CTA walks the segment's
//      64-row q tiles; the tile's per-row visibility of the 64 keys (64-bit masks, the forward's
//      row_visibility / tile_bits) goes to smem and tiles that see none of the keys are skipped
//      before loading; for each of the G q heads of the kv head: Sᵀ = K Qᵀ, Pᵀ, dV += Pᵀ dO,
//      dPᵀ = V dOᵀ, dSᵀ, dK += dSᵀ Q (all m16n8k16, Sᵀ / dSᵀ C fragments reused as A fragments;
//      at D = 128 in two halves of 32 q rows, so that the fp32 dK / dV accumulators do not
//      spill).
//   3. dQ: one CTA = one 64-row q window x one q head, the forward's grid, segment passes, key
//      span and 2-stage cp.async K / V pipeline; per key tile S = Q Kᵀ, dP = dO Vᵀ, dS,
//      dQ += dS K.
// Outputs in q's dtype, dense; fp32 accumulation. No ATen/torch includes.
#pragma once

#include "cuda/kernels/cross_attention_fwd.cuh"

namespace vlmkern::xattn_cuda {

static_assert(kBlockM == kBlockN, "the dK/dV kernel's q tiles and key windows share smem shapes");

constexpr float kLog2e = 1.4426950408889634f;

// Dynamic smem of the dK / dV kernel: four (64, pitch) T tiles (K, V, Q, dO).
template <typename T, int kHeadDimPad>
constexpr int dkdv_smem_bytes() {
  return 4 * kBlockM * smem_pitch<kHeadDimPad>() * static_cast<int>(sizeof(T));
}

// Dynamic smem of the dQ kernel: Q, dO and 2 stages of K and V, (64, pitch) T tiles.
template <typename T, int kHeadDimPad>
constexpr int dq_smem_bytes() {
  return 6 * kBlockM * smem_pitch<kHeadDimPad>() * static_cast<int>(sizeof(T));
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// delta (B, Hq, Sq) fp32 = rowsum(dO ∘ O) − dlse, one warp per row (lanes stride the head dim,
// fixed xor-tree reduction: deterministic).
template <typename T, int kHeadDimPad>
__global__ void __launch_bounds__(kThreads) cross_attention_bwd_delta_kernel(
    const XattnBwdParams bp) {
  const XattnCudaParams& p = bp.a;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.seq_q * p.heads_q;
  const int64_t step = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp; r < rows;
       r += step) {  // r = (b, i, h), h fastest
    const int64_t h = r % p.heads_q, bi = r / p.heads_q, i = bi % p.seq_q, b = bi / p.seq_q;
    const T* o = static_cast<const T*>(bp.out) + b * bp.out_stride[0] + i * bp.out_stride[1] +
                 h * bp.out_stride[2];  // (D,) T
    const T* go = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] +
                  i * bp.dout_stride[1] + h * bp.dout_stride[2];  // (D,) T
    float acc = 0.f;
    for (int c = lane; c < p.head_dim; c += 32) acc += to_float(o[c]) * to_float(go[c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      const int64_t l = (b * p.heads_q + h) * p.seq_q + i;
      bp.delta[l] = acc - (bp.dlse != nullptr ? bp.dlse[l] : 0.f);
    }
  }
}

// C (16, 8 kNB) fp32 fragments of kNB column blocks -> the A fragment of columns 16 kc .. +15.
template <typename T, int kNB>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[kNB][4], int kc) {
  a[0] = pack2<T>(c[2 * kc][0], c[2 * kc][1]);
  a[1] = pack2<T>(c[2 * kc][2], c[2 * kc][3]);
  a[2] = pack2<T>(c[2 * kc + 1][0], c[2 * kc + 1][1]);
  a[3] = pack2<T>(c[2 * kc + 1][2], c[2 * kc + 1][3]);
}

// acc (16, 8 kNB) = A (16, kHeadDimPad) Bᵀ: A from smem rows at a_addr (the lane's ldmatrix row
// address, as for the forward's Q), B (8 kNB, kHeadDimPad) rows of b_tile (as the forward's K).
template <typename T, int kHeadDimPad, int kNB = 8>
__device__ __forceinline__ void mma_abt(float (&acc)[kNB][4], uint32_t a_addr, const T* b_tile) {
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
#pragma unroll
  for (int kc = 0; kc < kHeadDimPad / 16; ++kc) {
    uint32_t af[4];  // (16, 16) T A fragment, registers
    ldmatrix_x4(af, a_addr + kc * 16 * static_cast<uint32_t>(sizeof(T)));
#pragma unroll
    for (int n2 = 0; n2 < kNB / 2; ++n2) {  // B rows 16 n2 .. 16 n2 + 15
      uint32_t bf[4];
      ldmatrix_x4(bf, smem_addr(b_tile + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * kPitch +
                                kc * 16 + ((lane >> 3) & 1) * 8));
      mma_16816<T>(acc[2 * n2], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * n2 + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16, kHeadDimPad) += C (16, 8 kNB) B: C as fp32 fragments (rounded to T), B (8 kNB,
// kHeadDimPad) row-major in smem (read transposed, as the forward's V).
template <typename T, int kHeadDimPad, int kNB = 8>
__device__ __forceinline__ void mma_cb(float (&acc)[kHeadDimPad / 8][4],
                                       const float (&c)[kNB][4], const T* b_tile) {
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kc = 0; kc < kNB / 2; ++kc) {
    uint32_t a[4];
    c_to_a<T, kNB>(a, c, kc);
#pragma unroll
    for (int n2 = 0; n2 < kHeadDimPad / 16; ++n2) {  // head-dim columns 16 n2 .. 16 n2 + 15
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, smem_addr(b_tile + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) *
                                                   kPitch + n2 * 16 + (lane >> 4) * 8));
      mma_16816<T>(acc[2 * n2], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * n2 + 1], a, bf[2], bf[3]);
    }
  }
}

// Row `row` of a dense (rows, H, d) T output <- acc (the thread's rows g / g + 8 = r) * mul.
template <typename T, int kDBlocks>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[kDBlocks][4], int r,
                                          float mul, int d) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int nb = 0; nb < kDBlocks; ++nb) {
    if (nb * 8 < d) {
      *reinterpret_cast<uint32_t*>(dst + nb * 8 + 2 * t) =
          pack2<T>(acc[nb][2 * r] * mul, acc[nb][2 * r + 1] * mul);
    }
  }
}

template <typename T, int kHeadDimPad>
__global__ void __launch_bounds__(kThreads) cross_attention_bwd_dkdv_kernel(
    const XattnBwdParams bp) {
  static_assert(kHeadDimPad % 16 == 0, "mma k-chunks of 16");
  const XattnCudaParams& p = bp.a;
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  constexpr int kDBlocks = kHeadDimPad / 8;  // 8-column blocks of dK / dV
  constexpr int kQCols = kHeadDimPad >= 128 ? 32 : 64;  // q rows per Sᵀ / dPᵀ register tile
  constexpr int kNB = kQCols / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_k = reinterpret_cast<T*>(smem_raw);  // (kBlockN, kPitch) T, smem: the key window
  T* s_v = s_k + kBlockN * kPitch;           // (kBlockN, kPitch) T, smem
  T* s_q = s_v + kBlockN * kPitch;           // (kBlockM, kPitch) T, smem: one q tile, one head
  T* s_do = s_q + kBlockM * kPitch;          // (kBlockM, kPitch) T, smem: its dO
  __shared__ uint64_t s_bits[kBlockM];       // (kBlockM,) q row -> visible keys of the window
  __shared__ float s_lse[kBlockM];           // (kBlockM,) lse · log2(e)
  __shared__ float s_delta[kBlockM];         // (kBlockM,)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int d = p.head_dim;
  const int64_t hk = blockIdx.y, group = p.heads_q / p.heads_k;
  // batch, first key of the window in k's S dim, keys in it
  const auto [b, w0, window_keys] = cta_window(p.packed, blockIdx.x, p.seq_k, kBlockN);

  // K / V window (kBlockN, kHeadDimPad) -> smem once, zero-filled past the keys and past D.
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + w0 * p.k_stride[1] +
               hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + w0 * p.v_stride[1] +
               hk * p.v_stride[2];
  load_tile_async<T, kBlockN, kHeadDimPad>(s_k, k, p.k_stride[1], window_keys, d);
  load_tile_async<T, kBlockN, kHeadDimPad>(s_v, v, p.v_stride[1], window_keys, d);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // The warp's 16 keys as A fragments (re-read by ldmatrix at every k step).
  const uint32_t k_frag_addr = smem_addr(s_k + (warp * 16 + (lane & 15)) * kPitch +
                                         (lane >> 4) * 8);
  const uint32_t v_frag_addr = smem_addr(s_v + (warp * 16 + (lane & 15)) * kPitch +
                                         (lane >> 4) * 8);
  const T* dout = static_cast<const T*>(bp.dout);

  int64_t seg = b, seg_end = b + 1;
  if (p.packed) {
    seg = find_segment(p.cu_k, p.num_segments, w0);
    seg_end = p.num_segments;
  }
  for (; seg < seg_end; ++seg) {
    const auto [q_begin, q_end, k_begin, k_end] = segment_span(p, seg);
    if (p.packed) {
      // past the window, or only empty segments left (fixed-length cu_seqlens end in them)
      if (k_begin >= w0 + kBlockN || k_begin >= p.seq_k) break;
      if (k_end <= w0 || k_begin == k_end) continue;  // ends before the window, or no keys
    }
    const int64_t lq = q_end - q_begin, lk = k_end - k_begin;
    const int64_t j0 = w0 - k_begin;  // the window's first key, relative to the segment (may
                                      // be < 0 in a packed pass: those keys have no bits)
    float dk[kDBlocks][4], dv[kDBlocks][4];  // (16, kHeadDimPad) fp32 accumulators, registers
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) {
      dk[nb][0] = dk[nb][1] = dk[nb][2] = dk[nb][3] = 0.f;
      dv[nb][0] = dv[nb][1] = dv[nb][2] = dv[nb][3] = 0.f;
    }
    for (int64_t i0 = q_begin; i0 < q_end; i0 += kBlockM) {
      const int rows = static_cast<int>(q_end - i0 < kBlockM ? q_end - i0 : kBlockM);
      uint64_t bits = 0;
      if (tid < kBlockM) {  // row i0 + tid's view of the window (s_bits free: the previous
        const bool valid = tid < rows;  // tile ended in a barrier)
        const RowVis vis = row_visibility(p, valid, b, i0 + tid, i0 + tid - q_begin, lq, lk, seg);
        bits = valid ? tile_bits(p, vis, j0, lk) : 0ull;
        s_bits[tid] = bits;
      }
      if (!__syncthreads_or(bits != 0ull)) continue;  // no row of the tile sees the window

      for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
        const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + i0 * p.q_stride[1] +
                     hq * p.q_stride[2];
        const T* go = dout + b * bp.dout_stride[0] + i0 * bp.dout_stride[1] +
                      hq * bp.dout_stride[2];
        load_tile_async<T, kBlockM, kHeadDimPad>(s_q, q, p.q_stride[1], rows, d);
        load_tile_async<T, kBlockM, kHeadDimPad>(s_do, go, bp.dout_stride[1], rows, d);
        cp_async_commit();
        if (tid < kBlockM) {
          const bool valid = tid < rows;
          const int64_t l = (b * p.heads_q + hq) * p.seq_q + i0 + tid;
          s_lse[tid] = valid ? bp.lse[l] * kLog2e : 0.f;
          s_delta[tid] = valid ? bp.delta[l] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        // Per part of kQCols q rows (all 64, or two halves of 32 where the dK + dV accumulators
        // leave too few registers for two (16, 64) tiles): Sᵀ = K Qᵀ -> Pᵀ, dV += Pᵀ dO,
        // dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta) (0 where not seen: Pᵀ is 0 there), dK += dSᵀ Q.
#pragma unroll 1  // unrolled, the halves' loads are interleaved and spill
        for (int part = 0; part < kBlockM / kQCols; ++part) {
          const T* sq = s_q + part * kQCols * kPitch;    // (kQCols, kPitch) T, smem
          const T* sdo = s_do + part * kQCols * kPitch;  // (kQCols, kPitch) T, smem
          float s[kNB][4];  // (16 keys, kQCols q rows) fp32 per warp
          mma_abt<T, kHeadDimPad, kNB>(s, k_frag_addr, sq);
#pragma unroll
          for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = part * kQCols + nb * 8 + 2 * t + e;  // q row of the tile
              const uint64_t cb = s_bits[col];
              const float lse2 = s_lse[col];
#pragma unroll
              for (int r = 0; r < 2; ++r) {  // key warp * 16 + g + 8 r of the window
                const bool seen = (cb >> (warp * 16 + g + 8 * r)) & 1ull;
                s[nb][2 * r + e] = seen ? exp2f(s[nb][2 * r + e] * p.scale_log2 - lse2) : 0.f;
              }
            }
          }
          mma_cb<T, kHeadDimPad, kNB>(dv, s, sdo);  // dV += Pᵀ dO

          float dp[kNB][4];
          mma_abt<T, kHeadDimPad, kNB>(dp, v_frag_addr, sdo);
#pragma unroll
          for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float dl = s_delta[part * kQCols + nb * 8 + 2 * t + e];
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const float pv = s[nb][2 * r + e];
                s[nb][2 * r + e] = pv != 0.f ? pv * (dp[nb][2 * r + e] - dl) : 0.f;
              }
            }
          }
          mma_cb<T, kHeadDimPad, kNB>(dk, s, sq);  // dK += dSᵀ Q
        }
        __syncthreads();  // s_q / s_do / s_lse / s_delta / s_bits are rewritten next
      }
    }

    // Epilogue: the segment's keys of the window; dk / dv (B, Sk, Hk, D) dense in T.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t key = w0 + warp * 16 + g + 8 * r;
      if (key < k_begin || key >= k_end) continue;
      const int64_t off = ((b * p.seq_k + key) * p.heads_k + hk) * d;
      store_row<T, kDBlocks>(static_cast<T*>(bp.dk) + off, dk, r, bp.scale, d);
      store_row<T, kDBlocks>(static_cast<T*>(bp.dv) + off, dv, r, 1.f, d);
    }
  }
}

// Min 1 CTA / SM: without it ptxas may aim at 3 CTAs / SM (168 registers) and spill (D = 64, 80).
template <typename T, int kHeadDimPad>
__global__ void __launch_bounds__(kThreads, 1) cross_attention_bwd_dq_kernel(
    const XattnBwdParams bp) {
  static_assert(kHeadDimPad % 16 == 0, "mma k-chunks of 16");
  const XattnCudaParams& p = bp.a;
  constexpr int kPitch = smem_pitch<kHeadDimPad>();
  constexpr int kDBlocks = kHeadDimPad / 8;  // 8-column blocks of dQ
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);  // (kBlockM, kPitch) T, smem: the q window
  T* s_do = s_q + kBlockM * kPitch;          // (kBlockM, kPitch) T, smem: its dO
  T* s_k = s_do + kBlockM * kPitch;          // 2 stages x (kBlockN, kPitch) T, smem
  T* s_v = s_k + 2 * kBlockN * kPitch;       // 2 stages x (kBlockN, kPitch) T, smem
  __shared__ int64_t s_lo[kThreads / 32], s_hi[kThreads / 32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const int d = p.head_dim;
  const int64_t h = blockIdx.y, hk = h / (p.heads_q / p.heads_k);
  // batch, first row of the window in q's S dim, rows in it
  const auto [b, w0, window_rows] = cta_window(p.packed, blockIdx.x, p.seq_q, kBlockM);

  // Q and dO windows (kBlockM, kHeadDimPad) -> smem, zero-filled past the window and past D.
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + w0 * p.q_stride[1] +
               h * p.q_stride[2];
  const T* go = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] +
                w0 * bp.dout_stride[1] + h * bp.dout_stride[2];
  load_tile_async<T, kBlockM, kHeadDimPad>(s_q, q, p.q_stride[1], window_rows, d);
  load_tile_async<T, kBlockM, kHeadDimPad>(s_do, go, bp.dout_stride[1], window_rows, d);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const uint32_t q_frag_addr = smem_addr(s_q + (warp * 16 + (lane & 15)) * kPitch +
                                         (lane >> 4) * 8);
  const uint32_t do_frag_addr = smem_addr(s_do + (warp * 16 + (lane & 15)) * kPitch +
                                          (lane >> 4) * 8);

  int64_t seg = b, seg_end = b + 1;
  if (p.packed) {
    seg = find_segment(p.cu_q, p.num_segments, w0);
    seg_end = p.num_segments;
  }
  for (; seg < seg_end; ++seg) {
    const auto [q_begin, q_end, k_begin, k_end] = segment_span(p, seg);
    if (p.packed) {
      if (q_begin >= w0 + kBlockM || q_begin >= p.seq_q) break;  // as the dK / dV pass
      if (q_end <= w0 || q_begin == q_end) continue;
    }
    const int64_t lq = q_end - q_begin, lk = k_end - k_begin;

    int64_t row[2];
    bool valid[2];
    RowVis vis[2];
    float lse2[2], dl[2];  // the rows' lse · log2(e) and delta
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[r] = w0 + warp * 16 + g + 8 * r;
      valid[r] = row[r] >= q_begin && row[r] < q_end;
      vis[r] = row_visibility(p, valid[r], b, row[r], row[r] - q_begin, lq, lk, seg);
      const int64_t l = (b * p.heads_q + h) * p.seq_q + row[r];
      lse2[r] = valid[r] ? bp.lse[l] * kLog2e : 0.f;
      dl[r] = valid[r] ? bp.delta[l] : 0.f;
    }
    int64_t span_lo, span_hi;
    cta_key_span(vis, s_lo, s_hi, span_lo, span_hi);
    const int64_t kb_begin = span_lo < span_hi ? span_lo / kBlockN : 0;
    const int64_t kb_end = span_lo < span_hi ? (span_hi + kBlockN - 1) / kBlockN : 0;

    float dq[kDBlocks][4];  // (16, kHeadDimPad) fp32 accumulator, registers
#pragma unroll
    for (int nb = 0; nb < kDBlocks; ++nb) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.f;

    const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + k_begin * p.k_stride[1] +
                 hk * p.k_stride[2];
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + k_begin * p.v_stride[1] +
                 hk * p.v_stride[2];
    auto load_kv = [&](int64_t kb, int stage) {  // tile kb -> stage: (kBlockN, kPitch) K and V
      const int64_t j0 = kb * kBlockN;
      const int n = static_cast<int>(lk - j0 < kBlockN ? lk - j0 : kBlockN);
      load_tile_async<T, kBlockN, kHeadDimPad>(s_k + stage * kBlockN * kPitch,
                                               k + j0 * p.k_stride[1], p.k_stride[1], n, d);
      load_tile_async<T, kBlockN, kHeadDimPad>(s_v + stage * kBlockN * kPitch,
                                               v + j0 * p.v_stride[1], p.v_stride[1], n, d);
      cp_async_commit();
    };
    if (kb_begin < kb_end) load_kv(kb_begin, 0);
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {  // the forward's 2-stage cp.async pipeline
      const int stage = static_cast<int>((kb - kb_begin) & 1);
      if (kb + 1 < kb_end) {  // prefetch the next tile into the other stage (freed by the
        load_kv(kb + 1, stage ^ 1);  // __syncthreads at the end of the previous iteration)
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      const int64_t j0 = kb * kBlockN;
      uint64_t bits[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) bits[r] = tile_bits(p, vis[r], j0, lk);
      __syncthreads();
      const T* sk = s_k + stage * kBlockN * kPitch;  // (kBlockN, kPitch) T, smem
      const T* sv = s_v + stage * kBlockN * kPitch;  // (kBlockN, kPitch) T, smem

      float s[8][4], dp[8][4];  // S = Q Kᵀ, dP = dO Vᵀ: (16, kBlockN) fp32 per warp
      mma_abt<T, kHeadDimPad>(s, q_frag_addr, sk);
      mma_abt<T, kHeadDimPad>(dp, do_frag_addr, sv);
      const int t = lane % 4;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool seen = (bits[r] >> (nb * 8 + 2 * t + e)) & 1ull;
            const float pv = seen ? exp2f(s[nb][2 * r + e] * p.scale_log2 - lse2[r]) : 0.f;
            s[nb][2 * r + e] = seen ? pv * (dp[nb][2 * r + e] - dl[r]) : 0.f;  // dS
          }
        }
      }
      mma_cb<T, kHeadDimPad>(dq, s, sk);  // dQ += dS K
      __syncthreads();  // both stages free for the next prefetch / pass
    }

    // Epilogue: dq (B, Sq, Hq, D) dense in T.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!valid[r]) continue;
      T* dst = static_cast<T*>(bp.dq) + ((b * p.seq_q + row[r]) * p.heads_q + h) * d;
      store_row<T, kDBlocks>(dst, dq, r, bp.scale, d);
    }
    __syncthreads();  // s_lo / s_hi are rewritten by the next pass
  }
}

}  // namespace vlmkern::xattn_cuda
