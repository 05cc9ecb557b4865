// gated_linear: argument checks, the ATen forward composite and the backward (CPU and CUDA).
#include "common/gated_linear.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>

#include "common/checks.h"

namespace vlmkern {
namespace {

constexpr const char* kOp = "gated_linear";

bool is_float(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble;
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  VLMKERN_CHECK(t.device() == x.device(), kOp, name, " is on ", t.device(), " but x is on ",
                x.device());
  VLMKERN_CHECK(t.scalar_type() == x.scalar_type(), kOp, name, " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type(), " (cast them to one dtype)");
}

// The dtype of the gate's reductions: fp64 for fp64 inputs, else fp32.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// <a, b> over all elements, in the accumulation dtype (a, b of one dtype and shape).
at::Tensor inner(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return at::dot(a.reshape({-1}), b.reshape({-1})).to(acc);
}

}  // namespace

GatedLinearShape check_gated_linear(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& gate, const at::Tensor& residual,
                                    const std::optional<at::Tensor>& bias) {
  VLMKERN_CHECK(x.dim() >= 1, kOp, "x must have at least 1 dimension (..., K), got a 0-D tensor");
  VLMKERN_CHECK(is_float(x), kOp, "x must be float32, float16, bfloat16 or float64, got ",
                x.scalar_type());
  check_rank(weight, 2, kOp, "weight", "(N, K)");
  check_same(weight, x, "weight");
  const int64_t k = x.size(-1), n = weight.size(0);
  VLMKERN_CHECK(weight.size(1) == k, kOp, "weight (N, K) = ", weight.sizes(),
                " does not match x's last dimension K=", k);
  VLMKERN_CHECK(gate.numel() == 1, kOp, "gate must hold one value (shape () or (1,)), got shape ",
                gate.sizes());
  VLMKERN_CHECK(is_float(gate), kOp, "gate must be a floating-point tensor, got ",
                gate.scalar_type());
  VLMKERN_CHECK(gate.device() == x.device(), kOp, "gate is on ", gate.device(), " but x is on ",
                x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  check_same(residual, x, "residual");
  VLMKERN_CHECK(residual.sizes() == at::IntArrayRef(out_sizes), kOp, "residual must have the "
                "output's shape ", at::IntArrayRef(out_sizes), " (x's leading dims, then N), got ",
                residual.sizes());
  if (bias) {
    check_rank(*bias, 1, kOp, "bias", "(N,)");
    check_same(*bias, x, "bias");
    VLMKERN_CHECK(bias->size(0) == n, kOp, "bias has ", bias->size(0),
                  " elements but weight has N=", n, " rows");
  }
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return {m, n, k, std::move(out_sizes)};
}

at::Tensor gated_linear_tanh(const at::Tensor& gate) {
  return at::tanh(gate.reshape({}).to(gate.scalar_type() == at::kDouble ? at::kDouble
                                                                         : at::kFloat));
}

at::Tensor gated_linear_composite(const at::Tensor& x2, const at::Tensor& weight,
                                  const at::Tensor& gate, const at::Tensor& residual2,
                                  const std::optional<at::Tensor>& bias) {
  const at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  return at::addcmul(residual2, y, gated_linear_tanh(gate)).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gate, const std::optional<at::Tensor>& bias,
    std::array<bool, 4> output_mask) {
  const GatedLinearShape s = check_gated_linear(x, weight, gate, grad_out, bias);
  const auto [want_dx, want_dw, want_dgate, want_db] = output_mask;
  const at::ScalarType acc = acc_type(x);
  const at::Tensor dy = grad_out.reshape({s.m, s.n});  // (M, N)
  const at::Tensor x2 = x.reshape({s.m, s.k});         // (M, K)
  const at::Tensor t = gated_linear_tanh(gate);        // () fp32 (fp64 for fp64 gates)
  // d out / d (x w^T + b) = tanh(gate) * dy; the gate's gradient needs <dy, x w^T + b>, which is
  // <w, dy^T x> + <b, colsum(dy)>, or <dy w, x> when dy^T x is not needed for dweight.
  at::Tensor dx, dw, dgate, db, g, dx0;
  if (want_dw || (want_dgate && !want_dx)) g = at::mm(dy.t(), x2);  // (N, K) unscaled
  if (want_dx) {
    dx0 = at::mm(dy, weight);  // (M, K) unscaled
    dx = (dx0 * t).reshape(x.sizes());
  }
  if (want_dw) dw = g * t;
  at::Tensor colsum;  // (N,) acc
  if (bias && (want_db || want_dgate)) colsum = at::sum(dy, {0}, false, acc);
  if (bias && want_db) db = (colsum * t).to(bias->scalar_type());
  if (want_dgate) {
    at::Tensor dot = g.defined() ? inner(weight, g, acc) : inner(dx0, x2, acc);
    if (bias) dot = dot + at::dot(bias->to(acc), colsum);
    dgate = ((1 - t * t) * dot).to(gate.scalar_type()).reshape(gate.sizes());
  }
  return {dx, dw, dgate, db};
}

}  // namespace vlmkern
