"""The optimizer and its learning-rate schedule, as `--optimizer`, `--lr-schedule`, `--warmup-epochs`
and `--lr-scale` choose them.

- `adamw` (the small-scale default), `sgd` (momentum 0.9) and `lars` (lightly's LARS, momentum
  0.9, trust coefficient 0.001 — the large-batch recipe of BYOL/SimCLR on ImageNet). With sgd and
  lars, biases and normalisation weights get no weight decay (and no LARS adaptation), as in those
  recipes; adamw decays every parameter, as the measured small-scale baselines were run.
- `constant` or `cosine` to 0, after a linear warm-up of `--warmup-epochs`, stepped per
  optimizer step (a `LambdaLR`, so its state resumes exactly).
- `--lr-scale linear`: lr × global batch / 256 (Goyal et al.; the rule BYOL and SimCLR use).
- `foreach` kernels on every device, `fused` AdamW on CUDA: one launch per parameter group,
  not one per parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rela import choices
from rela.errors import RelaError

OPTIMIZERS = choices.OPTIMIZERS
SCHEDULES = choices.SCHEDULES


def scaled_lr(lr: float, scale: str, global_batch: int) -> float:
    if scale == "none":
        return lr
    if scale == "linear":
        return lr * global_batch / 256
    raise RelaError(f"--lr-scale must be none or linear, not {scale!r}")


def _groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weights with decay; biases and norm scales (1-D) without (lightly's LARS also skips its
    trust ratio where the decay is 0)."""
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay}]
    plain = [p for p in params if p.ndim <= 1]
    return groups + [{"params": plain, "weight_decay": 0.0}] if plain else groups


def build_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    if name == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)
    if name == "sgd":
        return torch.optim.SGD(_groups(params, weight_decay), lr=lr, momentum=0.9, foreach=True)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(_groups(params, weight_decay), lr=lr, momentum=0.9, trust_coefficient=0.001)
    raise RelaError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the base lr at `step`: linear warm-up, then constant or cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    raise RelaError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")


def build_schedule(opt: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, schedule)  # refuse an unknown name now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, warmup_steps, schedule))
