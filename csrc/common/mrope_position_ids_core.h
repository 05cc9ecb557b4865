// Torch-free core of mrope_position_ids, compiled both by g++ (CPU path) and nvcc (CUDA kernel), so
// the CPU tests exercise the very chunk/scan algorithm the GPU runs. No ATen includes.
//
// A row is cut into chunks (one per CUDA thread; a few per row on the CPU). Four sequential passes
// over each chunk, each followed by an exclusive scan of the per-chunk summaries across the row:
//   A: valid-token count and the kind of the last valid token -> compacted index, previous kind
//   B: vision blocks started (per modality), latest block start -> block number, its first token
//   C: sum of advances (text +1, a block +adv at its first token) -> start position of each group
//   D: write positions, track the row maximum, detect inconsistent blocks.
// Between the count pass (A, B on every row) and D, block numbers are offset by the blocks of the
// same modality in all earlier rows: rows consume image_grid_thw / video_grid_thw in order.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VLMKERN_HD __host__ __device__ __forceinline__
#else
#define VLMKERN_HD inline __attribute__((always_inline))
#endif

namespace vlmkern {
namespace mrope {

// Token kinds. kNone: masked out (attention_mask == 0), or "no valid token seen yet".
constexpr int64_t kNone = -1;
constexpr int64_t kText = 0;
constexpr int64_t kImage = 1;
constexpr int64_t kVideo = 2;

enum IntervalKind : int { kIntervalNone = 0, kIntervalF32 = 1, kIntervalF64 = 2 };
enum ErrorCode : int { kOk = 0, kNoGrid = 1, kBadGrid = 2, kLength = 3 };

constexpr int64_t kInt64Max = 0x7fffffffffffffffLL;
constexpr int64_t kInt64Min = -kInt64Max - 1;

// Everything a kernel reads; strides in elements. Grids: [0] image (Ni, 3), [1] video (Nv, 3).
struct Args {
  const void* tokens;  // (B, S) int32 / int64
  int tokens_bytes;
  int64_t tokens_sb, tokens_ss;
  const void* mask;  // (B, S) any 1/2/4/8-byte integer or bool, nonzero = keep; null: all kept
  int mask_bytes;
  int64_t mask_sb, mask_ss;
  int64_t batch, seq;
  int64_t image_token, video_token;
  const void* grids[2];  // (N, 3) int32 / int64, or null
  int grid_bytes[2];
  int64_t grid_rows[2], grid_s0[2], grid_s1[2];
  const void* interval;  // (Nv,) float32 / float64: per-video temporal interval, or null (= 1)
  int interval_kind;
  int64_t interval_stride;
  const int64_t* frame_ends;  // (Nv,) inclusive cumsum of video t (split_frames only)
  int64_t merge;
  bool split_frames;  // Qwen3-VL: every video frame is its own (1, h, w) block
  bool max_plus_one;  // text after a block continues at max_pos + 1 (else start + max(h', w'))
  int64_t* pos;       // (3, B, S) contiguous, out
  int64_t* deltas;    // (B, 1) contiguous, out
};

VLMKERN_HD int64_t load_int(const void* p, int64_t off, int bytes) {
  switch (bytes) {
    case 8: return static_cast<const int64_t*>(p)[off];
    case 4: return static_cast<const int32_t*>(p)[off];
    case 2: return static_cast<const int16_t*>(p)[off];
    default: return static_cast<const uint8_t*>(p)[off];
  }
}

template <int kBytes>
struct IntOf;  // the integer type a token / mask element is read as
template <>
struct IntOf<1> { using T = uint8_t; };
template <>
struct IntOf<2> { using T = int16_t; };
template <>
struct IntOf<4> { using T = int32_t; };
template <>
struct IntOf<8> { using T = int64_t; };

// Kind of token (b, s), specialised on the token width and the mask width (0: no mask). A local
// copy of what it reads, so stores to the outputs cannot alias it.
template <int kTokenBytes, int kMaskBytes>
struct Kinds {
  using Token = typename IntOf<kTokenBytes>::T;
  const Token* tokens;  // (B, S)
  int64_t tokens_sb, tokens_ss;
  const void* mask;  // (B, S), read when kMaskBytes > 0
  int64_t mask_sb, mask_ss;
  int64_t image_token, video_token;

