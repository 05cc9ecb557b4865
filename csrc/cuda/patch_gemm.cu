// Dispatch of the implicit-GEMM patch embedding over its compiled variants (instantiations/
// patch_gemm_*.cu, sm_90a with the CuTe headers), with the checks that decide whether a call may
// take it. No CuTe headers here.
#include <cstdint>

#include "cuda/patch_gemm.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

using RunFn = cudaError_t (*)(const PatchGemmArgs&, cudaStream_t);

// The compiled variant for (pixel dtype, GEMM dtype), or nullptr. VLMKERN_WITH_CUTLASS_SM90 comes
// from CMake (CUTLASS / CuTe headers found, sm_90a among the targets).
RunFn find_variant(PatchifyDtype in, PatchifyDtype out) {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  using D = PatchifyDtype;
  if (out == D::kBFloat16) {
    if (in == D::kUInt8) return &PatchGemmVariant<D::kUInt8, D::kBFloat16>::run;
    if (in == D::kBFloat16) return &PatchGemmVariant<D::kBFloat16, D::kBFloat16>::run;
  } else if (out == D::kFloat16) {
    if (in == D::kUInt8) return &PatchGemmVariant<D::kUInt8, D::kFloat16>::run;
    if (in == D::kFloat16) return &PatchGemmVariant<D::kFloat16, D::kFloat16>::run;
  }
#else
  (void)in, (void)out;
#endif
  return nullptr;
}

}  // namespace

bool patch_gemm_compiled() {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  return true;
#else
  return false;
#endif
}

const char* patch_gemm_unsupported(const PatchGemmParams& p) {
  if (!patch_gemm_compiled()) return "built without the sm_90a CuTe kernels";
  if (find_variant(p.in_dtype, p.dtype) == nullptr) {
    return "no variant for this dtype pair (pixels uint8 or the GEMM dtype; fp16 / bf16 GEMM)";
  }
  const int64_t k = int64_t{p.channels} * p.patch * p.patch;
  if (p.channels < 1 || p.patch < 1 || p.kp < k || p.kp % 8 != 0 || p.kp > 4096) {
    return "C, P >= 1 and kp >= C*P*P, a multiple of 8, at most 4096";
  }
  if (p.d < 1 || p.d > INT32_MAX) return "D must be in [1, 2^31)";
  const int64_t m_tiles = (p.batch * p.gh * p.gw + 127) / 128, n_tiles = (p.d + 127) / 128;
  if (m_tiles * n_tiles > INT32_MAX) return "more than 2^31 - 1 output tiles";
  if (p.stride_c < 0 || p.stride_h < 0 || p.stride_w < 0 || p.stride_b < 0) {
    return "negative pixel strides";
  }
  const int64_t max_off =
      (p.channels - 1) * p.stride_c + (p.patch - 1) * (p.stride_h + p.stride_w);
  if (max_off >= (int64_t{1} << 31)) return "in-patch offsets past 2^31";
  if (reinterpret_cast<uintptr_t>(p.w) % 16 != 0) return "w is not 16-byte aligned";
  if (!is_sm90(p.device)) return "the device is not compute capability 9.0 (sm_90a)";
  return nullptr;
}

cudaError_t cuda_patch_gemm(const PatchGemmParams& p, cudaStream_t stream) {
  const RunFn run = find_variant(p.in_dtype, p.dtype);
  if (run == nullptr) return cudaErrorInvalidValue;
  PatchGemmArgs a{};
  a.pixels = p.pixels;
  a.w = p.w;
  a.addend = p.addend;
  a.out = p.out;
  a.l = p.gh * p.gw;
  a.m = p.batch * a.l;
  a.gw = p.gw;
  a.stride_b = p.stride_b;
  a.stride_c = p.stride_c;
  a.stride_h = p.stride_h;
  a.stride_w = p.stride_w;
  a.addend_row_stride = p.addend_row_stride;
  a.out_batch_stride = p.out_batch_stride;
  a.out_row_stride = p.out_row_stride;
  a.d = static_cast<int>(p.d);
  a.kp = p.kp;
  a.k = p.channels * p.patch * p.patch;
  a.k_tiles = (p.kp + 63) / 64;
  a.n_tiles = static_cast<int>((p.d + 127) / 128);
  a.channels = p.channels;
  a.patch = p.patch;
  a.channels_last = p.channels_last;
  // Two-element stores need every row start 4-byte aligned: even strides and an even base.
  a.pair_stores = reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_batch_stride % 2 == 0 &&
                  p.out_row_stride % 2 == 0;
  // Two-element loads need every patch row base even (in elements) and the base pointer aligned.
  const size_t in_size = p.in_dtype == PatchifyDtype::kUInt8 ? 1 : 2;
  a.pair_loads = reinterpret_cast<uintptr_t>(p.pixels) % (2 * in_size) == 0 &&
                 p.stride_b % 2 == 0 && (p.patch * p.stride_h) % 2 == 0 &&
                 (p.patch * p.stride_w) % 2 == 0;
  if (a.m == 0) return cudaSuccess;
  return run(a, stream);
}

}  // namespace vlmkern
