// CPU executor for a GatherPlan: at::parallel_for over rows of the innermost dim; each row is one
// memcpy when the source row is contiguous, else a strided element loop. Outputs larger than the
// caches are written with non-temporal stores, which skip the read-for-ownership of the
// destination lines (a third of a plain copy's memory traffic).
#include "cpu/strided_gather.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace vlmkern {
namespace {

// Outputs at least this large bypass the caches (they would evict everything anyway).
constexpr int64_t kStreamingBytes = int64_t{4} << 20;

// n bytes, dst 16-byte aligned, n % 16 == 0.
inline void copy_streaming(char* dst, const char* src, int64_t n) {
#if defined(__SSE2__)
  for (int64_t i = 0; i < n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
  }
#else
  std::memcpy(dst, src, static_cast<size_t>(n));
#endif
}

// Copies rows [row_begin, row_end) of the output, each plan.sizes[ndim-1] units long.
template <int kBytes>
void gather_rows(const GatherPlan& p, const char* in, char* out, int64_t row_begin,
                 int64_t row_end, bool streaming) {
  const int inner_dim = p.ndim - 1;
  const int64_t inner = p.sizes[inner_dim];
  const int64_t inner_stride = p.in_strides[inner_dim];
  // Source offset of the first row, then advance it like an odometer.
  int64_t coord[kMaxGatherDims] = {};
  int64_t rem = row_begin, offset = 0;
  for (int d = inner_dim - 1; d >= 0; --d) {
    coord[d] = rem % p.sizes[d];
    rem /= p.sizes[d];
    offset += coord[d] * p.in_strides[d];
  }
  char* dst = out + row_begin * inner * kBytes;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const char* src = in + offset * kBytes;
    if (inner_stride == 1 && streaming) {
      copy_streaming(dst, src, inner * kBytes);
    } else if (inner_stride == 1) {
      std::memcpy(dst, src, static_cast<size_t>(inner) * kBytes);
    } else {
      for (int64_t k = 0; k < inner; ++k) {
        std::memcpy(dst + k * kBytes, src + k * inner_stride * kBytes, kBytes);
      }
    }
    dst += inner * kBytes;
    for (int d = inner_dim - 1; d >= 0; --d) {
      offset += p.in_strides[d];
      if (++coord[d] < p.sizes[d]) break;
      offset -= coord[d] * p.in_strides[d];
      coord[d] = 0;
    }
  }
#if defined(__SSE2__)
  if (streaming) _mm_sfence();  // order the weakly-ordered stores before the task ends
#endif
}

template <int kBytes>
void run(const GatherPlan& p, const void* in, void* out) {
  const int64_t inner = p.sizes[p.ndim - 1];
  const int64_t rows = p.total / inner;
  // Aim for ~64 KiB of output per task so small copies stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (inner * kBytes));
  // Every row starts 16-byte aligned when the output does and rows are whole 16-byte units.
  const bool streaming = p.total * kBytes >= kStreamingBytes && (inner * kBytes) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    gather_rows<kBytes>(p, static_cast<const char*>(in), static_cast<char*>(out), begin, end,
                        streaming);
  });
}

}  // namespace

void cpu_strided_gather(const GatherPlan& plan, const void* in, void* out) {
  if (plan.total == 0) return;
  switch (plan.unit_bytes) {
    case 1: return run<1>(plan, in, out);
    case 2: return run<2>(plan, in, out);
    case 4: return run<4>(plan, in, out);
    case 8: return run<8>(plan, in, out);
    case 16: return run<16>(plan, in, out);
    default: TORCH_CHECK(false, "vlmkern: unsupported gather unit of ", plan.unit_bytes, " bytes");
  }
}

}  // namespace vlmkern
