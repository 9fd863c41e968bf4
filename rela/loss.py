"""The RELA loss, 1 − cos(pred, target), as used by the training loop.

The implementation (Triton kernels with a PyTorch path on CPU) lives in `rela.kernels.rela_loss`.
"""

from rela.kernels.rela_loss import RelaLoss, rela_loss

__all__ = ["RelaLoss", "rela_loss"]
