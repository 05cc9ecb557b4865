"""vlmkern: CUDA and C++ kernels for vision-language models, registered as torch custom ops.

Ops live under ``torch.ops.vlmkern`` and are wrapped with docstrings, shape checks, fake kernels
and autograd in :mod:`vlmkern.ops`; plain-PyTorch ground truth is in :mod:`vlmkern.reference`;
``nn.Module`` wrappers in :mod:`vlmkern.nn`.
"""

import torch  # noqa: F401  (loads libtorch before our extension)

from . import (
    _C,  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    nn,
    ops,
    reference,
)
from ._build_info import info

__version__: str = _C.version

__all__ = ["__version__", "info", "nn", "ops", "reference"]
