// CUDA gated_linear: out = residual + tanh(gate) * (x @ w^T) as ONE cuBLASLt matmul, D = alpha *
// (A B) + beta * C with alpha = tanh(gate) and beta = 1 read from device memory (no host sync,
// capturable) and C = residual, so neither the un-gated projection nor a scaled copy is written.
// A bias joins the residual first (one extra pass, bias only). Shapes or dtypes cuBLASLt does not
// take (fp64, K = 0, no algorithm) and VLMKERN_GATED_LINEAR=aten run the ATen composite (mm +
// addcmul), as does a build without cuBLASLt (VLMKERN_WITH_CUBLASLT unset: CMake found none). The
// backward is the shared ATen one (common/gated_linear.cpp).
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/checks.h"
#include "common/gated_linear.h"
#include "cuda/gated_linear.h"
#include "ops.h"

#if VLMKERN_WITH_CUBLASLT
#include <ATen/cuda/CUDAContextLight.h>
#include <cublasLt.h>
#endif

namespace vlmkern {
namespace {

constexpr const char* kOp = "gated_linear";

// VLMKERN_GATED_LINEAR, read per call: "lt" (or unset) the fused cuBLASLt GEMM, "aten" the
// composite (for comparison in the bench).
bool use_aten() {
  const char* env = std::getenv("VLMKERN_GATED_LINEAR");
  const std::string_view v = env ? env : "";
  VLMKERN_CHECK(v.empty() || v == "lt" || v == "aten", kOp,
                "VLMKERN_GATED_LINEAR must be 'lt' or 'aten', got '", std::string(v), "'");
  return v == "aten";
}

#if VLMKERN_WITH_CUBLASLT
#define VLMKERN_LT_CHECK(expr)                                                                    \
  do {                                                                                            \
    const cublasStatus_t _st = (expr);                                                            \
    VLMKERN_CHECK(_st == CUBLAS_STATUS_SUCCESS, kOp, #expr, " failed: ",                          \
                  cublasLtGetStatusString(_st));                                                  \
  } while (0)

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayoutOpaque_t* d) const { cublasLtMatrixLayoutDestroy(d); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* d) const {
    cublasLtMatmulPreferenceDestroy(d);
  }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DescDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DescDeleter>;

// A column-major (rows, cols) matrix with leading dimension ld, as cuBLASLt describes it.
Layout layout(cudaDataType_t dt, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatrixLayoutCreate(&l, dt, rows, cols, ld));
  return Layout(l);
}

// A row-major (rows, cols) matrix cuBLASLt can read as column-major (cols, rows): unit column
// stride and a row pitch >= cols (a contiguous copy otherwise, the rare case).
at::Tensor rows_view(const at::Tensor& t) {
  if (t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1))) return t;
  return t.contiguous();
}

