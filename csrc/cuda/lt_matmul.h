// One cuBLASLt matmul with its epilogue's C operand and alpha / beta (host or device scalars),
// batched with any batch strides (0: a matrix shared by the batch): D = alpha * A @ B^T + beta * C.
// Used where an ATen call would add a pass (gated_linear's device-side gate, patch_embed's
// per-token addend broadcast over the images). Returns false when it cannot run the problem
// (built without cuBLASLt, an unsupported dtype, no algorithm): the caller takes its ATen path.
#pragma once

#include <ATen/core/Tensor.h>

namespace vlmkern {

// Row-major operands as 3-D (batch, rows, cols) tensors of one dtype (fp32 / fp16 / bf16) with
// unit column stride; batch stride 0 is allowed for a, b, c. Rows of a matrix may be padded
// (row stride >= cols). alpha / beta point at fp32 values in device memory when device_scalars
// (no host sync: capturable), else on the host.
struct LtMatmul {
  at::Tensor a;  // (batch, M, K)
  at::Tensor b;  // (batch, N, K)
  at::Tensor c;  // (batch, M, N), scaled by beta
  at::Tensor d;  // (batch, M, N), written; batch stride > 0
  const float* alpha = nullptr;
  const float* beta = nullptr;
  bool device_scalars = false;
};

// Whether this build links cuBLASLt (VLMKERN_WITH_CUBLASLT).
bool lt_matmul_linked();

// Enqueues the matmul on the current CUDA stream (ATen's cuBLASLt workspace belongs to it) and
// returns true, or returns false having done nothing. Call it under a device guard. The
// heuristic's algorithm is cached per configuration (shape, pitches, alignments, dtype, torch's
// TF32 / reduction switches, device): a repeated call skips the host-side heuristic query.
bool lt_matmul(const LtMatmul& p);

}  // namespace vlmkern
