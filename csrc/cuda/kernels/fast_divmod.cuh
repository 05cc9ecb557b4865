// Division by a runtime-constant divisor without the integer-divide sequence: 32-bit indices use a
// precomputed magic multiplier (valid for dividends < 2^31), 64-bit indices fall back to `/`.
#pragma once

#include <cstdint>

namespace vlmkern {

template <typename Index>
struct FastDivmod;

template <>
struct FastDivmod<uint32_t> {
  uint32_t divisor = 1, multiplier = 0, shift = 0;
  FastDivmod() = default;
  __host__ explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;  // shift = ceil(log2(d))
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (__umulhi(n, multiplier) + n) >> shift;
  }
};

template <>
struct FastDivmod<uint64_t> {
  uint64_t divisor = 1;
  FastDivmod() = default;
  __host__ explicit FastDivmod(uint64_t d) : divisor(d) {}
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / divisor; }
};

}  // namespace vlmkern
