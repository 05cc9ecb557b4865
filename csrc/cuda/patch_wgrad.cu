// Dispatch of the implicit-GEMM patch-embedding weight gradient over its compiled variants
// (instantiations/patch_wgrad_*.cu, sm_90a with the CuTe headers): checks, the split count, the
// kernel's arguments. No CuTe headers here.
#include <cstdint>

#include "cuda/patch_wgrad.h"
#include "cuda/patch_variants.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

using RunFn = cudaError_t (*)(const PatchWgradArgs&, cudaStream_t);

RunFn find_variant(PatchifyDtype in, PatchifyDtype out) {
  return find_patch_variant<PatchWgradVariant, RunFn>(in, out);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool patch_wgrad_compiled() {
  return find_variant(PatchifyDtype::kUInt8, PatchifyDtype::kBFloat16) != nullptr;
}

const char* patch_wgrad_unsupported(const PatchWgradParams& p) {
  if (!patch_wgrad_compiled()) return "built without the sm_90a CuTe kernels";
  if (find_variant(p.in_dtype, p.dtype) == nullptr) {
    return "no variant for this dtype pair (pixels uint8 or the GEMM dtype; fp16 / bf16 GEMM)";
  }
  if (const char* why = pixel_geometry_unsupported(p)) return why;
  if (p.normalize && p.channels > kPatchWgradMaxChannels) return "normalization over > 4 channels";
  if (p.d < 8 || p.d % 8 != 0 || p.d > INT32_MAX / 2) return "D must be a multiple of 8";
  if (p.g_batch_stride % 8 != 0 || p.g_row_stride % 8 != 0 || p.g_batch_stride < 0 ||
      !aligned16(p.grad)) {
    return "grad rows must be 16-byte aligned";
  }
  if (!is_sm90(p.device)) return "the device is not compute capability 9.0 (sm_90a)";
  return nullptr;
}

int patch_wgrad_splits(const PatchWgradParams& p) {
  int sms = 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device) != cudaSuccess) {
    cudaGetLastError();
    sms = 132;
  }
  const int64_t m = p.batch * p.gh * p.gw;
  const int64_t tiles = ceil_div(p.kp, 128) * ceil_div(p.d, 128);
  // Two CTAs per SM fit (~84 KiB smem): as many splits as one wave holds, never a second wave.
  int64_t splits = 2 * int64_t{sms} / tiles;
  const int64_t row_tiles = ceil_div(m, 64);
  splits = splits < row_tiles ? splits : row_tiles;
  splits = splits < 1 ? 1 : splits;
  const int64_t chunk = ceil_div(ceil_div(m, splits), 64) * 64;  // rows per split
  return static_cast<int>(m > 0 ? ceil_div(m, chunk) : 1);  // every split gets rows
}

cudaError_t cuda_patch_wgrad(const PatchWgradParams& p, cudaStream_t stream) {
  const RunFn run = find_variant(p.in_dtype, p.dtype);
  if (run == nullptr || p.splits < 1) return cudaErrorInvalidValue;
  PatchWgradArgs a{};
  set_pixel_args(a, p);
  a.grad = p.grad;
  a.ws = p.ws;
  a.g_batch_stride = p.g_batch_stride;
  a.g_row_stride = p.g_row_stride;
  a.m_chunk = ceil_div(ceil_div(a.m, p.splits), 64) * 64;
  a.d = static_cast<int>(p.d);
  a.kf_tiles = static_cast<int>(ceil_div(p.kp, 128));
  a.n_tiles = static_cast<int>(ceil_div(p.d, 128));
  a.splits = p.splits;
  a.normalize = p.normalize ? 1 : 0;
  for (int c = 0; c < kPatchWgradMaxChannels; ++c) {
    a.scale[c] = p.scale[c];
    a.offset[c] = p.offset[c];
  }
  return run(a, stream);
}

}  // namespace vlmkern
