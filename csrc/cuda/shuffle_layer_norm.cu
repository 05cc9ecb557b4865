// Launches shuffle_layer_norm_kernel (cuda/kernels/shuffle_layer_norm.cuh): fp16 / bf16, the
// smallest register footprint (vectors per thread) that holds a row.
#include <cstdint>

#include "cuda/kernels/shuffle_layer_norm.cuh"
#include "cuda/shuffle_layer_norm.h"

namespace vlmkern {
namespace {

template <typename T, int kVecs>
cudaError_t launch(const ShuffleLnArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.rows < 65536 ? a.rows : 65536);
  shuffle_layer_norm_kernel<T, kVecs><<<blocks, kShuffleLnThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_type(const ShuffleLnArgs& a, cudaStream_t stream) {
  const int vecs = (a.k + 8 * kShuffleLnThreads - 1) / (8 * kShuffleLnThreads);
  if (vecs <= 2) return launch<T, 2>(a, stream);
  if (vecs <= 4) return launch<T, 4>(a, stream);
  return launch<T, kShuffleLnMaxVecs>(a, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

const char* shuffle_layer_norm_unsupported(const ShuffleLnArgs& a) {
  if (a.k < 1 || a.k > 8 * kShuffleLnThreads * kShuffleLnMaxVecs) return "K must be in [1, 16384]";
  if (a.c % 8 != 0 || a.k != a.r * a.r * a.c) return "C must be a multiple of 8, K = r * r * C";
  if (a.stride_b % 8 != 0 || a.stride_h % 8 != 0 || a.stride_w % 8 != 0) {
    return "x strides must be multiples of 8 elements";
  }
  if (!aligned16(a.x) || !aligned16(a.out)) return "x and out must be 16-byte aligned";
  if (a.rms ? a.out != nullptr : a.mean == nullptr) {
    return "RMSNorm writes statistics only; LayerNorm needs its mean";
  }
  return nullptr;
}

cudaError_t cuda_shuffle_layer_norm(const ShuffleLnArgs& a, ShuffleLnDtype dtype,
                                    cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  if (shuffle_layer_norm_unsupported(a) != nullptr) return cudaErrorInvalidValue;
  return dtype == ShuffleLnDtype::kBFloat16 ? launch_type<__nv_bfloat16>(a, stream)
                                            : launch_type<__half>(a, stream);
}

}  // namespace vlmkern
