// All vlmkern op schemas (one TORCH_LIBRARY), and the PyInit stub: `import vlmkern._C` loads this
// library, which runs the registrations; the module also carries what the build compiled.
#include <Python.h>
#include <torch/library.h>

// set_python_module applies to the defs after it: it names the module holding their fake kernels.
TORCH_LIBRARY(vlmkern, m) {
  m.set_python_module("vlmkern.ops.pixel_shuffle");
  // x (B, H, W, C) -> (B, H/scale, W/scale, scale*scale*C), InternVL / Idefics3 channel order.
  m.def("pixel_shuffle(Tensor x, int scale) -> Tensor", {at::Tag::pt2_compliant_tag});
  // y (B, h, w, scale*scale*C) -> (B, h*scale, w*scale, C): the inverse (and the backward).
  m.def("pixel_unshuffle(Tensor y, int scale) -> Tensor", {at::Tag::pt2_compliant_tag});

  m.set_python_module("vlmkern.ops.rope");
  // q (B, S, Hq, D), k (B, S, Hk, D), positions (A, B, S) int; frequency f rotates dims (f, f+R/2)
  // by float(positions[freq_axis[f]]) * inv_freq[f]: 1D RoPE, Qwen vision 2D RoPE, M-RoPE.
  m.def(
      "rope(Tensor q, Tensor k, Tensor positions, float[] inv_freq, int[] freq_axis, "
      "float scale=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The backward of rope: the same rotation by -angle, applied to the incoming gradients.
  m.def(
      "rope_backward(Tensor grad_q, Tensor grad_k, Tensor positions, float[] inv_freq, "
      "int[] freq_axis, float scale=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // In-place rope (inference): rotates q and k where they are.
  m.def(
      "rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, float[] inv_freq, int[] freq_axis, "
      "float scale=1.0) -> ()",
      // flexible_layout: the kernel takes any strides, and under the default needs_exact_strides
      // torch 2.11's Inductor fails decomposing the mutation (pattern_matcher's
      // eager_input_vals node-count assertion).
      {at::Tag::pt2_compliant_tag, at::Tag::flexible_layout});
  // HF's apply_rotary_pos_emb: cos, sin (B or 1, S, R) given; rotates the first R dims of q, k.
  m.def("rope_cos_sin(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Its backward in q and k (cos and sin are constants, as HF builds them under no_grad).
  m.def(
      "rope_cos_sin_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> "
      "(Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  m.set_python_module("vlmkern.ops.mrope_position_ids");
  // tokens (B, S) int, mask (B, S), grids (N, 3), video_intervals (Nv,) float
  //   -> (position_ids (3, B, S) int64, rope_deltas (B, 1) int64): Qwen2/2.5/3-VL get_rope_index.
  m.def(
      "mrope_position_ids(Tensor tokens, Tensor? attention_mask, Tensor? image_grid_thw, "
      "Tensor? video_grid_thw, Tensor? video_intervals, int spatial_merge_size, int image_token, "
      "int video_token, bool split_video_frames, str text_after_video) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  m.set_python_module("vlmkern.ops.mlp_projector");
  // VLM connector: x (B, H, W, C) pixel-shuffled by `shuffle`, or (..., C) with s*s tokens merged
  // (`merge`, Qwen), or (..., K) -> rows (M, K); norm -> act(rows @ w1^T + b1) @ w2^T + b2.
  // Returns (out, hidden = GEMM1 + b1 before the activation (M, N1), act = GEMM2's input
  // act(hidden) (M, N1) when there are two Linears and an activation, else (0,), mean, rstd (M,
  // groups) fp32).
  m.def(
      "mlp_projector(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, "
      "Tensor? norm_weight, Tensor? norm_bias, str activation, str norm, str norm_position, "
      "float eps, int shuffle, int merge) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Its backward: (dx, dw1, db1, dw2, db2, dnorm_weight, dnorm_bias); None where output_mask is
  // off. hidden / act / mean / rstd are not differentiable (double backward is refused); an empty
  // act is recomputed from hidden where dw2 needs it.
  m.def(
      "mlp_projector_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? w2, "
      "Tensor? norm_weight, Tensor? norm_bias, Tensor hidden, Tensor act, Tensor mean, "
      "Tensor rstd, "
      "str activation, str norm, str norm_position, float eps, int shuffle, int merge, "
      "bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.set_python_module("vlmkern.ops.cross_attention");
  // q (B, Sq, Hq, D), k, v (B, Sk, Hk, D) any strides -> (out (B, Sq, Hq, D), lse (B, Hq, Sq)):
  // softmax(scale q kᵀ) v over the visible keys (kv_ranges (B, Sq, R, 2) | prefix_len), packed
  // sequences with cu_seqlens (B = 1), rows seeing nothing -> 0 or (uniform) all keys.
  m.def(
      "cross_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_ranges=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? prefix_len=None, "
      "float? scale=None, str masked_rows=\"zero\") -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Its backward: (dq, dk, dv), P recomputed from lse; grad_lse optional.
  m.def(
      "cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? grad_lse=None, Tensor? kv_ranges=None, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, Tensor? prefix_len=None, float? scale=None, "
      "str masked_rows=\"zero\") -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Mllama tile mask (B, S, M, T) -> int32 (B, S, ceil(M*T/2), 2) [start, end) key ranges.
  m.def("mllama_kv_ranges(Tensor cross_attention_mask, int num_vision_tokens=1601) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  m.set_python_module("vlmkern.ops.gated_linear");
  // Mllama / Flamingo gated residual after o_proj: x (..., K), weight (N, K), gate (1 value),
  // residual (..., N) -> residual + tanh(gate) * (x @ weight^T + bias).
  m.def(
      "gated_linear(Tensor x, Tensor weight, Tensor gate, Tensor residual, Tensor? bias=None) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its backward: (dx, dweight, dgate, dbias), None where output_mask is off (dresidual = grad).
  m.def(
      "gated_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor gate, "
      "Tensor? bias, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  m.set_python_module("vlmkern.ops.patch_embed");
  // pixels (B, C, H, W) / channels_last (B, H, W, C), float or uint8, weight (D, C, P, P)
  //   -> (B, [1 +] (H/P)(W/P), D): conv patchify + bias + (bicubic-resized) positions + CLS row,
  //   per-channel (x * rescale - mean) / std folded into the GEMM.
  m.def(
      "patch_embed(Tensor pixels, Tensor weight, Tensor? bias=None, Tensor? pos_embed=None, "
      "Tensor? cls_token=None, float[]? mean=None, float[]? std=None, float rescale=1.0, "
      "bool channels_last=False, str pos_interp='bicubic') -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its backward: (d pixels, d weight, d bias, d pos_embed, d cls_token); masked-off ones are (0,).
  m.def(
      "patch_embed_backward(Tensor grad, Tensor pixels, Tensor weight, bool has_bias, "
      "Tensor? pos_embed, bool has_cls, float[]? mean, float[]? std, float rescale, "
      "bool channels_last, str pos_interp, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // patches (N, C*T*P*P), weight (D, C, T, P, P), grid_thw (n, 3), pos_embed (S*S, D) Qwen3-VL
  //   -> (tokens (N, D), cu_seqlens (n + 1,) int32): Qwen2-VL / 2.5-VL / 3-VL packed patch embed.
  m.def(
      "patch_embed_packed(Tensor patches, Tensor weight, Tensor? bias, Tensor grid_thw, "
      "Tensor? pos_embed=None, int spatial_merge_size=1, float[]? mean=None, float[]? std=None, "
      "float rescale=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Its backward: (d patches, d weight, d bias, d pos_embed); masked-off ones are (0,).
  m.def(
      "patch_embed_packed_backward(Tensor grad, Tensor patches, Tensor weight, bool has_bias, "
      "Tensor grid_thw, Tensor? pos_embed, int spatial_merge_size, float[]? mean, float[]? std, "
      "float rescale, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // pixels [(C, H_i, W_i)] images of different sizes -> (tokens (sum T_i, D), cu_seqlens (n + 1,)
  //   int32): image-mode patch embed of each, packed; the same optional arguments.
  m.def(
      "patch_embed_varlen(Tensor[] pixels, Tensor weight, Tensor? bias=None, "
      "Tensor? pos_embed=None, Tensor? cls_token=None, float[]? mean=None, float[]? std=None, "
      "float rescale=1.0, bool channels_last=False, str pos_interp='bicubic') -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Its backward: ([d pixels_i] or [], d weight, d bias, d pos_embed, d cls_token).
  m.def(
      "patch_embed_varlen_backward(Tensor grad, Tensor[] pixels, Tensor weight, bool has_bias, "
      "Tensor? pos_embed, bool has_cls, float[]? mean, float[]? std, float rescale, "
      "bool channels_last, str pos_interp, bool[5] output_mask) "
      "-> (Tensor[], Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

#ifndef VLMKERN_WITH_CUDA
#define VLMKERN_WITH_CUDA 0
#define VLMKERN_NVCC_VERSION ""
#endif
#ifndef VLMKERN_WITH_CUTLASS_SM90
#define VLMKERN_WITH_CUTLASS_SM90 0
#endif
#ifndef VLMKERN_WITH_CUTLASS_SM80
#define VLMKERN_WITH_CUTLASS_SM80 0
#endif
#ifndef VLMKERN_WITH_CUBLASLT
#define VLMKERN_WITH_CUBLASLT 0
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "vlmkern native ops (registered with torch.library)", -1, nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
  const bool ok = PyModule_AddStringConstant(mod, "version", VLMKERN_VERSION) == 0 &&
                  PyModule_AddStringConstant(mod, "built_with_torch", VLMKERN_BUILT_WITH_TORCH) == 0 &&
                  PyModule_AddIntConstant(mod, "cuda_kernels", VLMKERN_WITH_CUDA) == 0 &&
                  PyModule_AddStringConstant(mod, "cuda_archs", VLMKERN_CUDA_ARCHS_STR) == 0 &&
                  PyModule_AddStringConstant(mod, "nvcc_version", VLMKERN_NVCC_VERSION) == 0 &&
                  PyModule_AddIntConstant(mod, "cutlass_gemm", VLMKERN_WITH_CUTLASS_SM90) == 0 &&
                  PyModule_AddIntConstant(mod, "cutlass_sm80_gemm", VLMKERN_WITH_CUTLASS_SM80) ==
                      0 &&
                  PyModule_AddIntConstant(mod, "cublaslt", VLMKERN_WITH_CUBLASLT) == 0;
  if (!ok) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