// The leading dimension of a rows_view matrix (elements between rows).
int64_t pitch(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// The largest of 16, 8, 4, 2 bytes (at least one element) dividing the address and the row pitch.
uint32_t alignment(const at::Tensor& t) {
  const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto row_bytes = static_cast<uint64_t>(pitch(t) * t.element_size());
  uint32_t a = 16;
  while (a > static_cast<uint32_t>(t.element_size()) && (addr % a != 0 || row_bytes % a != 0)) {
    a /= 2;
  }
  return a;
}

// out (M, N) = scalars[0] * x2 (M, K) @ w (N, K)^T + scalars[1] * c2 (M, N), one cuBLASLt call.
// Returns false (out untouched) when cuBLASLt offers no algorithm for these operands.
bool lt_gated_gemm(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& c2,
                   const float* scalars, const at::Tensor& out, cudaStream_t stream) {
  cudaDataType_t dt = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  auto& ctx = at::globalContext();
  bool reduced_ok = true;
  switch (x2.scalar_type()) {
    case at::kBFloat16:
      dt = CUDA_R_16BF;
      reduced_ok = ctx.allowBF16ReductionCuBLAS() ==
                   at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
      break;
    case at::kHalf:
      dt = CUDA_R_16F;
      reduced_ok = ctx.allowFP16ReductionCuBLAS() ==
                   at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
      break;
    case at::kFloat:
      if (ctx.allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    default:
      return false;
  }
  const int64_t m = x2.size(0), n = w.size(0), k = x2.size(1);
  cublasLtMatmulDesc_t raw_desc = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, CUDA_R_32F));
  const MatmulDesc desc(raw_desc);
  // Column-major view: D (N, M) = op(A) (N, K) @ B (K, M), A = w stored (K, N), transposed.
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA,
                                                  &trans_a, sizeof(trans_a)));
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                                  &trans_b, sizeof(trans_b)));
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_POINTER_MODE,
                                                  &mode, sizeof(mode)));
  const Layout a_l = layout(dt, k, n, pitch(w));    // w (N, K) row-major
  const Layout b_l = layout(dt, k, m, pitch(x2));   // x2 (M, K) row-major
  const Layout c_l = layout(dt, n, m, pitch(c2));   // residual (M, N) row-major
  const Layout d_l = layout(dt, n, m, n);           // out (M, N) contiguous

  cublasLtMatmulPreference_t raw_pref = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Preference pref(raw_pref);
  const size_t workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
      sizeof(workspace_bytes)));
  if (!reduced_ok) {  // torch's allow_{bf16,fp16}_reduced_precision_reduction = False
    const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &scheme, sizeof(scheme)));
  }
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const at::Tensor*> aligned[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &x2},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c2},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &out}};
  for (const auto& [attr, t] : aligned) {
    const uint32_t a = alignment(*t);
    VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &a, sizeof(a)));
  }

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a_l.get(), b_l.get(), c_l.get(),
                                     d_l.get(), pref.get(), 1, &heuristic, &found);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  VLMKERN_LT_CHECK(cublasLtMatmul(handle, desc.get(), &scalars[0], w.const_data_ptr(), a_l.get(),
                                  x2.const_data_ptr(), b_l.get(), &scalars[1],
                                  c2.const_data_ptr(), c_l.get(), out.data_ptr(), d_l.get(),
                                  &heuristic.algo, at::cuda::getCUDABlasLtWorkspace(),
                                  workspace_bytes, stream));
  return true;
}

GateDtype gate_dtype(const at::Tensor& gate) {
  switch (gate.scalar_type()) {
    case at::kHalf:
      return GateDtype::kFloat16;
    case at::kBFloat16:
      return GateDtype::kBFloat16;
    case at::kDouble:
      return GateDtype::kFloat64;
    default:
      return GateDtype::kFloat32;
  }
}

#endif  // VLMKERN_WITH_CUBLASLT

}  // namespace

at::Tensor gated_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gate,
                             const at::Tensor& residual, const std::optional<at::Tensor>& bias) {
  const GatedLinearShape s = check_gated_linear(x, weight, gate, residual, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({s.m, s.k});         // (M, K)
  const at::Tensor r2 = residual.reshape({s.m, s.n});  // (M, N)
#if VLMKERN_WITH_CUBLASLT
  const bool lt_dtype = x.scalar_type() != at::kDouble;
  if (use_aten() || !lt_dtype || s.m == 0 || s.n == 0 || s.k == 0) {
    return gated_linear_composite(x2, weight, gate, r2, bias).view(s.out_sizes);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  // (2,) fp32: alpha = tanh(gate), beta = 1, written on the stream before the GEMM reads them.
  const at::Tensor scalars = at::empty({2}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda_gated_linear_scalars(gate.const_data_ptr(), gate_dtype(gate),
                                           scalars.mutable_data_ptr<float>(), stream));
  // residual + tanh(gate) * b as the C operand when there is a bias (the GEMM adds the rest).
  const at::Tensor c2 = rows_view(bias ? at::addcmul(r2, *bias, scalars[0]) : r2);
  at::Tensor out = at::empty({s.m, s.n}, x.options());
  if (!lt_gated_gemm(rows_view(x2), rows_view(weight), c2, scalars.const_data_ptr<float>(), out,
                     stream)) {
    return gated_linear_composite(x2, weight, gate, r2, bias).view(s.out_sizes);
  }
  return out.view(s.out_sizes);
#else
  use_aten();  // still validates VLMKERN_GATED_LINEAR
  return gated_linear_composite(x2, weight, gate, r2, bias).view(s.out_sizes);
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gated_linear_backward_impl(grad_out, x, weight, gate, bias, output_mask);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("gated_linear", &gated_linear_cuda);
  m.impl("gated_linear_backward", &gated_linear_backward_cuda);
}

}  // namespace vlmkern
