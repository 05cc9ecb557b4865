// Launches patchify_kernel (cuda/kernels/patchify.cuh) for the supported dtype pairs: the GEMM
// dtype (fp32 / fp16 / bf16) from itself or from uint8 pixels.
#include <cstdint>
#include <type_traits>

#include "cuda/kernels/patchify.cuh"
#include "cuda/patch_variants.h"
#include "cuda/patchify.h"

namespace vlmkern {
namespace {

template <typename In, typename Out>
cudaError_t launch(const PatchifyParams& p, const PatchifyArgs& a, cudaStream_t stream) {
  // Enough blocks to fill the GPU several times over; each strides over row groups, reusing its
  // offset table.
  const int64_t groups = (a.rows + kPatchifyRows - 1) / kPatchifyRows;
  const unsigned blocks = static_cast<unsigned>(groups < 4096 ? groups : 4096);
  const size_t smem = sizeof(int) * static_cast<size_t>(a.kp);
  patchify_kernel<In, Out><<<blocks, kPatchifyThreads, smem, stream>>>(
      static_cast<const In*>(p.pixels), static_cast<Out*>(p.out), a);
  return cudaGetLastError();
}

template <typename Out>
cudaError_t launch_out(const PatchifyParams& p, const PatchifyArgs& a, cudaStream_t stream) {
  if (p.in_dtype == PatchifyDtype::kUInt8) return launch<uint8_t, Out>(p, a, stream);
  return launch<Out, Out>(p, a, stream);
}

}  // namespace

const char* patchify_unsupported(const PatchifyParams& p) {
  if (p.in_dtype != PatchifyDtype::kUInt8 && p.in_dtype != p.out_dtype) {
    return "pixels must be uint8 or the GEMM dtype";
  }
  if (p.out_dtype == PatchifyDtype::kUInt8) return "the GEMM dtype cannot be uint8";
  // Largest in-patch offset must fit the int table (strides are non-negative: checked there).
  if (const char* why = pixel_geometry_unsupported(p)) return why;
  if (size_t{4} * p.kp > 48 * 1024) return "kp too large for the shared offset table";
  return nullptr;
}

cudaError_t cuda_patchify(const PatchifyParams& p, cudaStream_t stream) {
  PatchifyArgs a;
  a.rows = p.batch * p.gh * p.gw;
  a.gh = p.gh;
  a.gw = p.gw;
  a.channels = p.channels;
  a.patch = p.patch;
  a.k = p.channels * p.patch * p.patch;
  a.kp = p.kp;
  a.channels_last = p.channels_last;
  a.stride_b = p.stride_b;
  a.stride_c = p.stride_c;
  a.stride_h = p.stride_h;
  a.stride_w = p.stride_w;
  if (a.rows == 0) return cudaSuccess;
  switch (p.out_dtype) {
    case PatchifyDtype::kFloat32: return launch_out<float>(p, a, stream);
    case PatchifyDtype::kFloat16: return launch_out<__half>(p, a, stream);
    case PatchifyDtype::kBFloat16: return launch_out<__nv_bfloat16>(p, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace vlmkern
