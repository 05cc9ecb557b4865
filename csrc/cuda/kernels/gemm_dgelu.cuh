// The GELU backward fused into a GEMM epilogue for Hopper (sm_90a): CUTLASS 3.x TMA
// warp-specialized cooperative mainloop on g (M, K) K-major and w (K, N) N-major (the weight as
// stored, no transposed copy); EVT epilogue dh = gelu'(pre) * acc with `pre` TMA-loaded as an
// auxiliary input.
// Include only from cuda/instantiations/*.cu (CUTLASS headers: ~1 min of nvcc per variant).
#pragma once

#include "cuda/gemm_dgelu.h"
#include "cuda/kernels/gemm_bias_act.cuh"

namespace vlmkern {
namespace gemm_dgelu_detail {

// d/dz GELU(z) times the incoming gradient, in fp32, op for op torch's CUDA gelu_backward (erf):
// cdf = 0.5(1 + erff(z/√2)), pdf = expf(-z²/2)·(2/√π)(1/√2)/2, result dy·(cdf + z·pdf). Accurate
// erff / expf (no --use_fast_math in this build).
template <class T>
struct DGeluErf {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& dy, T const& z) const {
    const float x = static_cast<float>(z);
    const float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
    const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return static_cast<T>(static_cast<float>(dy) * (cdf + x * pdf));
  }
};

template <class T, int N>
struct DGeluErf<cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& dy,
                                                      cutlass::Array<T, N> const& z) const {
    cutlass::Array<T, N> out;
    DGeluErf<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = op(dy[i], z[i]);
    return out;
  }
};

// The cooperative 128 x 128 x 64 tiles, 1 x 2 cluster of gemm_bias_act (the schedule that ran
// correctly on the first H100 run); only the B operand's layout and the epilogue differ.
template <GemmDtype kDtype>
struct GemmOf {
  using T = gemm_bias_act_detail::ElementOf<kDtype>;
  static constexpr int kAlign = 16 / sizeof(T);  // 8 elements: TMA's 16-byte rule
  using Schedule = gemm_bias_act_detail::ScheduleOf<GemmSchedule::kCooperative>;
  using TileShape = typename Schedule::TileShape;
  using ClusterShape = typename Schedule::ClusterShape;
  // D = dgelu(alpha * acc + beta * C, aux) with alpha = 1, beta = 0 and no C: dgelu(acc, pre).
  using Fusion = cutlass::epilogue::fusion::LinCombDeEltAct<cutlass::layout::RowMajor, DGeluErf,
                                                            T, float, T, T, float, kAlign>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no C operand (beta = 0)
      T, cutlass::layout::RowMajor, kAlign,     // dh (M, N) contiguous
      typename Schedule::Epilogue, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      T, cutlass::layout::RowMajor, kAlign,  // g (M, K), row stride ldg
      T, cutlass::layout::RowMajor, kAlign,  // w (K, N) row-major: B N-major
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Schedule::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <GemmDtype kDtype>
typename GemmOf<kDtype>::Gemm::Arguments make_arguments(const GemmDGeluParams& p) {
  using G = GemmOf<kDtype>;
  using T = typename G::T;
  using Kernel = typename G::Kernel;
  // B as CUTLASS sees it is (N, K): w (K, N) row-major has unit stride along N, N along K.
  auto args = gemm_bias_act_detail::gemm_arguments<typename G::Gemm, T>(
      p.m, p.n, p.k, p.g, p.ldg, p.w, typename Kernel::StrideB{cute::Int<1>{}, p.n, p.n * p.k},
      p.out, p.device);
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.aux_ptr = static_cast<const T*>(p.pre);
  fusion.dAux = args.epilogue.dD;  // (M, N) contiguous, as dh
  return args;
}

}  // namespace gemm_dgelu_detail

template <GemmDtype kDtype>
bool GemmDGeluVariant<kDtype>::can_implement(const GemmDGeluParams& p) {
  using Gemm = typename gemm_dgelu_detail::GemmOf<kDtype>::Gemm;
  return Gemm::can_implement(gemm_dgelu_detail::make_arguments<kDtype>(p)) ==
         cutlass::Status::kSuccess;
}

template <GemmDtype kDtype>
size_t GemmDGeluVariant<kDtype>::workspace_size(const GemmDGeluParams& p) {
  using Gemm = typename gemm_dgelu_detail::GemmOf<kDtype>::Gemm;
  return Gemm::get_workspace_size(gemm_dgelu_detail::make_arguments<kDtype>(p));
}

template <GemmDtype kDtype>
cudaError_t GemmDGeluVariant<kDtype>::run(const GemmDGeluParams& p, void* workspace,
                                          cudaStream_t stream) {
  using Gemm = typename gemm_dgelu_detail::GemmOf<kDtype>::Gemm;
  Gemm gemm;
  auto status = gemm.initialize(gemm_dgelu_detail::make_arguments<kDtype>(p), workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status == cutlass::Status::kSuccess) return cudaSuccess;
  std::fprintf(stderr, "vlmkern gemm_dgelu: CUTLASS %s\n", cutlassGetStatusString(status));
  const cudaError_t err = cudaGetLastError();
  return err != cudaSuccess ? err : cudaErrorNotSupported;
}

}  // namespace vlmkern
