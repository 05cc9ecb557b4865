// CUDA implementations of cross_attention (flash-attention 2 forward, cuda/cross_attention.cu),
// cross_attention_backward (flash-attention 2 style, deterministic: delta, dK / dV and dQ kernels)
// and mllama_kv_ranges (ATen ops, no host sync). Shared checks from common/cross_attention.h; launches on the current stream of
// q's device.
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/cross_attention.h"
#include "cuda/cross_attention.h"
#include "ops.h"

namespace vlmkern {
namespace {

// The kernel reads rows as 16-byte cp.async chunks: head dim contiguous, base and every stride
// of a dim with more than one element a multiple of 8 elements (16 bytes). Views of fused
// projections and batch-stride-0 shared queries pass as they are; anything else (a strided head
// dim, an odd offset) is copied to a contiguous tensor first.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  // clone, not contiguous(): a contiguous tensor at an odd offset would come back as itself.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Multiprocessor count of `device`, asked once per device (no host sync; atomics: benign race).
int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) return 132;
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        n <= 0) {
      cudaGetLastError();
      n = 132;
    }
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Opt-in shared memory per block of `device` (227 KiB on H100, 163 KiB A100, 99 KiB sm_86 /
// sm_89), 0 if unknown; clears the runtime error a failed query leaves, so a later launch check
// cannot report it.
int optin_smem(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    cudaGetLastError();
    optin = 0;
  }
  return optin;
}

// The forward CTA's shape: query rows per CTA (block_m) and per warp (warp_rows).
struct CtaShape {
  int block_m, warp_rows;
};

// VLMKERN_XATTN_BLOCK_M=32 / 64 / 128 forces the rows per CTA (for tests and benches; 128 on 8
// warps only at head dims 64, 96, 128, whose K / V tile copy divides over 8 warps), else 32 (2
// warps) when a window holds at most 32 rows, 64 (4 warps) otherwise. Sq <= 32 covers Q-Former /
// Perceiver learned queries and decode steps; a decode step with GQA arrives here
// (xattn_decode_gqa_as_rows) with Sq = the group size, the rows the kernel runs. Packed input
// counts all its rows (Sq = total tokens). A 64-row CTA over <= 32 rows would run two of its
// four warps on zero rows and fit fewer (image, head) pairs per SM. VLMKERN_XATTN_WARP_ROWS=32
// forces 128-row CTAs of 4 warps x 32 rows (flash-attention 2's long-sequence shape; every head
// dim). The 128-row CTAs are experiments, never picked automatically: not yet measured on a GPU.
CtaShape xattn_cta_shape(const char* op, const XattnParams& p) {
  const char* wr_env = std::getenv("VLMKERN_XATTN_WARP_ROWS");
  const std::string wr = wr_env != nullptr ? wr_env : "";
  VLMKERN_CHECK(wr.empty() || wr == "16" || wr == "32", op,
                "VLMKERN_XATTN_WARP_ROWS must be 16 or 32, got '", wr, "'");
  const char* bm_env = std::getenv("VLMKERN_XATTN_BLOCK_M");
  const std::string bm = bm_env != nullptr ? bm_env : "";
  VLMKERN_CHECK(bm.empty() || bm == "32" || bm == "64" || bm == "128", op,
                "VLMKERN_XATTN_BLOCK_M must be 32, 64 or 128, got '", bm, "'");
  if (wr == "32") {
    VLMKERN_CHECK(bm.empty() || bm == "128", op,
                  "VLMKERN_XATTN_WARP_ROWS=32 runs 128-row CTAs; VLMKERN_XATTN_BLOCK_M is '", bm,
                  "' (unset it or use 128)");
    return {128, 32};
  }
  if (!bm.empty()) {
    VLMKERN_CHECK(bm != "128" || p.head_dim == 64 || p.head_dim == 96 || p.head_dim == 128, op,
                  "VLMKERN_XATTN_BLOCK_M=128 takes head dims 64, 96 and 128 only, got head dim ",
                  p.head_dim, " (use 32 or 64, or VLMKERN_XATTN_WARP_ROWS=32)");
    return {std::stoi(bm), 16};
  }
  return {p.seq_q <= 32 ? 32 : 64, 16};
}

