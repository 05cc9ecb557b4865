// Dispatch of the fused GELU-backward GEMM over its compiled CUTLASS variants, with the device and
// alignment checks that decide whether a call may take it (no CUTLASS headers here).
#include <cstdint>

#include "cuda/gemm_dgelu.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

struct VariantOps {
  bool (*can_implement)(const GemmDGeluParams&);
  size_t (*workspace_size)(const GemmDGeluParams&);
  cudaError_t (*run)(const GemmDGeluParams&, void*, cudaStream_t);
};

// The compiled variant of `dtype` (cuda/instantiations/gemm_dgelu_*.cu), or nullptr without the
// CUTLASS sm_90a path (VLMKERN_WITH_CUTLASS_SM90 comes from CMake).
const VariantOps* find_variant(GemmDtype dtype) {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  using Bf16 = GemmDGeluVariant<GemmDtype::kBFloat16>;
  using Fp16 = GemmDGeluVariant<GemmDtype::kFloat16>;
  static constexpr VariantOps kBf16{&Bf16::can_implement, &Bf16::workspace_size, &Bf16::run};
  static constexpr VariantOps kFp16{&Fp16::can_implement, &Fp16::workspace_size, &Fp16::run};
  return dtype == GemmDtype::kBFloat16 ? &kBf16 : &kFp16;
#else
  (void)dtype;
  return nullptr;
#endif
}

}  // namespace

const char* gemm_dgelu_unsupported(const GemmDGeluParams& p) {
  const VariantOps* ops = find_variant(p.dtype);
  if (ops == nullptr) return "built without the CUTLASS sm_90a path";
  if (const char* why = tma_gemm_shape_unsupported(p.m, p.n, p.k, p.ldg)) return why;
  if (!aligned16(p.g) || !aligned16(p.w) || !aligned16(p.pre) || !aligned16(p.out)) {
    return "a pointer is not 16-byte aligned";
  }
  if (!is_sm90(p.device)) return "the device is not compute capability 9.0 (sm_90a)";
  if (!ops->can_implement(p)) return "CUTLASS can_implement rejected the problem";
  return nullptr;
}

size_t gemm_dgelu_workspace_size(const GemmDGeluParams& p) {
  const VariantOps* ops = find_variant(p.dtype);
  return ops != nullptr ? ops->workspace_size(p) : 0;
}

cudaError_t gemm_dgelu(const GemmDGeluParams& p, void* workspace, cudaStream_t stream) {
  const VariantOps* ops = find_variant(p.dtype);
  if (ops == nullptr) return cudaErrorNotSupported;
  return ops->run(p, workspace, stream);
}

}  // namespace vlmkern