  VLMKERN_HD explicit Kinds(const Args& a)
      : tokens(static_cast<const Token*>(a.tokens)), tokens_sb(a.tokens_sb),
        tokens_ss(a.tokens_ss), mask(a.mask), mask_sb(a.mask_sb), mask_ss(a.mask_ss),
        image_token(a.image_token), video_token(a.video_token) {}

  VLMKERN_HD int64_t operator()(int64_t b, int64_t s) const {
    if constexpr (kMaskBytes > 0) {
      using Mask = typename IntOf<kMaskBytes>::T;
      if (static_cast<const Mask*>(mask)[b * mask_sb + s * mask_ss] == 0) return kNone;
    }
    const int64_t v = tokens[b * tokens_sb + s * tokens_ss];
    return v == image_token ? kImage : (v == video_token ? kVideo : kText);
  }
};

// Calls f(Kinds<token bytes, mask bytes>(a)) for the widths in `a` (host side).
template <typename F>
inline decltype(auto) with_kinds(const Args& a, F&& f) {
  const int mask = a.mask == nullptr ? 0 : a.mask_bytes;
  if (a.tokens_bytes == 4) {
    switch (mask) {
      case 1: return f(Kinds<4, 1>(a));
      case 2: return f(Kinds<4, 2>(a));
      case 4: return f(Kinds<4, 4>(a));
      case 8: return f(Kinds<4, 8>(a));
      default: return f(Kinds<4, 0>(a));
    }
  }
  switch (mask) {
    case 1: return f(Kinds<8, 1>(a));
    case 2: return f(Kinds<8, 2>(a));
    case 4: return f(Kinds<8, 4>(a));
    case 8: return f(Kinds<8, 8>(a));
    default: return f(Kinds<8, 0>(a));
  }
}

// One vision block: merged grid (t, h, w), token count, advance and temporal interval.
struct Geom {
  int64_t t, h, w, len, adv;
  int64_t grid_row;  // row of image_grid_thw / video_grid_thw it came from (-1: none)
  int iv_kind;
  float iv32;
  double iv64;
  int error;  // kOk, kNoGrid or kBadGrid
};

// Temporal offset of frame ti: HF computes (arange(t) * interval).long() in the interval's dtype.
VLMKERN_HD int64_t temporal(const Geom& g, int64_t ti) {
  if (g.iv_kind == kIntervalF32) return static_cast<int64_t>(static_cast<float>(ti) * g.iv32);
  if (g.iv_kind == kIntervalF64) return static_cast<int64_t>(static_cast<double>(ti) * g.iv64);
  return ti;
}

// Block number `idx` (counted across rows) of modality `kind`.
VLMKERN_HD Geom block_geom(const Args& a, int64_t kind, int64_t idx) {
  Geom g{0, 0, 0, 0, 0, -1, kIntervalNone, 1.0f, 1.0, kOk};
  const int m = static_cast<int>(kind - 1);
  const bool frame = kind == kVideo && a.split_frames;
  int64_t row = idx;
  if (frame) {  // frame idx of the videos laid end to end: first v with frame_ends[v] > idx
    const int64_t n = a.grid_rows[1];
    if (n == 0 || idx >= a.frame_ends[n - 1]) {
      g.error = kNoGrid;
      return g;
    }
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.frame_ends[mid] > idx) hi = mid; else lo = mid + 1;
    }
    row = lo;
  } else if (idx >= a.grid_rows[m]) {
    g.error = kNoGrid;
    return g;
  }
  g.grid_row = row;
  const int64_t base = row * a.grid_s0[m];
  // A frame is a (1, h, w) block of its video, whose t must still be valid: a negative one would
  // have made frame_ends non-monotonic (the CPU rejects it up front; CUDA marks the row).
  const int64_t video_t = load_int(a.grids[m], base, a.grid_bytes[m]);
  const int64_t t = frame ? 1 : video_t;
  const int64_t h = load_int(a.grids[m], base + a.grid_s1[m], a.grid_bytes[m]);
  const int64_t w = load_int(a.grids[m], base + 2 * a.grid_s1[m], a.grid_bytes[m]);
  if (video_t < 0 || h < 0 || w < 0) {
    g.error = kBadGrid;
    return g;
  }
  g.t = t;
  g.h = h / a.merge;
  g.w = w / a.merge;
  if (g.t != 0 && g.h != 0 && g.w != 0) {
    if (g.h > kInt64Max / g.t || g.w > kInt64Max / (g.t * g.h)) {
      g.error = kBadGrid;  // t * h' * w' overflows int64
      return g;
    }
    g.len = g.t * g.h * g.w;
  }
  if (kind == kVideo && !frame && a.interval != nullptr) {
    g.iv_kind = a.interval_kind;
    if (a.interval_kind == kIntervalF32) {
      g.iv32 = static_cast<const float*>(a.interval)[row * a.interval_stride];
    } else {
      g.iv64 = static_cast<const double*>(a.interval)[row * a.interval_stride];
    }
    // A NaN/inf interval, or one whose last frame offset leaves int64, gives no positions (the
    // CPU rejects it up front; CUDA marks the row -1 with delta 0, as documented).
    const double iv = g.iv_kind == kIntervalF32 ? static_cast<double>(g.iv32) : g.iv64;
    const double span = iv * static_cast<double>(g.t > 0 ? g.t - 1 : 0);
    if (!(iv == iv && span > -9.0e18 && span < 9.0e18 && iv > -1.0e300 && iv < 1.0e300)) {
      g.error = kBadGrid;
      return g;
    }
  }
  const int64_t hw = g.h > g.w ? g.h : g.w;
  if (a.max_plus_one && g.len > 0) {
    const int64_t last = temporal(g, g.t - 1);
    int64_t top = last > 0 ? last : 0;  // largest temporal offset (intervals may be < 0)
    top = top > hw - 1 ? top : hw - 1;
    g.adv = top + 1;
  } else {
    g.adv = hw;
  }
  return g;
}