// Split-KV runs for the forward: VLMKERN_XATTN_SPLITS=n forces n (1 = off; for tests and
// benches), else more than one only when the (window, head) CTAs (windows of block_m rows) fill
// less than half of the GPU's resident CTA slots (2 per SM at D >= 96, 3 below: registers and
// smem of the 64-row CTA, kept for the 32-row one, which fits as many or more; 1 for the 128-row
// CTA of 8 warps at every D: 182-207 registers x 256 threads, ptxas sm_90a; for 4 warps x 32
// rows 2 where the GPU's opt-in smem holds two (255 registers x 128 threads fill half the
// register file; 54-102 KiB of smem at D 64-128: one per SM at D 128 on an A100), else 1) and
// the keys are long:
// floor(slots / CTAs) runs (no tail wave), each of >= 4 key tiles, at most 16, trimmed so no run
// is empty. Packed input never splits.
int xattn_num_splits(const char* op, const XattnParams& p, CtaShape cta, int device) {
  const int block_m = cta.block_m;
  if (p.packed) return 1;
  if (const char* env = std::getenv("VLMKERN_XATTN_SPLITS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    VLMKERN_CHECK(end != nullptr && *end == '\0' && n >= 1 && n <= 64, op,
                  "VLMKERN_XATTN_SPLITS must be an integer in [1, 64], got '", std::string(env),
                  "'");
    return static_cast<int>(n);
  }
  const int64_t ctas = p.batch * ((p.seq_q + block_m - 1) / block_m) * p.heads_q;
  int per_sm = block_m == 128 ? 1 : (p.head_dim >= 96 ? 2 : 3);
  if (cta.warp_rows == 32) {
    const size_t need = cuda_cross_attention_fwd_smem_bytes(static_cast<int>(p.head_dim), 128);
    per_sm = static_cast<size_t>(optin_smem(device)) >= 2 * need + 2048 ? 2 : 1;
  }
  const int64_t slots = int64_t{sm_count(device)} * per_sm;
  if (ctas == 0 || 2 * ctas > slots) return 1;
  const int64_t tiles = (p.seq_k + 63) / 64;
  int64_t n = slots / ctas;
  n = n < tiles / 4 ? n : tiles / 4;
  n = n < 16 ? n : 16;
  if (n < 2) return 1;
  const int64_t run = (tiles + n - 1) / n;
  return static_cast<int>((tiles + run - 1) / run);  // runs that all get tiles
}

// VLMKERN_XATTN_IMAGES_PER_CTA=n (1..64; unset: 1) runs n images of a q head per forward CTA
// (several (image, head) pairs per CTA, for Q-Former / Perceiver batches: fewer, longer CTAs and
// the broadcast queries' tile loaded once) where the kernel takes it: dense input whose Sq fits
// one CTA window and no split-KV; elsewhere 1. Off by default: not yet measured on a GPU.
int xattn_images_per_cta(const char* op, const XattnParams& p, CtaShape cta, int num_splits) {
  const char* env = std::getenv("VLMKERN_XATTN_IMAGES_PER_CTA");
  if (env == nullptr || *env == '\0') return 1;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  VLMKERN_CHECK(end != nullptr && *end == '\0' && n >= 1 && n <= 64, op,
                "VLMKERN_XATTN_IMAGES_PER_CTA must be an integer in [1, 64], got '",
                std::string(env), "'");
  if (p.packed || p.seq_q > cta.block_m || num_splits > 1) return 1;
  return static_cast<int>(n);
}

XattnDevIndex dev_index(const XattnIndex& ix) {
  XattnDevIndex d;
  d.data = ix.data;
  d.is64 = ix.is64 ? 1 : 0;
  for (int i = 0; i < 4; ++i) d.stride[i] = ix.stride[i];
  return d;
}

