"""Mixed precision for the training step: autocast, a gradient scaler for fp16, losses in fp32.

`bf16` and `fp16` run the forward under `torch.autocast` (on CPU too, where bf16 is what the
hardware speeds up); `fp16` adds a `GradScaler` so small gradients don't flush to zero. The loss
functions themselves run in float32 (`float32_loss`): cosine similarities, cross-correlations and
softmaxes over a batch lose too much in 8 mantissa bits, and they cost nothing next to the
backbone. The RELA loss kernels take bf16/fp16 predictions and compute in fp32 inside.
"""

from __future__ import annotations

import types
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from rela import choices
from rela.errors import RelaError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
choices.check_registry("precision.DTYPES", DTYPES, choices.PRECISIONS)


class Precision:
    """What `--precision` changes in a step: the autocast context and the backward/step."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in DTYPES:
            raise RelaError(f"--precision must be one of {', '.join(DTYPES)}, not {name!r}")
        self.name, self.dtype, self.device_type = name, DTYPES[name], device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (scaled for fp16: a step with inf/NaN gradients is skipped
        and the scale lowered, as GradScaler does)."""
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


def _to_float(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


def float32_loss(criterion: nn.Module) -> nn.Module:
    """Make `criterion` compute in float32 under autocast (inputs upcast, autocast off inside).
    Patches the instance's forward, so its state_dict (MoCo's queue) keeps its keys; the patch is
    a method bound to the instance, so a deep copy calls its own class forward, not the original's."""
    if getattr(criterion.forward, "__func__", None) is _float32_forward:
        return criterion  # already
    criterion.forward = types.MethodType(_float32_forward, criterion)
    return criterion


def _float32_forward(self, *args, **kwargs):
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return type(self).forward(self, *_to_float(args), **{k: _to_float(v) for k, v in kwargs.items()})
