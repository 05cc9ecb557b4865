// Dispatch of the pixel-shuffle GEMM over its compiled variants (instantiations/
// shuffle_gemm_*.cu, sm_90a with the CuTe headers), with the checks that decide whether a call may
// take it. No CuTe headers here.
#include <cstdint>

#include "cuda/shuffle_gemm.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

using RunFn = cudaError_t (*)(const ShuffleGemmArgs&, cudaStream_t);

RunFn find_variant(GemmDtype dtype) {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  return dtype == GemmDtype::kBFloat16 ? &ShuffleGemmVariant<GemmDtype::kBFloat16>::run
                                       : &ShuffleGemmVariant<GemmDtype::kFloat16>::run;
#else
  (void)dtype;
  return nullptr;
#endif
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

bool shuffle_gemm_compiled() { return find_variant(GemmDtype::kBFloat16) != nullptr; }

const char* shuffle_gemm_unsupported(const ShuffleGemmParams& p) {
  if (!shuffle_gemm_compiled()) return "built without the sm_90a CuTe kernels";
  if (p.r < 1 || p.c < 1 || p.h % p.r != 0 || p.w % p.r != 0) return "r must divide H and W";
  const int64_t k = int64_t{p.r} * p.r * p.c;
  if (p.c % 8 != 0 || k > INT32_MAX / 2 || p.n < 1 || p.n > INT32_MAX) {
    return "C must be a multiple of 8 (16-byte chunks), K and N in the int range";
  }
  if (p.stride_b % 8 != 0 || p.stride_h % 8 != 0 || p.stride_w % 8 != 0 || p.stride_b < 0 ||
      p.stride_h < 0 || p.stride_w < 0 || !aligned(p.x, 16)) {
    return "x's base and token strides must be 16-byte aligned";
  }
  if (!aligned(p.weight, 16) || !aligned(p.out, 4) || (p.bias != nullptr && !aligned(p.bias, 2))) {
    return "weight must be 16-byte aligned, out 4-byte aligned";
  }
  if (p.table != nullptr && (p.tap_index == nullptr || p.tap_weight == nullptr)) {
    return "a position table needs its tap rows and weights";
  }
  if (p.norm_rstd != nullptr) {
    const int64_t k = int64_t{p.r} * p.r * p.c;
    if (p.table != nullptr) return "a norm and a position table";
    if (p.norm_rms ? (p.norm_mean != nullptr || p.norm_bias != nullptr) : p.norm_mean == nullptr) {
      return "an RMSNorm has no mean nor bias; a LayerNorm needs its mean";
    }
    if (p.norm_groups < 1 || k % p.norm_groups != 0 || (k / p.norm_groups) % 8 != 0) {
      return "the norm's groups must split K into multiples of 8 features";
    }
    if (!aligned(p.norm_weight, 16) || !aligned(p.norm_bias, 16)) {
      return "the norm's weight and bias must be 16-byte aligned";
    }
  }
  const int64_t m = p.batch * (p.h / p.r) * (p.w / p.r);
  if ((m + 127) / 128 * ((p.n + 127) / 128) > INT32_MAX) return "more than 2^31 - 1 tiles";
  if (!is_sm90(p.device)) return "the device is not compute capability 9.0 (sm_90a)";
  return nullptr;
}

cudaError_t cuda_shuffle_gemm(const ShuffleGemmParams& p, cudaStream_t stream) {
  const RunFn run = find_variant(p.dtype);
  if (run == nullptr) return cudaErrorInvalidValue;
  ShuffleGemmArgs a{};
  a.x = p.x;
  a.weight = p.weight;
  a.bias = p.bias;
  a.out = p.out;
  a.grid_rows = p.h / p.r;
  a.grid_cols = p.w / p.r;
  a.m = p.batch * a.grid_rows * a.grid_cols;
  a.stride_b = p.stride_b;
  a.stride_h = p.stride_h;
  a.stride_w = p.stride_w;
  a.c = p.c;
  a.r = p.r;
  a.k = p.r * p.r * p.c;
  a.n = static_cast<int>(p.n);
  a.k_tiles = (a.k + 63) / 64;
  a.n_tiles = (a.n + 127) / 128;
  a.pair_stores = p.n % 2 == 0;  // out is (M, N) contiguous and 4-byte aligned (checked)
  a.table = p.table;
  a.tap_index = p.tap_index;
  a.tap_weight = p.tap_weight;
  a.norm_mean = p.norm_mean;
  a.norm_rstd = p.norm_rstd;
  a.norm_weight = p.norm_weight;
  a.norm_bias = p.norm_bias;
  a.norm_groups = p.norm_groups;
  a.norm_group_size = p.norm_groups > 0 ? a.k / p.norm_groups : a.k;
  a.norm_rms = p.norm_rms;
  if (a.m == 0) return cudaSuccess;
  return run(a, stream);
}

}  // namespace vlmkern
