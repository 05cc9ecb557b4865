// Shared host-side pieces of the patch-embedding kernels: the compiled (pixel dtype, GEMM dtype)
// variant of an sm_90a kernel (PatchGemmVariant, PatchWgradVariant: pixels uint8 or the GEMM
// dtype, GEMM fp16 or bf16), the pixel-geometry checks (also the patchify kernel's) and kernel
// arguments. Torch-free; VLMKERN_WITH_CUTLASS_SM90 comes from CMake (CuTe headers, sm_90a).
#pragma once

#include <cstdint>

#include "cuda/patchify.h"

namespace vlmkern {

// Variant<in, out>::run, or nullptr for a pair without a variant or a build without the kernels.
template <template <PatchifyDtype, PatchifyDtype> class Variant, class RunFn>
RunFn find_patch_variant(PatchifyDtype in, PatchifyDtype out) {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  using D = PatchifyDtype;
  if (out == D::kBFloat16) {
    if (in == D::kUInt8) return &Variant<D::kUInt8, D::kBFloat16>::run;
    if (in == D::kBFloat16) return &Variant<D::kBFloat16, D::kBFloat16>::run;
  } else if (out == D::kFloat16) {
    if (in == D::kUInt8) return &Variant<D::kUInt8, D::kFloat16>::run;
    if (in == D::kFloat16) return &Variant<D::kFloat16, D::kFloat16>::run;
  }
#else
  (void)in, (void)out;
#endif
  return nullptr;
}

// The pixel-side checks both kernels share (Params: PatchGemmParams / PatchWgradParams): C, P >= 1,
// kp >= C*P*P a multiple of 8, non-negative strides, in-patch offsets that fit an int. nullptr:
// fine.
template <class Params>
const char* pixel_geometry_unsupported(const Params& p) {
  const int64_t k = int64_t{p.channels} * p.patch * p.patch;
  if (p.channels < 1 || p.patch < 1 || p.kp < k || p.kp % 8 != 0) {
    return "C, P >= 1 and kp >= C*P*P, a multiple of 8";
  }
  if (p.stride_c < 0 || p.stride_h < 0 || p.stride_w < 0 || p.stride_b < 0) {
    return "negative pixel strides";
  }
  const int64_t max_off =
      (p.channels - 1) * p.stride_c + (p.patch - 1) * (p.stride_h + p.stride_w);
  if (max_off >= (int64_t{1} << 31)) return "in-patch offsets past 2^31";
  return nullptr;
}

// The pixel-side kernel arguments both kernels share (Args: PatchGemmArgs / PatchWgradArgs):
// geometry, strides, K, and whether two adjacent elements may be loaded at once (every patch row
// base even in elements and the base pointer aligned to two elements).
template <class Args, class Params>
void set_pixel_args(Args& a, const Params& p) {
  a.pixels = p.pixels;
  a.l = p.gh * p.gw;
  a.m = p.batch * a.l;
  a.gw = p.gw;
  a.stride_b = p.stride_b;
  a.stride_c = p.stride_c;
  a.stride_h = p.stride_h;
  a.stride_w = p.stride_w;
  a.kp = p.kp;
  a.k = p.channels * p.patch * p.patch;
  a.channels = p.channels;
  a.patch = p.patch;
  a.channels_last = p.channels_last;
  const uintptr_t in_size = p.in_dtype == PatchifyDtype::kUInt8 ? 1 : 2;
  a.pair_loads = reinterpret_cast<uintptr_t>(p.pixels) % (2 * in_size) == 0 &&
                 p.stride_b % 2 == 0 && (p.patch * p.stride_h) % 2 == 0 &&
                 (p.patch * p.stride_w) % 2 == 0;
}

}  // namespace vlmkern