// ---- per-chunk summaries and their (associative) combine ----------------------------------------

struct ScanA {
  int64_t n_valid;    // valid (masked-in) tokens
  int64_t last_kind;  // kind of the last valid token, kNone if none
};
VLMKERN_HD ScanA identity_a() { return {0, kNone}; }
VLMKERN_HD ScanA combine(const ScanA& x, const ScanA& y) {
  return {x.n_valid + y.n_valid, y.last_kind != kNone ? y.last_kind : x.last_kind};
}

struct ScanB {
  int64_t starts[2];   // vision blocks started: image, video
  int64_t last_start;  // compacted index of the latest block start, -1 if none
};
VLMKERN_HD ScanB identity_b() { return {{0, 0}, -1}; }
VLMKERN_HD ScanB combine(const ScanB& x, const ScanB& y) {
  return {{x.starts[0] + y.starts[0], x.starts[1] + y.starts[1]},
          y.last_start > x.last_start ? y.last_start : x.last_start};
}

struct ScanC {
  int64_t advance;  // text tokens + advances of the blocks starting in the chunk
};
VLMKERN_HD ScanC identity_c() { return {0}; }
VLMKERN_HD ScanC combine(const ScanC& x, const ScanC& y) { return {x.advance + y.advance}; }

// What a chunk needs to know about everything before it in its row (exclusive prefixes).
struct ChunkIn {
  ScanA a;
  ScanB b;
  int64_t offset[2];  // blocks of each modality in earlier rows
  int64_t p;          // position where the chunk's first group would start
};

