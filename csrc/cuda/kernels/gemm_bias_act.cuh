// The fused GEMM + bias + activation kernel for Hopper (sm_90a): CUTLASS 3.x TMA warp-specialized
// cooperative or pingpong mainloop; EVT epilogue: per-column bias, fp32 activation, opt.
// pre-activation aux.
// Include only from cuda/instantiations/*.cu (CUTLASS headers: ~1 min of nvcc per variant).
#pragma once

#include <cstdio>

#include <cutlass/cutlass.h>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/half.h>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/layout/matrix.h>

#include <type_traits>

#include "cuda/gemm_bias_act.h"

namespace vlmkern {
namespace gemm_bias_act_detail {

// ---- activations, evaluated in fp32 (Sm90Compute calls Fn<Array<float, N>>) -------------------
// GELU (erf): CUTLASS's GELU<float> is 0.5x(1 + erff(x/√2)) with the accurate erff (this build has
// no --use_fast_math), the same formula as torch's CUDA gelu. GELU (tanh): CUTLASS's GELU_taylor
// uses fast_tanh = tanh.approx.f32 (relative error ~2^-11, about one fp16 ulp), which can exceed
// the fp16 "2x PyTorch's error" rule, so ours is torch's formula with the accurate tanhf.

template <class T>
struct GeluTanhAccurate {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& value) const {
    const float x = static_cast<float>(value);
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // √(2/π)(x + κx³)
    return static_cast<T>(0.5f * x * (1.0f + tanhf(inner)));
  }
};

template <class T, int N>
struct GeluTanhAccurate<cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const {
    cutlass::Array<T, N> y;
    GeluTanhAccurate<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = op(v[i]);
    return y;
  }
};

// HF's QuickGELU, x * sigmoid(1.702x), as x / (1 + expf(-1.702x)) with the accurate expf
// (CUTLASS's Sigmoid goes through fast_tanh). expf overflow to +inf gives x / inf = -0, the limit.
template <class T>
struct QuickGeluAccurate {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& value) const {
    const float x = static_cast<float>(value);
    return static_cast<T>(x / (1.0f + expf(-1.702f * x)));
  }
};

template <class T, int N>
struct QuickGeluAccurate<cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const {
    cutlass::Array<T, N> y;
    QuickGeluAccurate<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = op(v[i]);
    return y;
  }
};

template <class T>
using GeluErf = cutlass::epilogue::thread::GELU<T>;

// ---- the kernel type of one variant ------------------------------------------------------------

template <GemmDtype kDtype>
using ElementOf = std::conditional_t<kDtype == GemmDtype::kBFloat16, cutlass::bfloat16_t,
                                     cutlass::half_t>;

// Epilogue fusion: D = act(acc + bias[n]) (alpha = 1, beta = 0, no C); with kAux also
// Aux = acc + bias[n], rounded to T by itself (the activation reads the fp32 value, not Aux).
template <class T, GemmActivation kAct, bool kAux>
struct FusionOf {
  template <class U>
  using Act = std::conditional_t<
      kAct == GemmActivation::kGelu, GeluErf<U>,
      std::conditional_t<kAct == GemmActivation::kGeluTanh, GeluTanhAccurate<U>,
                         QuickGeluAccurate<U>>>;
  // A template alias of a conditional cannot be passed as a template template argument; wrap it.
  template <class U>
  struct ActFn : Act<U> {};
  using type = std::conditional_t<
      kAct == GemmActivation::kIdentity,
      cutlass::epilogue::fusion::LinCombPerColBias<T, float, T, T, float>,
      std::conditional_t<
          kAux,
          cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<cutlass::layout::RowMajor, ActFn,
                                                                T, float, T, T, T, float>,
          cutlass::epilogue::fusion::LinCombPerColBiasEltAct<ActFn, T, float, T, T, float>>>;
};

// Tiles: CTA 128 (M) x 128 (N) x 64 (K), two consumer warpgroups (cooperative, 64 rows each: 64
// fp32 accumulators per thread, no spill pressure), a 1 x 2 cluster along N so the A tile (the
// activations) is TMA-multicast to both CTAs. 128 x 128 rather than 128 x 256: at projector sizes
// (M = 256..16k, N = 3584..5120) it gives 2x the tiles, e.g. LLaVA M = 576, N = 4096 -> 160 tiles
// for 132 SMs instead of 80, and CUTLASS's data-parallel persistent schedule keeps the output
// deterministic (no split-K / stream-K reduction).
// Pingpong: each consumer warpgroup owns a whole 64 x 128 x 64 tile (64 fp32 accumulators per
// thread: 128 x 128 spilled with the GELU + aux epilogue) and the two alternate, so one tile's
// epilogue runs under the other's mainloop; same 1 x 2 cluster. 64-row tiles also halve the wave
// quantization at small M (LLaVA M = 576: 288 tiles for 132 SMs).
// Cooperative wide: 128 (M) x 256 (N) x 64 (K), two consumer warpgroups of 64 x 256 (128 fp32
// accumulators per thread), a 2 x 1 cluster along M so the W tile is TMA-multicast to both CTAs:
// twice the A reuse of the 128 x 128 tile, half the tiles (LLaVA B 16, M = 9216, N = 4096: 1152
// tiles on 132 SMs); an unmeasured candidate for the GPU sweep.
template <GemmSchedule kSched>
struct ScheduleOf {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
};
template <>
struct ScheduleOf<GemmSchedule::kPingpong> {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
  using TileShape = cute::Shape<cute::_64, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
};
template <>
struct ScheduleOf<GemmSchedule::kCooperativeWide> {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
};

