// Dispatch of the fused GEMM + bias + activation over the compiled CUTLASS variants, with the
// device and alignment checks that decide whether a call may take it (no CUTLASS headers here).
#include <cstdint>

#include "cuda/gemm_bias_act.h"
#include "cuda/sm90.h"

namespace vlmkern {
namespace {

// The entry points of one compiled variant.
struct VariantOps {
  bool (*can_implement)(const GemmBiasActParams&);
  size_t (*workspace_size)(const GemmBiasActParams&);
  cudaError_t (*run)(const GemmBiasActParams&, void*, cudaStream_t);
};

template <class V>
constexpr VariantOps ops_of() {
  return {&V::can_implement, &V::workspace_size, &V::run};
}

// The compiled variant of (dtype, act, aux, schedule), or nullptr. VLMKERN_WITH_CUTLASS_SM90
// comes from CMake (CUTLASS headers found and sm_90a among the targets), VLMKERN_WITH_CUTLASS_SM80
// (CUTLASS headers found) too; each entry is one file in cuda/instantiations/. The projector
// needs GEMM1 = gelu + aux (hidden is an output) and GEMM2 = identity; its other activations take
// the identity kernel, then ATen's activation.
const VariantOps* find_variant(GemmDtype dtype, GemmActivation act, bool aux,
                               GemmSchedule sched) {
  if (sched == GemmSchedule::kSm80) {
#if defined(VLMKERN_WITH_CUTLASS_SM80)
    using D = GemmDtype;
    using A = GemmActivation;
    static constexpr VariantOps kBf16Identity =
        ops_of<GemmBiasActSm80<D::kBFloat16, A::kIdentity, false>>();
    static constexpr VariantOps kBf16GeluAux =
        ops_of<GemmBiasActSm80<D::kBFloat16, A::kGelu, true>>();
    static constexpr VariantOps kFp16Identity =
        ops_of<GemmBiasActSm80<D::kFloat16, A::kIdentity, false>>();
    static constexpr VariantOps kFp16GeluAux =
        ops_of<GemmBiasActSm80<D::kFloat16, A::kGelu, true>>();
    const bool bf16 = dtype == D::kBFloat16;
    if (act == A::kIdentity && !aux) return bf16 ? &kBf16Identity : &kFp16Identity;
    if (act == A::kGelu && aux) return bf16 ? &kBf16GeluAux : &kFp16GeluAux;
#endif
    return nullptr;
  }
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  using D = GemmDtype;
  using A = GemmActivation;
  static constexpr VariantOps kBf16Identity =
      ops_of<GemmBiasActVariant<D::kBFloat16, A::kIdentity, false>>();
  static constexpr VariantOps kBf16GeluAux =
      ops_of<GemmBiasActVariant<D::kBFloat16, A::kGelu, true>>();
  static constexpr VariantOps kFp16Identity =
      ops_of<GemmBiasActVariant<D::kFloat16, A::kIdentity, false>>();
  static constexpr VariantOps kFp16GeluAux =
      ops_of<GemmBiasActVariant<D::kFloat16, A::kGelu, true>>();
  static constexpr VariantOps kBf16GeluAuxPingpong =
      ops_of<GemmBiasActVariant<D::kBFloat16, A::kGelu, true, GemmSchedule::kPingpong>>();
  static constexpr VariantOps kFp16GeluAuxPingpong =
      ops_of<GemmBiasActVariant<D::kFloat16, A::kGelu, true, GemmSchedule::kPingpong>>();
  static constexpr VariantOps kBf16IdentityWide =
      ops_of<GemmBiasActVariant<D::kBFloat16, A::kIdentity, false,
                                GemmSchedule::kCooperativeWide>>();
  static constexpr VariantOps kBf16GeluAuxWide =
      ops_of<GemmBiasActVariant<D::kBFloat16, A::kGelu, true, GemmSchedule::kCooperativeWide>>();
  static constexpr VariantOps kFp16IdentityWide =
      ops_of<GemmBiasActVariant<D::kFloat16, A::kIdentity, false,
                                GemmSchedule::kCooperativeWide>>();
  static constexpr VariantOps kFp16GeluAuxWide =
      ops_of<GemmBiasActVariant<D::kFloat16, A::kGelu, true, GemmSchedule::kCooperativeWide>>();
  const bool bf16 = dtype == D::kBFloat16;
  if (sched == GemmSchedule::kCooperativeWide) {
    if (act == A::kIdentity && !aux) return bf16 ? &kBf16IdentityWide : &kFp16IdentityWide;
    if (act == A::kGelu && aux) return bf16 ? &kBf16GeluAuxWide : &kFp16GeluAuxWide;
    return nullptr;
  }
  if (sched == GemmSchedule::kPingpong) {
    if (act == A::kGelu && aux) return bf16 ? &kBf16GeluAuxPingpong : &kFp16GeluAuxPingpong;
    return nullptr;
  }
  if (act == A::kIdentity && !aux) return bf16 ? &kBf16Identity : &kFp16Identity;
  if (act == A::kGelu && aux) return bf16 ? &kBf16GeluAux : &kFp16GeluAux;
#else
  (void)dtype, (void)act, (void)aux, (void)sched;
#endif
  return nullptr;
}

}  // namespace

bool gemm_bias_act_compiled() {
#if defined(VLMKERN_WITH_CUTLASS_SM90)
  return true;
#else
  return false;
#endif
}

bool gemm_bias_act_sm80_compiled() {
#if defined(VLMKERN_WITH_CUTLASS_SM80)
  return true;
#else
  return false;
#endif
}

const char* gemm_bias_act_unsupported(const GemmBiasActParams& p) {
  const bool sm80 = p.schedule == GemmSchedule::kSm80;
  if (!(sm80 ? gemm_bias_act_sm80_compiled() : gemm_bias_act_compiled())) {
    return sm80 ? "built without the CUTLASS headers" : "built without the CUTLASS sm_90a path";
  }
  const VariantOps* ops = find_variant(p.dtype, p.act, p.aux != nullptr, p.schedule);
  if (ops == nullptr) return "no kernel compiled for this dtype / activation / aux";
  if (const char* why = tma_gemm_shape_unsupported(p.m, p.n, p.k, p.lda)) return why;
  // (The Hopper epilogue reads the bias element by element: any alignment; the sm_80 one in
  // 8-element vectors.)
  if (!aligned16(p.a) || !aligned16(p.w) || !aligned16(p.out) ||
      (p.aux != nullptr && !aligned16(p.aux)) || (sm80 && !aligned16(p.bias))) {
    return "a pointer is not 16-byte aligned";
  }
  if (sm80 ? compute_capability(p.device) < 80 : !is_sm90(p.device)) {
    return sm80 ? "the device is older than compute capability 8.0"
                : "the device is not compute capability 9.0 (sm_90a)";
  }
  if (!ops->can_implement(p)) return "CUTLASS can_implement rejected the problem";
  return nullptr;
}

size_t gemm_bias_act_workspace_size(const GemmBiasActParams& p) {
  const VariantOps* ops = find_variant(p.dtype, p.act, p.aux != nullptr, p.schedule);
  return ops != nullptr ? ops->workspace_size(p) : 0;
}

cudaError_t gemm_bias_act(const GemmBiasActParams& p, void* workspace, cudaStream_t stream) {
  const VariantOps* ops = find_variant(p.dtype, p.act, p.aux != nullptr, p.schedule);
  if (ops == nullptr) return cudaErrorNotSupported;
  return ops->run(p, workspace, stream);
}

}  // namespace vlmkern
