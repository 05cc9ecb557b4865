// lt_matmul: the cuBLASLt call behind cuda/lt_matmul.h, on ATen's cuBLASLt handle and workspace,
// honouring torch's TF32 and reduced-precision-reduction switches as its own matmuls do.
#include "cuda/lt_matmul.h"

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "common/checks.h"

#if VLMKERN_WITH_CUBLASLT
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#endif

namespace vlmkern {

#if VLMKERN_WITH_CUBLASLT
namespace {

#define VLMKERN_LT_CHECK(expr)                                                                    \
  do {                                                                                            \
    const cublasStatus_t _st = (expr);                                                            \
    VLMKERN_CHECK(_st == CUBLAS_STATUS_SUCCESS, "lt_matmul", #expr, " failed: ",                  \
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

// The row pitch (elements) of a (batch, rows, cols) operand.
int64_t pitch(const at::Tensor& t) { return t.size(1) <= 1 ? t.size(2) : t.stride(1); }

// Row-major (rows, cols) with row pitch ld, seen by cuBLASLt as column-major (cols, rows); with a
// batch count and stride when batch > 1.
Layout layout(cudaDataType_t dt, const at::Tensor& t) {
  cublasLtMatrixLayout_t raw = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatrixLayoutCreate(&raw, dt, t.size(2), t.size(1), pitch(t)));
  Layout l(raw);
  if (t.size(0) > 1) {
    const int32_t count = static_cast<int32_t>(t.size(0));
    const int64_t stride = t.stride(0);
    VLMKERN_LT_CHECK(cublasLtMatrixLayoutSetAttribute(l.get(), CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                      &count, sizeof(count)));
    VLMKERN_LT_CHECK(cublasLtMatrixLayoutSetAttribute(
        l.get(), CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  }
  return l;
}

// The largest of 16, 8, 4, 2 bytes (at least one element) dividing the address, the row pitch and
// (batched) the batch stride in bytes.
uint32_t alignment(const at::Tensor& t) {
  const auto esize = static_cast<uint64_t>(t.element_size());
  const uint64_t parts[] = {reinterpret_cast<uintptr_t>(t.const_data_ptr()),
                            static_cast<uint64_t>(pitch(t)) * esize,
                            t.size(0) > 1 ? static_cast<uint64_t>(t.stride(0)) * esize : 0};
  uint32_t a = 16;
  for (const uint64_t v : parts) {
    while (a > esize && v % a != 0) a /= 2;
  }
  return a;
}

// Whether t is a (batch, rows, cols) operand cuBLASLt can take as it is.
bool usable(const at::Tensor& t, at::ScalarType dt, int64_t batch, int64_t rows, int64_t cols) {
  return t.defined() && t.dim() == 3 && t.scalar_type() == dt && t.size(0) == batch &&
         t.size(1) == rows && t.size(2) == cols && (cols <= 1 || t.stride(2) == 1) &&
         pitch(t) >= cols && t.stride(0) >= 0;
}

// torch's allow_{bf16,fp16}_reduced_precision_reduction as cuBLASLt's reduction-scheme mask (0:
// any scheme), as ATen's own cuBLASLt GEMMs set it. Newer torch returns a CuBLASReductionOption
// (which can also forbid split-K), older a bool: both compile.
template <typename Option>
uint32_t reduction_mask(Option option) {
  if constexpr (std::is_same_v<Option, bool>) {
    return option ? 0 : CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  } else {
    if (option == Option::AllowReducedPrecisionWithSplitK) return 0;
    if (option == Option::DisallowReducedPrecisionDisallowSplitK) {
      return CUBLASLT_REDUCTION_SCHEME_NONE;
    }
    return CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  }
}

// What cuBLASLt's heuristic sees of one call: the device, types, reduction mask, pointer mode,
// workspace, the (batch, m, n, k) shape and each operand's pitch, batch stride and alignment.
// A new descriptor or preference attribute (an epilogue, a bias pointer) must join the key.
using AlgoKey = std::array<int64_t, 22>;

// Heuristic results by AlgoKey: cublasLtMatmulAlgoGetHeuristic costs host microseconds on every
// eager call (decode steps run many small GEMMs); a repeated configuration reuses its algo.
// Bounded (cleared when full); the mutex guards concurrent streams / threads.
struct AlgoCache {
  std::mutex mutex;
  std::map<AlgoKey, cublasLtMatmulAlgo_t> algos;
  static constexpr size_t kMaxEntries = 1024;
};

AlgoCache& algo_cache() {
  static AlgoCache* cache = new AlgoCache();  // never destroyed: no exit-order issues
  return *cache;
}

}  // namespace

bool lt_matmul_linked() { return true; }

bool lt_matmul(const LtMatmul& p) {
  const at::ScalarType st = p.a.scalar_type();
  cudaDataType_t dt = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  auto& ctx = at::globalContext();
  uint32_t reduction = 0;
  switch (st) {
    case at::kBFloat16:
      dt = CUDA_R_16BF;
      reduction = reduction_mask(ctx.allowBF16ReductionCuBLAS());
      break;
    case at::kHalf:
      dt = CUDA_R_16F;
      reduction = reduction_mask(ctx.allowFP16ReductionCuBLAS());
      break;
    case at::kFloat:  // torch.backends.cuda.matmul.allow_tf32 (the API every torch we build has)
      if (ctx.allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    default:
      return false;
  }
  const int64_t batch = p.a.size(0), m = p.a.size(1), k = p.a.size(2), n = p.b.size(1);
  if (batch < 1 || m < 1 || n < 1 || k < 1 || batch > INT32_MAX ||
      !usable(p.a, st, batch, m, k) || !usable(p.b, st, batch, n, k) ||
      !usable(p.c, st, batch, m, n) || !usable(p.d, st, batch, m, n) ||
      (batch > 1 && p.d.stride(0) < m * pitch(p.d))) {
    return false;
  }
  cublasLtMatmulDesc_t raw_desc = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, CUDA_R_32F));
  const MatmulDesc desc(raw_desc);
  // Column-major view: D (N, M) = op(B) (N, K) @ A^T (K, M), B stored (K, N), transposed.
  const cublasOperation_t trans_b = CUBLAS_OP_T, trans_a = CUBLAS_OP_N;
  const cublasLtPointerMode_t mode =
      p.device_scalars ? CUBLASLT_POINTER_MODE_DEVICE : CUBLASLT_POINTER_MODE_HOST;
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA,
                                                  &trans_b, sizeof(trans_b)));
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                                  &trans_a, sizeof(trans_a)));
  VLMKERN_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_POINTER_MODE,
                                                  &mode, sizeof(mode)));
  const Layout b_l = layout(dt, p.b), a_l = layout(dt, p.a), c_l = layout(dt, p.c),
               d_l = layout(dt, p.d);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  VLMKERN_LT_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Preference pref(raw_pref);
  const size_t workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
      sizeof(workspace_bytes)));
  if (reduction != 0) {
    VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)));
  }
  // cuBLASLt's A is our B (the weight-like operand), its B our A.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const at::Tensor*> aligned[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &p.b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &p.a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &p.c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &p.d}};
  for (const auto& [attr, t] : aligned) {
    const uint32_t a = alignment(*t);
    VLMKERN_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &a, sizeof(a)));
  }

  // ATen's handle and the workspace it keeps for (handle, current stream): run on that stream.
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AlgoKey key{c10::cuda::current_device(), static_cast<int64_t>(dt), static_cast<int64_t>(compute),
              reduction, p.device_scalars ? 1 : 0, static_cast<int64_t>(workspace_bytes),
              batch, m, n, k};
  int slot = 10;
  for (const at::Tensor* t : {&p.a, &p.b, &p.c, &p.d}) {
    key[slot++] = pitch(*t);
    key[slot++] = t->size(0) > 1 ? t->stride(0) : 0;
    key[slot++] = alignment(*t);
  }
  AlgoCache& cache = algo_cache();
  cublasLtMatmulAlgo_t algo = {};
  bool cached = false;
  {
    const std::lock_guard<std::mutex> lock(cache.mutex);
    if (const auto it = cache.algos.find(key); it != cache.algos.end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulHeuristicResult_t heuristic = {};
    int found = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), b_l.get(), a_l.get(), c_l.get(),
                                       d_l.get(), pref.get(), 1, &heuristic, &found);
    if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
    algo = heuristic.algo;
    const std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.algos.size() >= AlgoCache::kMaxEntries) cache.algos.clear();
    cache.algos.emplace(key, algo);
  }
  VLMKERN_LT_CHECK(cublasLtMatmul(handle, desc.get(), p.alpha, p.b.const_data_ptr(), b_l.get(),
                                  p.a.const_data_ptr(), a_l.get(), p.beta, p.c.const_data_ptr(),
                                  c_l.get(), p.d.data_ptr(), d_l.get(), &algo,
                                  at::cuda::getCUDABlasLtWorkspace(), workspace_bytes, stream));
  return true;
}

#else  // no cuBLASLt in this build: every caller keeps its ATen path

bool lt_matmul_linked() { return false; }

bool lt_matmul(const LtMatmul&) { return false; }

#endif

}  // namespace vlmkern
