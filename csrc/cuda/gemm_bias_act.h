// Torch-free launcher of the fused GEMM + bias + activation: out (M, N) = act(A (M, K) @ W (N, K)^T
// + bias (N)), optionally aux (M, N) = the pre-activation. CUTLASS 3.x kernels for Hopper (sm_90a
// only), and a CUTLASS 2.x kernel for every sm_80+ GPU (schedule kSm80).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vlmkern {

enum class GemmDtype { kBFloat16, kFloat16 };
// Epilogue activations, all in fp32 on the fp32 accumulator + bias: kGelu = 0.5x(1 + erff(x/√2));
// kGeluTanh = 0.5x(1 + tanhf(√(2/π)(x + 0.044715x³))); kQuickGelu = x / (1 + expf(-1.702x)).
// Compiled variants (instantiations/): {bf16, fp16} x {identity, gelu + aux} cooperative and
// cooperative wide, and {bf16, fp16} x gelu + aux pingpong. The kGeluTanh and
// kQuickGelu functors exist but no variant instantiates them: never compiled in, never validated.
enum class GemmActivation { kIdentity, kGelu, kGeluTanh, kQuickGelu };
// Kernel schedule: kCooperative (two consumer warpgroups share one 128 x 128 tile; the epilogue
// runs after the mainloop), kCooperativeWide (the same on 128 x 256 tiles with a 2 x 1 cluster
// multicasting W: twice the reuse of each A tile, cuBLAS's usual shape for large bf16 GEMMs on
// H100; for the GPU sweep) or kPingpong (each warpgroup owns a tile, so one's epilogue overlaps
// the other's mainloop: meant for the heavy GELU + aux epilogue). Pingpong is compiled for
// gelu + aux only. kSm80: the CUTLASS 2.x multistage mma.sync kernel (128 x 128 x 32 tiles, 4
// stages), compiled for every arch of the build: the fused path of A100-class GPUs (it runs on
// Hopper too), {bf16, fp16} x {identity, gelu + aux}.
enum class GemmSchedule { kCooperative, kPingpong, kCooperativeWide, kSm80 };

struct GemmBiasActParams {
  GemmDtype dtype;
  GemmActivation act;
  int64_t m, n, k;     // M >= 1 rows of A; N output features; K reduction
  const void* a;       // (M, K), row stride lda (elements), unit column stride
  int64_t lda;         // >= K
  const void* w;       // (N, K) contiguous
  const void* bias;    // (N,) contiguous, or nullptr for none
  void* out;           // (M, N) contiguous: act(A W^T + bias)
  void* aux;           // (M, N) contiguous: A W^T + bias (before act), or nullptr for none
  int device;          // CUDA device of every pointer (and of the stream)
  GemmSchedule schedule = GemmSchedule::kCooperative;
};

// True when this build has the Hopper CUTLASS path (nvidia-cutlass headers found, sm_90a
// targeted).
bool gemm_bias_act_compiled();

// True when this build has the sm_80+ CUTLASS path (nvidia-cutlass headers found).
bool gemm_bias_act_sm80_compiled();

// nullptr when `p` can run on the fused kernel, else why not (for logs and tests): no variant
// compiled for (schedule, dtype, act, aux), a device that is not compute capability 9.0 (8.0 or
// newer for kSm80), sizes >= 2^31, or 16-byte alignment (pointers; K, N, lda multiples of 8
// elements) unmet.
const char* gemm_bias_act_unsupported(const GemmBiasActParams& p);

// Workspace bytes `gemm_bias_act` needs for `p` (0 is common; the caller allocates it).
size_t gemm_bias_act_workspace_size(const GemmBiasActParams& p);

// Enqueues the GEMM on `stream` (no host synchronization; CUDA-graph capturable). `p` must have
// passed gemm_bias_act_unsupported; `workspace` holds gemm_bias_act_workspace_size(p) bytes.
cudaError_t gemm_bias_act(const GemmBiasActParams& p, void* workspace, cudaStream_t stream);

// One compiled kernel: defined in kernels/gemm_bias_act.cuh, explicitly instantiated by one file
// per variant under cuda/instantiations/ (gemm_bias_act.cu dispatches over the compiled ones).
template <GemmDtype kDtype, GemmActivation kAct, bool kAux,
          GemmSchedule kSched = GemmSchedule::kCooperative>
struct GemmBiasActVariant {
  static bool can_implement(const GemmBiasActParams& p);  // CUTLASS's own checks
  static size_t workspace_size(const GemmBiasActParams& p);
  static cudaError_t run(const GemmBiasActParams& p, void* workspace, cudaStream_t stream);
};

// One compiled sm_80+ kernel (schedule kSm80): defined in kernels/gemm_bias_act_sm80.cuh,
// instantiated by cuda/instantiations/sm80_gemm_bias_act_*.cu.
template <GemmDtype kDtype, GemmActivation kAct, bool kAux>
struct GemmBiasActSm80 {
  static bool can_implement(const GemmBiasActParams& p);
  static size_t workspace_size(const GemmBiasActParams& p);
  static cudaError_t run(const GemmBiasActParams& p, void* workspace, cudaStream_t stream);
};

}  // namespace vlmkern