// The kernels' view of the checked parameters and of q, k, v as the kernels read them
// (kernel_layout): pointers, (B, S, H) strides, sizes, masks. Outputs are set by the caller.
XattnCudaParams cuda_params(const XattnParams& p, const at::Tensor& qc, const at::Tensor& kc,
                            const at::Tensor& vc) {
  XattnCudaParams c;
  c.q = qc.const_data_ptr();
  c.k = kc.const_data_ptr();
  c.v = vc.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    c.q_stride[i] = qc.stride(i);
    c.k_stride[i] = kc.stride(i);
    c.v_stride[i] = vc.stride(i);
  }
  c.batch = p.batch;
  c.seq_q = p.seq_q;
  c.seq_k = p.seq_k;
  c.heads_q = static_cast<int>(p.heads_q);
  c.heads_k = static_cast<int>(p.heads_k);
  c.head_dim = static_cast<int>(p.head_dim);
  c.dtype = p.dtype == at::kHalf ? XattnDtype::kFloat16 : XattnDtype::kBFloat16;
  c.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  c.uniform_masked_rows = p.uniform_masked_rows ? 1 : 0;
  c.has_ranges = p.has_ranges ? 1 : 0;
  c.ranges = dev_index(p.ranges);
  c.num_ranges = p.num_ranges;
  c.packed = p.packed ? 1 : 0;
  c.cu_q = dev_index(p.cu_q);
  c.cu_k = dev_index(p.cu_k);
  c.num_segments = p.num_segments;
  c.prefix_lm = p.prefix_lm ? 1 : 0;
  c.prefix = dev_index(p.prefix);
  return c;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows) {
  const char* op = "cross_attention";
  const XattnParams p = make_xattn_params(op, q, k, v, kv_ranges, cu_seqlens_q, cu_seqlens_k,
                                          prefix_len, scale, masked_rows);
  check_xattn_cuda(op, p);
  // Decode with GQA: the group's q heads as rows of one kv head (one K / V read per group).
  if (auto rows = xattn_decode_gqa_as_rows(p, q, k, v, kv_ranges, scale, masked_rows,
                                           &cross_attention_cuda)) {
    return *rows;
  }
  // grid.x holds the block_m-row q windows (packed: B = 1, Sq = total tokens).
  const CtaShape cta = xattn_cta_shape(op, p);
  const int block_m = cta.block_m;
  const int64_t windows = p.batch * ((p.seq_q + block_m - 1) / block_m);
  VLMKERN_CHECK(windows <= INT32_MAX, op, "B * ceil(Sq / ", block_m, ") = ", windows,
                " query windows exceed the CUDA grid (2^31 - 1)");
  const c10::cuda::CUDAGuard guard(q.device());
  // out (B, Sq, Hq, D) dense in q's dtype, lse (B, Hq, Sq) fp32.
  at::Tensor out = at::empty({p.batch, p.seq_q, p.heads_q, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  XattnCudaParams c = cuda_params(p, qc, kc, vc);
  c.out = out.mutable_data_ptr();
  c.lse = lse.mutable_data_ptr<float>();
  c.block_m = block_m;
  c.warp_rows = cta.warp_rows;
  if (block_m == 128) {  // the 32- / 64-row CTAs fit every sm_80+ part (<= 85 KiB)
    const size_t need = cuda_cross_attention_fwd_smem_bytes(static_cast<int>(p.head_dim), 128);
    const int optin = optin_smem(q.device().index());
    VLMKERN_CHECK(optin <= 0 || need <= static_cast<size_t>(optin), op,
                  "128-row CTAs at head dim ", p.head_dim, " need ", need,
                  " bytes of shared memory per block; this GPU allows ", optin,
                  cta.warp_rows == 32 ? " (unset VLMKERN_XATTN_WARP_ROWS)"
                                      : " (VLMKERN_XATTN_BLOCK_M=32 or 64)");
  }
  c.num_splits = xattn_num_splits(op, p, cta, q.device().index());
  c.images_per_cta = xattn_images_per_cta(op, p, cta, c.num_splits);
  at::Tensor o_part, lse_part;  // split-KV partials, fp32
  if (c.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_part = at::empty({c.num_splits, p.batch, p.seq_q, p.heads_q, p.head_dim}, f32);
    lse_part = at::empty({c.num_splits, p.batch, p.heads_q, p.seq_q}, f32);
    c.o_part = o_part.mutable_data_ptr<float>();
    c.lse_part = lse_part.mutable_data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  C10_CUDA_CHECK(cuda_cross_attention_fwd(c, stream));
  if (c.num_splits > 1) C10_CUDA_CHECK(cuda_cross_attention_combine(c, stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& kv_ranges, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& prefix_len,
    std::optional<double> scale, std::string_view masked_rows) {
  const char* op = "cross_attention_backward";
  const XattnParams p = make_xattn_params(op, q, k, v, kv_ranges, cu_seqlens_q, cu_seqlens_k,
                                          prefix_len, scale, masked_rows);
  check_xattn_backward(p, grad_out, out, lse, grad_lse);
  check_xattn_cuda(op, p);
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    VLMKERN_CHECK(t->device() == q.device(), op, "grad_out, out and lse must be on q's device ",
                  q.device(), ", got ", t->device());
  }
  VLMKERN_CHECK(!grad_lse.has_value() || grad_lse->device() == q.device(), op,
                "grad_lse must be on q's device ", q.device(), ", got ", grad_lse->device());
  // grid.x: 64-row q windows (dQ) and 64-key windows (dK / dV).
  VLMKERN_CHECK(p.batch * ((p.seq_q + 63) / 64) <= INT32_MAX &&
                    p.batch * ((p.seq_k + 63) / 64) <= INT32_MAX,
                op, "B * ceil(Sq / 64) = ", p.batch * ((p.seq_q + 63) / 64),
                " query windows or B * ceil(Sk / 64) = ", p.batch * ((p.seq_k + 63) / 64),
                " key windows exceed the CUDA grid (2^31 - 1)");
  const c10::cuda::CUDAGuard guard(q.device());
  // dq (B, Sq, Hq, D), dk / dv (B, Sk, Hk, D): dense in the inputs' dtype (an expanded q, e.g.
  // batch-stride-0 shared queries, gets one dq per batch row: autograd sums them, as on the CPU).
  // Packed: rows / keys outside every segment are not written by the kernels, so start at 0.
  auto alloc = [&](at::IntArrayRef shape, const at::Tensor& like) {
    return p.packed ? at::zeros(shape, like.options()) : at::empty(shape, like.options());
  };
  at::Tensor dq = alloc({p.batch, p.seq_q, p.heads_q, p.head_dim}, q);
  at::Tensor dk = alloc({p.batch, p.seq_k, p.heads_k, p.head_dim}, k);
  at::Tensor dv = alloc({p.batch, p.seq_k, p.heads_k, p.head_dim}, v);
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};  // no query: no gradient
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  const at::Tensor go = kernel_layout(grad_out), oc = kernel_layout(out);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  // delta (B, Hq, Sq) fp32 workspace: rowsum(dO * O) - dlse.
  at::Tensor delta = at::empty({p.batch, p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  XattnBwdParams bp;
  bp.a = cuda_params(p, qc, kc, vc);
  for (int i = 0; i < 3; ++i) {
    bp.dout_stride[i] = go.stride(i);
    bp.out_stride[i] = oc.stride(i);
  }
  bp.dout = go.const_data_ptr();
  bp.out = oc.const_data_ptr();
  bp.lse = lse_c.const_data_ptr<float>();
  bp.dlse = grad_lse.has_value() ? dlse_c.const_data_ptr<float>() : nullptr;
  bp.delta = delta.mutable_data_ptr<float>();
  bp.dq = dq.mutable_data_ptr();
  bp.dk = dk.mutable_data_ptr();
  bp.dv = dv.mutable_data_ptr();
  bp.scale = static_cast<float>(p.scale);
  const int optin = optin_smem(q.device().index());
  const size_t need = cuda_cross_attention_bwd_smem_bytes(static_cast<int>(p.head_dim));
  VLMKERN_CHECK(optin <= 0 || need <= static_cast<size_t>(optin), "cross_attention_backward",
                "the CUDA backward at head dim ", p.head_dim, " needs ", need,
                " bytes of shared memory per block; this GPU allows ", optin,
                " (train with D <= 96 there, or on the CPU)");
  C10_CUDA_CHECK(cuda_cross_attention_bwd(bp, c10::cuda::getCurrentCUDAStream(q.device().index())));
  return {dq, dk, dv};
}

at::Tensor mllama_kv_ranges_cuda(const at::Tensor& mask, int64_t num_vision_tokens) {
  const int64_t R = check_mllama_mask(mask, num_vision_tokens);
  const int64_t B = mask.size(0), S = mask.size(1), tiles = mask.size(2) * mask.size(3);
  const c10::cuda::CUDAGuard guard(mask.device());
  const auto i32 = mask.options().dtype(at::kInt);
  if (B * S * R == 0) return at::zeros({B, S, R, 2}, i32);
  // Visible iff 1 (HF); a run of visible tiles [i, j] becomes [i * n, (j + 1) * n). Runs start
  // where a tile is visible and its predecessor is not, end where its successor is not; the r-th
  // start / end (cumsum rank) goes to slot r by a one-hot sum (deterministic: no scatter).
  const at::Tensor vis = at::eq(mask, 1).reshape({B, S, tiles});  // (B, S, tiles) bool
  const at::Tensor prev = at::constant_pad_nd(vis.narrow(2, 0, tiles - 1), {1, 0}, 0);
  const at::Tensor next = at::constant_pad_nd(vis.narrow(2, 1, tiles - 1), {0, 1}, 0);
  const at::Tensor pos = at::arange(tiles, i32);  // (tiles,)
  const at::Tensor slots = at::arange(R, i32);    // (R,)
  auto compact = [&](const at::Tensor& flags, const at::Tensor& vals) {  // -> (B, S, R) int32
    const at::Tensor rank = at::sub(at::cumsum(flags, 2, at::kInt), 1);  // (B, S, tiles)
    const at::Tensor hot = at::logical_and(at::eq(rank.unsqueeze(-1), slots),
                                           flags.unsqueeze(-1));  // (B, S, tiles, R)
    return at::sum(at::mul(hot, vals.unsqueeze(-1)), {2}, false, at::kInt);
  };
  const at::Tensor lo = compact(at::logical_and(vis, at::logical_not(prev)),
                                at::mul(pos, num_vision_tokens));
  const at::Tensor hi = compact(at::logical_and(vis, at::logical_not(next)),
                                at::mul(at::add(pos, 1), num_vision_tokens));
  return at::stack({lo, hi}, -1);
}

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("cross_attention", &cross_attention_cuda);
  m.impl("cross_attention_backward", &cross_attention_backward_cuda);
  m.impl("mllama_kv_ranges", &mllama_kv_ranges_cuda);
}

}  // namespace vlmkern
