// CPU implementations of pixel_shuffle / pixel_unshuffle: one parallel permuted copy.
#include <torch/library.h>

#include "common/pixel_shuffle.h"
#include "cpu/strided_gather.h"
#include "ops.h"

namespace vlmkern {

at::Tensor pixel_shuffle_cpu(const at::Tensor& x, int64_t scale) {
  return pixel_shuffle_impl(x, scale, /*inverse=*/false, cpu_strided_gather);
}

at::Tensor pixel_unshuffle_cpu(const at::Tensor& y, int64_t scale) {
  return pixel_shuffle_impl(y, scale, /*inverse=*/true, cpu_strided_gather);
}

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cpu);
  m.impl("pixel_unshuffle", &pixel_unshuffle_cpu);
}

// Quantized tensors reach the shared checks (which reject them by name) instead of a dispatcher
// "no kernel for QuantizedCPU" error; no data is touched.
TORCH_LIBRARY_IMPL(vlmkern, QuantizedCPU, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cpu);
  m.impl("pixel_unshuffle", &pixel_unshuffle_cpu);
}

TORCH_LIBRARY_IMPL(vlmkern, QuantizedCUDA, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cpu);
  m.impl("pixel_unshuffle", &pixel_unshuffle_cpu);
}

}  // namespace vlmkern