template <GemmDtype kDtype, GemmActivation kAct, bool kAux,
          GemmSchedule kSched = GemmSchedule::kCooperative>
struct GemmOf {
  static_assert(!(kAux && kAct == GemmActivation::kIdentity), "identity: aux would equal out");
  using T = ElementOf<kDtype>;
  static constexpr int kAlign = 16 / sizeof(T);  // 8 elements: TMA's 16-byte rule
  using TileShape = typename ScheduleOf<kSched>::TileShape;
  using ClusterShape = typename ScheduleOf<kSched>::ClusterShape;
  using Fusion = typename FusionOf<T, kAct, kAux>::type;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no C operand (beta = 0)
      T, cutlass::layout::RowMajor, kAlign,     // D (M, N) contiguous
      typename ScheduleOf<kSched>::Epilogue, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      T, cutlass::layout::RowMajor, kAlign,     // A (M, K), row stride lda
      T, cutlass::layout::ColumnMajor, kAlign,  // W (N, K) contiguous = B (K, N) column-major
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename ScheduleOf<kSched>::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The arguments every variant shares: problem (M, N, K, L = 1; the launcher checked each
// < 2^31), A (M, K) row-major with row stride lda, B as given (its stride chosen by the caller's
// layout), no C, D (M, N) contiguous, on `device`'s SMs. The fusion's own arguments are the
// caller's.
template <class Gemm, class T>
typename Gemm::Arguments gemm_arguments(int64_t m, int64_t n, int64_t k, const void* a,
                                        int64_t lda, const void* b,
                                        typename Gemm::GemmKernel::StrideB db, void* out,
                                        int device) {
  using Kernel = typename Gemm::GemmKernel;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = cute::make_shape(static_cast<int>(m), static_cast<int>(n),
                                        static_cast<int>(k), 1);
  args.mainloop.ptr_A = static_cast<const T*>(a);
  args.mainloop.dA = typename Kernel::StrideA{lda, cute::Int<1>{}, lda * m};
  args.mainloop.ptr_B = static_cast<const T*>(b);
  args.mainloop.dB = db;
  const typename Kernel::StrideD d_stride{n, cute::Int<1>{}, n * m};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = d_stride;
  args.epilogue.ptr_D = static_cast<T*>(out);
  args.epilogue.dD = d_stride;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return args;
}

template <GemmDtype kDtype, GemmActivation kAct, bool kAux, GemmSchedule kSched>
typename GemmOf<kDtype, kAct, kAux, kSched>::Gemm::Arguments make_arguments(
    const GemmBiasActParams& p) {
  using G = GemmOf<kDtype, kAct, kAux, kSched>;
  using T = typename G::T;
  using Kernel = typename G::Kernel;
  // W (N, K) contiguous: B (N, K) K-major.
  auto args = gemm_arguments<typename G::Gemm, T>(
      p.m, p.n, p.k, p.a, p.lda, p.w, typename Kernel::StrideB{p.k, cute::Int<1>{}, p.k * p.n},
      p.out, p.device);
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.bias_ptr = static_cast<const T*>(p.bias);  // nullptr: the broadcast reads zeros
  if constexpr (kAux) {
    fusion.aux_ptr = static_cast<T*>(p.aux);
    fusion.dAux = args.epilogue.dD;  // (M, N) contiguous, as D
  }
  return args;
}

}  // namespace gemm_bias_act_detail

template <GemmDtype kDtype, GemmActivation kAct, bool kAux, GemmSchedule kSched>
bool GemmBiasActVariant<kDtype, kAct, kAux, kSched>::can_implement(const GemmBiasActParams& p) {
  using Gemm = typename gemm_bias_act_detail::GemmOf<kDtype, kAct, kAux, kSched>::Gemm;
  return Gemm::can_implement(
             gemm_bias_act_detail::make_arguments<kDtype, kAct, kAux, kSched>(p)) ==
         cutlass::Status::kSuccess;
}

template <GemmDtype kDtype, GemmActivation kAct, bool kAux, GemmSchedule kSched>
size_t GemmBiasActVariant<kDtype, kAct, kAux, kSched>::workspace_size(
    const GemmBiasActParams& p) {
  using Gemm = typename gemm_bias_act_detail::GemmOf<kDtype, kAct, kAux, kSched>::Gemm;
  return Gemm::get_workspace_size(
      gemm_bias_act_detail::make_arguments<kDtype, kAct, kAux, kSched>(p));
}

// initialize() writes the kernel params (and raises the kernel's dynamic smem limit, a host-side
// attribute, no sync); run() launches the cluster kernel on `stream`.
template <GemmDtype kDtype, GemmActivation kAct, bool kAux, GemmSchedule kSched>
cudaError_t GemmBiasActVariant<kDtype, kAct, kAux, kSched>::run(const GemmBiasActParams& p,
                                                                void* workspace,
                                                                cudaStream_t stream) {
  using Gemm = typename gemm_bias_act_detail::GemmOf<kDtype, kAct, kAux, kSched>::Gemm;
  Gemm gemm;
  auto status = gemm.initialize(
      gemm_bias_act_detail::make_arguments<kDtype, kAct, kAux, kSched>(p), workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status == cutlass::Status::kSuccess) return cudaSuccess;
  // Name CUTLASS's reason: the adapter has already cleared the CUDA error it may have met, so the
  // bare code alone would read like a device fault.
  std::fprintf(stderr, "vlmkern gemm_bias_act: CUTLASS %s\n", cutlassGetStatusString(status));
  const cudaError_t err = cudaGetLastError();
  return err != cudaSuccess ? err : cudaErrorNotSupported;
}

}  // namespace vlmkern
