// Dispatch of the implicit-GEMM patch embedding over its compiled variants (instantiations/
// patch_gemm_*.cu, sm_90a with the CuTe headers), with the checks that decide whether a call may
// take it. No CuTe headers here.
#include <cstdint>

#include "cuda/patch_gemm.h"
#include "cuda/patch_variants.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

using RunFn = cudaError_t (*)(const PatchGemmArgs&, cudaStream_t);

RunFn find_variant(PatchifyDtype in, PatchifyDtype out) {
  return find_patch_variant<PatchGemmVariant, RunFn>(in, out);
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
  if (const char* why = pixel_geometry_unsupported(p)) return why;
  if (p.kp > 4096) return "kp past 4096 (the shared offset table)";
  if (p.d < 1 || p.d > INT32_MAX) return "D must be in [1, 2^31)";
  const int64_t m_tiles = (p.batch * p.gh * p.gw + 127) / 128, n_tiles = (p.d + 127) / 128;
  if (m_tiles * n_tiles > INT32_MAX) return "more than 2^31 - 1 output tiles";
  if (!aligned16(p.w)) return "w is not 16-byte aligned";
  if (!is_sm90(p.device)) return "the device is not compute capability 9.0 (sm_90a)";
  return nullptr;
}

cudaError_t cuda_patch_gemm(const PatchGemmParams& p, cudaStream_t stream) {
  const RunFn run = find_variant(p.in_dtype, p.dtype);
  if (run == nullptr) return cudaErrorInvalidValue;
  PatchGemmArgs a{};
  set_pixel_args(a, p);
  a.w = p.w;
  a.addend = p.addend;
  a.out = p.out;
  a.addend_row_stride = p.addend_row_stride;
  a.out_batch_stride = p.out_batch_stride;
  a.out_row_stride = p.out_row_stride;
  a.d = static_cast<int>(p.d);
  a.k_tiles = (p.kp + 63) / 64;
  a.n_tiles = static_cast<int>((p.d + 127) / 128);
  // Two-element stores need every row start 4-byte aligned: even strides and an even base.
  a.pair_stores = reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_batch_stride % 2 == 0 &&
                  p.out_row_stride % 2 == 0;
  if (a.m == 0) return cudaSuccess;
  return run(a, stream);
}

}  // namespace vlmkern
