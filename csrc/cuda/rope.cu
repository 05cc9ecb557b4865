// Launches rope_kernel: picks the element type and the widest vector V (elements per access,
// up to 16 bytes) that every pointer, stride and the half head allow.
#include "cuda/kernels/rope.cuh"
#include "cuda/rope.h"

namespace vlmkern {
namespace {

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Largest V (elements) with V*sizeof(T) <= 16 that keeps every access of the plan aligned.
template <typename T>
int vector_width(const RopeParams& p) {
  if (p.q_in_stride[3] != 1 || p.k_in_stride[3] != 1 || p.q_out_stride[3] != 1 ||
      p.k_out_stride[3] != 1) {
    return 1;
  }
  for (int v = 16 / static_cast<int>(sizeof(T)); v > 1; v /= 2) {
    const int bytes = v * static_cast<int>(sizeof(T));
    bool ok = (p.rotary_dim / 2) % v == 0 && p.head_dim % v == 0;
    for (const void* ptr : {p.q_in, p.k_in, static_cast<const void*>(p.q_out),
                            static_cast<const void*>(p.k_out)}) {
      ok = ok && aligned(ptr, bytes);
    }
    for (const int64_t* st : {p.q_in_stride, p.k_in_stride, p.q_out_stride, p.k_out_stride}) {
      for (int i = 0; i < 3; ++i) ok = ok && st[i] % v == 0;
    }
    if (ok) return v;
  }
  return 1;
}

template <typename T, int V>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seq;
  // One block per token up to 65535 blocks (hundreds per SM), then a grid-stride loop.
  const unsigned grid = static_cast<unsigned>(tokens < 65535 ? tokens : 65535);
  rope_kernel<T, V><<<grid, kRopeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_type(const RopeParams& p, cudaStream_t stream) {
  switch (vector_width<T>(p)) {
    case 8: if constexpr (sizeof(T) <= 2) return launch<T, 8>(p, stream); break;
    case 4: if constexpr (sizeof(T) <= 4) return launch<T, 4>(p, stream); break;
    case 2: return launch<T, 2>(p, stream);
    default: break;
  }
  return launch<T, 1>(p, stream);
}

}  // namespace

cudaError_t cuda_rope(const RopeParams& p, cudaStream_t stream) {
  if (p.batch * p.seq == 0) return cudaSuccess;
  switch (p.dtype) {
    case RopeDtype::kFloat32: return launch_type<float>(p, stream);
    case RopeDtype::kFloat16: return launch_type<__half>(p, stream);
    case RopeDtype::kBFloat16: return launch_type<__nv_bfloat16>(p, stream);
    case RopeDtype::kFloat64: return launch_type<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vlmkern