struct RowError {
  int code;  // ErrorCode
  int64_t kind, idx, grid_row, actual, expected;
};

VLMKERN_HD void set_error(RowError* e, int code, int64_t kind, int64_t idx, int64_t grid_row,
                          int64_t actual, int64_t expected) {
  if (e->code == kOk) *e = RowError{code, kind, idx, grid_row, actual, expected};
}

template <typename K>
VLMKERN_HD ScanA pass_a(const K kind, int64_t b, int64_t lo, int64_t hi) {
  ScanA r = identity_a();
  for (int64_t s = lo; s < hi; ++s) {
    const int64_t k = kind(b, s);
    if (k == kNone) continue;
    ++r.n_valid;
    r.last_kind = k;
  }
  return r;
}

template <typename K>
VLMKERN_HD ScanB pass_b(const K kind, int64_t b, int64_t lo, int64_t hi, const ScanA& before) {
  ScanB r = identity_b();
  int64_t prev = before.last_kind, c = before.n_valid;
  for (int64_t s = lo; s < hi; ++s) {
    const int64_t k = kind(b, s);
    if (k == kNone) continue;
    if (k != kText && k != prev) {
      ++r.starts[k - 1];
      r.last_start = c;
    }
    prev = k;
    ++c;
  }
  return r;
}

template <typename K>
VLMKERN_HD ScanC pass_c(const Args& a, const K kind, int64_t b, int64_t lo, int64_t hi,
                        const ChunkIn& in) {
  ScanC r = identity_c();
  int64_t prev = in.a.last_kind;
  int64_t starts[2] = {in.b.starts[0], in.b.starts[1]};
  for (int64_t s = lo; s < hi; ++s) {
    const int64_t k = kind(b, s);
    if (k == kNone) continue;
    if (k == kText) {
      ++r.advance;
    } else if (k != prev) {
      const Geom g = block_geom(a, k, in.offset[k - 1] + starts[k - 1]++);
      if (g.error == kOk) r.advance += g.adv;
    }
    prev = k;
  }
  return r;
}

// The block open at a point of the row (the last valid token before it is a vision token), and a
// cursor on the next token of that block: its offset o and (ti, hi, wi) in the merged grid.
struct OpenBlock {
  int64_t kind, idx, first, start;
  Geom g;
  int64_t o, ti, hi, wi, tp;  // tp = start + temporal(ti)
};

VLMKERN_HD void seek(OpenBlock* ob, int64_t o) {
  ob->o = o;
  ob->ti = ob->hi = ob->wi = 0;
  if (ob->g.error == kOk && o < ob->g.len) {  // one division per chunk, increments afterwards
    const int64_t row = o / ob->g.w;
    ob->wi = o - row * ob->g.w;
    ob->ti = row / ob->g.h;
    ob->hi = row - ob->ti * ob->g.h;
  }
  ob->tp = ob->start + temporal(ob->g, ob->ti);
}

// Open block after the prefix (pa, pb) of a row whose next group would start at p (pa.last_kind
// is not a vision kind: no open block).
VLMKERN_HD OpenBlock open_block(const Args& a, const ScanA& pa, const ScanB& pb,
                                const int64_t offset[2], int64_t p) {
  OpenBlock ob{pa.last_kind, -1, pb.last_start, 0, Geom{}, 0, 0, 0, 0, 0};
  ob.g.error = kOk;
  ob.g.len = 0;
  ob.g.adv = 0;
  if (pa.last_kind == kImage || pa.last_kind == kVideo) {
    const int m = static_cast<int>(pa.last_kind - 1);
    ob.idx = offset[m] + pb.starts[m] - 1;
    ob.g = block_geom(a, pa.last_kind, ob.idx);
    ob.start = p - (ob.g.error == kOk ? ob.g.adv : 0);
    seek(&ob, pa.n_valid - ob.first);
  }
  return ob;
}

