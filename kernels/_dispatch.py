"""Per-call choice between the Triton kernels and plain PyTorch.

Rule, decided on the tensor of each call:
- Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (the Triton interpreter,
  which is how the kernels are tested on machines without a GPU);
- plain PyTorch otherwise, or when triton is not installed.
RELA_KERNELS=triton|torch forces a path (triton on a CPU tensor without the interpreter is an
error that says so); RELA_KERNELS=auto (the default) applies the rule.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: a CPU-only install works without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True if this call should run the Triton kernel for tensor `t`."""
    mode = os.environ.get("RELA_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"RELA_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "torch":
        return False
    can = HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreting()))
    if mode == "triton" and not can:
        why = "triton is not installed" if not HAS_TRITON else (
            f"a {t.device.type} tensor needs CUDA, or TRITON_INTERPRET=1 set before rela.kernels is imported")
        raise RuntimeError(f"RELA_KERNELS=triton but the Triton path can't run: {why}")
    return can
