// Argument checks and gather plans for pixel_shuffle / pixel_unshuffle (CPU and CUDA share them).
#include "common/pixel_shuffle.h"

#include <c10/util/safe_numerics.h>

#include "common/checks.h"

namespace vlmkern {

std::vector<int64_t> pixel_shuffle_out_sizes(const at::Tensor& input, int64_t scale, bool inverse) {
  const char* op = inverse ? "pixel_unshuffle" : "pixel_shuffle";
  const char* name = inverse ? "y" : "x";
  check_rank(input, 4, op, name, inverse ? "(B, h, w, r*r*C)" : "(B, H, W, C)");
  check_movable(input, op, name);
  VLMKERN_CHECK(scale >= 1, op, "scale must be >= 1, got ", scale);
  VLMKERN_CHECK(scale <= kMaxScale, op, "scale must be <= ", kMaxScale, ", got ", scale);
  const int64_t b = input.size(0), h = input.size(1), w = input.size(2), c = input.size(3);
  const int64_t rr = scale * scale;
  if (!inverse) {
    VLMKERN_CHECK(h % scale == 0, op, "x height H=", h, " is not divisible by scale=", scale);
    VLMKERN_CHECK(w % scale == 0, op, "x width W=", w, " is not divisible by scale=", scale);
    int64_t out_c = 0;
    VLMKERN_CHECK(!c10::mul_overflows(c, rr, &out_c), op, "x channels C=", c,
                  " times scale*scale=", rr, " overflows int64");
    return {b, h / scale, w / scale, out_c};
  }
  VLMKERN_CHECK(c % rr == 0, op, "y channels=", c, " is not divisible by scale*scale=", rr);
  int64_t out_h = 0, out_w = 0;
  VLMKERN_CHECK(!c10::mul_overflows(h, scale, &out_h) && !c10::mul_overflows(w, scale, &out_w), op,
                "y grid (", h, ", ", w, ") times scale=", scale, " overflows int64");
  return {b, out_h, out_w, c / rr};
}

GatherPlan pixel_shuffle_gather_plan(const at::Tensor& input, int64_t scale, bool inverse,
                                     const at::Tensor& out) {
  const int64_t r = scale;
  const auto st = input.strides();
  int64_t sizes[6], strides[6];
  if (!inverse) {
    // Output (b, i, j, dy, dx, c) reads x[b, r*i + dy, r*j + dx, c].
    const int64_t b = input.size(0), hc = input.size(1) / r, wc = input.size(2) / r;
    const int64_t c = input.size(3);
    const int64_t s[6] = {b, hc, wc, r, r, c};
    const int64_t t[6] = {st[0], r * st[1], r * st[2], st[1], st[2], st[3]};
    std::copy(s, s + 6, sizes);
    std::copy(t, t + 6, strides);
  } else {
    // Output (b, i, dy, j, dx, c) -- row-major (B, H, W, C) -- reads y[b, i, j, (dy*r + dx)*C + c].
    const int64_t b = input.size(0), hc = input.size(1), wc = input.size(2);
    const int64_t c = input.size(3) / (r * r);
    const int64_t s[6] = {b, hc, r, wc, r, c};
    const int64_t t[6] = {st[0], st[1], r * c * st[3], st[2], c * st[3], st[3]};
    std::copy(s, s + 6, sizes);
    std::copy(t, t + 6, strides);
  }
  return make_gather_plan(6, sizes, strides, static_cast<int>(input.element_size()),
                          reinterpret_cast<uintptr_t>(input.const_data_ptr()),
                          reinterpret_cast<uintptr_t>(out.const_data_ptr()));
}

}  // namespace vlmkern