// A block ends at compacted index `end` (exclusive): check its length against its grid.
VLMKERN_HD void close_block(const OpenBlock& ob, int64_t end, RowError* err) {
  if (ob.g.error == kOk && end - ob.first != ob.g.len) {
    set_error(err, kLength, ob.kind, ob.idx, ob.g.grid_row, end - ob.first, ob.g.len);
  }
}

// Row b of the (3, B, S) output: its t plane, then h and w a plane apart.
struct RowOut {
  int64_t* row;
  int64_t plane;
  VLMKERN_HD RowOut(const Args& a, int64_t b) : row(a.pos + b * a.seq), plane(a.batch * a.seq) {}
  VLMKERN_HD void store(int64_t s, int64_t t, int64_t h, int64_t w) const {
    row[s] = t;
    row[plane + s] = h;
    row[2 * plane + s] = w;
  }
};

// Writes positions of tokens [lo, hi) of row b; returns the largest position written.
template <typename K>
VLMKERN_HD int64_t pass_d(const Args& a, const K kind, int64_t b, int64_t lo, int64_t hi,
                          const ChunkIn& in, RowError* err) {
  const RowOut out(a, b);
  int64_t best = kInt64Min;
  int64_t prev = in.a.last_kind, c = in.a.n_valid, p = in.p;
  int64_t starts[2] = {in.b.starts[0], in.b.starts[1]};
  OpenBlock cur = open_block(a, in.a, in.b, in.offset, p);
  for (int64_t s = lo; s < hi; ++s) {
    const int64_t k = kind(b, s);
    if (k == kNone) {
      out.store(s, 0, 0, 0);  // HF leaves padding at its zero initialisation
      continue;
    }
    if (k != prev && prev != kText && prev != kNone) close_block(cur, c, err);
    if (k == kText) {
      out.store(s, p, p, p);
      best = p > best ? p : best;
      ++p;
    } else {
      if (k != prev) {  // a new block starts here
        cur.kind = k;
        cur.idx = in.offset[k - 1] + starts[k - 1]++;
        cur.first = c;
        cur.start = p;
        cur.g = block_geom(a, k, cur.idx);
        if (cur.g.error != kOk) {
          set_error(err, cur.g.error, k, cur.idx, cur.g.grid_row, 0, 0);
        } else {
          p += cur.g.adv;
        }
        seek(&cur, 0);
      }
      if (cur.g.error != kOk || cur.o >= cur.g.len) {
        out.store(s, 0, 0, 0);  // inconsistent block: reported by close_block / set_error
      } else {
        const int64_t hp = cur.start + cur.hi, wp = cur.start + cur.wi;
        out.store(s, cur.tp, hp, wp);
        int64_t m = cur.tp > hp ? cur.tp : hp;
        m = m > wp ? m : wp;
        best = m > best ? m : best;
        if (++cur.wi == cur.g.w) {  // step the cursor in (t, h, w) order
          cur.wi = 0;
          if (++cur.hi == cur.g.h) {
            cur.hi = 0;
            cur.tp = cur.start + temporal(cur.g, ++cur.ti);
          }
        }
      }
      ++cur.o;
    }
    prev = k;
    ++c;
  }
  return best;
}

// After the whole row: check the block still open at the end and write rope_deltas[b].
VLMKERN_HD void finish_row(const Args& a, int64_t b, const ScanA& total_a, const ScanB& total_b,
                           const int64_t offset[2], int64_t row_max, RowError* err) {
  const OpenBlock last = open_block(a, total_a, total_b, offset, 0);
  if (last.kind == kImage || last.kind == kVideo) close_block(last, total_a.n_valid, err);
  const int64_t n = total_a.n_valid;
  a.deltas[b] = n > 0 ? row_max + 1 - n : 0;
}

}  // namespace mrope
}  // namespace vlmkern
