"""What this build of vlmkern contains: versions, compiled CUDA archs, and per-device op kernels."""

from __future__ import annotations

import torch

from . import _C

OP_NAMESPACE = "vlmkern"


def available_ops() -> dict[str, list[str]]:
    """Every registered ``torch.ops.vlmkern`` op, with the devices that have a kernel for it."""
    names = sorted(
        s.name.split("::", 1)[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith(OP_NAMESPACE + "::")
    )
    ops: dict[str, list[str]] = {}
    for name in names:
        qualified = f"{OP_NAMESPACE}::{name}"
        ops[name] = [
            device
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
        ]
    return ops


def info() -> dict:
    """Build and runtime facts; ``python -m vlmkern info`` prints them."""
    return {
        "version": _C.version,
        "torch": torch.__version__,
        "built_with_torch": _C.built_with_torch,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": bool(_C.cuda_kernels),
        "cuda_archs": [a for a in _C.cuda_archs.split(",") if a],
        "nvcc": _C.nvcc_version or None,
        "cutlass_gemm": bool(getattr(_C, "cutlass_gemm", 0)),
        "cutlass_sm80_gemm": bool(getattr(_C, "cutlass_sm80_gemm", 0)),
        "cublaslt": bool(getattr(_C, "cublaslt", 0)),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": available_ops(),
    }


def format_info(d: dict | None = None) -> str:
    d = info() if d is None else d
    lines = [
        f"vlmkern {d['version']}",
        f"torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'}); built against torch "
        f"{d['built_with_torch']}",
        "CUDA kernels: "
        + (f"compiled for {', '.join(d['cuda_archs'])} (nvcc {d['nvcc']})" if d["cuda_kernels"]
           else "not compiled (CPU-only build)"),
        "CUTLASS / CuTe kernels (sm_90a): "
        + ("compiled (VLMKERN_PROJECTOR_GEMM=cutlass*, VLMKERN_PROJECTOR_SHUFFLE_GEMM=fused, "
           "VLMKERN_PATCH_EMBED_GEMM=implicit select them)" if d["cutlass_gemm"]
           else "not compiled"),
        "CUTLASS sm_80+ GEMM + bias + GELU: "
        + ("compiled (VLMKERN_PROJECTOR_GEMM=cutlass_sm80 selects it)"
           if d.get("cutlass_sm80_gemm") else "not compiled"),
        "cuBLASLt (gated_linear's fused epilogue): "
        + ("linked" if d["cublaslt"] else "not linked (ATen composite)"),
        f"GPU: {d['gpu'] or 'none visible'}",
        "ops:",
    ]
    width = max((len(n) for n in d["ops"]), default=0)
    lines += [f"  {n:<{width}}  {', '.join(devs)}" for n, devs in d["ops"].items()]
    return "\n".join(lines)
