// Shared argument checks: every message starts with "vlmkern.<op>:" and names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define VLMKERN_CHECK(cond, op, ...) TORCH_CHECK((cond), "vlmkern.", op, ": ", __VA_ARGS__)

namespace vlmkern {

// A tensor whose bytes can be moved as opaque elements (every dtype but quantized / sub-byte).
inline void check_movable(const at::Tensor& t, const char* op, const char* name) {
  const auto size = t.element_size();
  VLMKERN_CHECK(!t.is_quantized(), op, name, " must not be quantized, got ", t.scalar_type());
  VLMKERN_CHECK(size == 1 || size == 2 || size == 4 || size == 8 || size == 16, op, name,
                " has an unsupported dtype ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* layout) {
  VLMKERN_CHECK(t.dim() == rank, op, name, " must be a ", rank, "-D tensor ", layout, ", got ",
                t.dim(), "-D of shape ", t.sizes());
}

}  // namespace vlmkern
