// The fused GEMM + bias + activation kernel for every sm_80+ GPU (A100, L40S, H100 ...): CUTLASS
// 2.x multistage mainloop (cp.async, mma.sync m16n8k16, fp32 accumulation) with the
// broadcast epilogue: z = acc + bias (fp32), out = act(z), optionally aux = z (the
// pre-activation). The same function as the Hopper kernel (kernels/gemm_bias_act.cuh): GELU is
// CUTLASS's GELU<float>, 0.5x(1 + erff(x/√2)) with the accurate erff.
// Include only from cuda/instantiations/sm80_gemm_bias_act_*.cu (CUTLASS headers; compiled for
// every arch of the build, not sm_90a alone).
#pragma once

#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/thread/linear_combination_bias_elementwise.h>
#include <cutlass/gemm/device/gemm_universal_with_broadcast.h>
#include <cutlass/half.h>
#include <cutlass/layout/matrix.h>

#include <type_traits>

#include "cuda/gemm_bias_act.h"

namespace vlmkern {
namespace gemm_bias_act_sm80_detail {

template <GemmDtype D>
using Element = std::conditional_t<D == GemmDtype::kBFloat16, cutlass::bfloat16_t,
                                   cutlass::half_t>;

template <GemmActivation A>
struct Act;
template <>
struct Act<GemmActivation::kIdentity> { using type = cutlass::epilogue::thread::Identity<float>; };
template <>
struct Act<GemmActivation::kGelu> { using type = cutlass::epilogue::thread::GELU<float>; };

// A (M, K) row-major at row stride lda, W (N, K) contiguous = B (K, N) column-major, out / aux
// (M, N) row-major; 128 x 128 x 32 CTA tiles on 4 warps of 64 x 64, 4 stages (64 KiB of shared
// memory), 16-byte (8-element) accesses everywhere.
template <GemmDtype kDtype, GemmActivation kAct, bool kAux>
struct Kernel {
  using T = Element<kDtype>;
  using Epilogue = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
      T, float, float, T, T, 8, typename Act<kAct>::type, cutlass::plus<float>, kAux>;
  using Gemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
      T, cutlass::layout::RowMajor, T, cutlass::layout::ColumnMajor, T, cutlass::layout::RowMajor,
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, 4, 8, 8>;

  static typename Gemm::Arguments arguments(const GemmBiasActParams& p) {
    const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
    return typename Gemm::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k}, /*batch_count=*/1,
        typename Epilogue::Params(1.0f, 0.0f), p.a, p.w, /*ptr_C=*/nullptr, p.out,
        const_cast<void*>(p.bias), kAux ? p.aux : nullptr, /*batch strides*/ 0, 0, 0, 0, 0, 0,
        /*lda=*/p.lda, /*ldb=*/p.k, /*ldc=*/p.n, /*ldd=*/p.n, /*ldr (bias per row tile)=*/0,
        /*ldt=*/p.n);
  }
};

}  // namespace gemm_bias_act_sm80_detail

template <GemmDtype kDtype, GemmActivation kAct, bool kAux>
bool GemmBiasActSm80<kDtype, kAct, kAux>::can_implement(const GemmBiasActParams& p) {
  using K = gemm_bias_act_sm80_detail::Kernel<kDtype, kAct, kAux>;
  return K::Gemm::can_implement(K::arguments(p)) == cutlass::Status::kSuccess;
}

template <GemmDtype kDtype, GemmActivation kAct, bool kAux>
size_t GemmBiasActSm80<kDtype, kAct, kAux>::workspace_size(const GemmBiasActParams& p) {
  using K = gemm_bias_act_sm80_detail::Kernel<kDtype, kAct, kAux>;
  return K::Gemm::get_workspace_size(K::arguments(p));
}

template <GemmDtype kDtype, GemmActivation kAct, bool kAux>
cudaError_t GemmBiasActSm80<kDtype, kAct, kAux>::run(const GemmBiasActParams& p, void* workspace,
                                                    cudaStream_t stream) {
  using K = gemm_bias_act_sm80_detail::Kernel<kDtype, kAct, kAux>;
  typename K::Gemm gemm;
  // initialize() sets the kernel's dynamic shared-memory limit (a host call, per device).
  cutlass::Status st = gemm.initialize(K::arguments(p), workspace, stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return cudaErrorUnknown;
  return cudaGetLastError();
}

}  // namespace vlmkern
