"""DINO (Caron et al. 2021) with multi-crop: two global views and `local_crops` local ones (none at
≤ 32 px, as lightly's CIFAR-10 benchmark and the ReLA reference code; six above, as lightly's
DINOTransform), an EMA teacher on the global views only (tracking the backbone during the RELA
phase too), lightly's head and loss over every (teacher global, student view) pair of different
views, as DINO computes it."""

from __future__ import annotations

import torch
from torch import nn

from rela.errors import RelaError
from rela.training.methods.base import MomentumTeacher


class DINO(MomentumTeacher):
    """Head feature→4·feature→64 (bottleneck)→2048 prototypes (weight-normalised last layer), with
    BatchNorm in its MLP as lightly's CIFAR-10 benchmark builds it (`batch_norm=False`: the ImageNet
    head without), student temperature 0.1, teacher temperature warmed up linearly from 0.04 to 0.07
    over the first 30% of the steps (the paper's 30 of 100 epochs), centring momentum 0.9, teacher
    momentum from `momentum` (0.99 by default, optionally cosine to 1). The prototypes layer gets a
    zero gradient during the first `freeze_last_layer` of the run's steps (the paper freezes it for
    its first epoch: 1% of 100; 0 turns it off) — the usual guard against early collapse. Like the
    temperature warm-up it counts the run's steps, so after a switch at half neither applies."""

    views = "dino"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 2048, momentum: float = 0.99,
                 cosine_momentum: bool = False, warmup_fraction: float = 0.3, teacher_temp: tuple = (0.04, 0.07),
                 batch_norm: bool = True, freeze_last_layer: float = 0.01, image_size: int = 32,
                 local_crops: int | None = None, local_size: int | None = None) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead

        super().__init__(momentum, cosine_momentum)
        self.local_crops = default_local_crops(image_size) if local_crops is None else int(local_crops)
        if self.local_crops:  # the views this instance trains on (a preset with its arguments)
            self.views = f"dino,local_crops={self.local_crops}" + (f",local_size={local_size}" if local_size else "")

        def head() -> nn.Module:
            return DINOProjectionHead(feature_dim, 4 * feature_dim, 64, out_dim, batch_norm=batch_norm)

        self.projection = head()
        self.make_targets(backbone, head)  # its weight-normalised last layer can't be deep-copied
        self.set_criterion(DINOLoss(output_dim=out_dim, warmup_teacher_temp=teacher_temp[0],
                                    teacher_temp=teacher_temp[1]))
        self.warmup_fraction, self.teacher_temps = warmup_fraction, teacher_temp
        self.freeze_fraction, self._frozen = freeze_last_layer, False
        for p in (p for p in self.projection.last_layer.parameters() if p.requires_grad):  # DDP-safe freeze
            p.register_hook(lambda g: torch.zeros_like(g) if self._frozen else g)

    def teacher_temperature(self, step: int, total_steps: int) -> float:
        start, end = self.teacher_temps
        warm = max(1, int(self.warmup_fraction * total_steps))
        return end if step >= warm else start + (end - start) * step / warm

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        """Every view through the student head, the two global ones through the teacher; lightly's
        DINOLoss averages the cross-entropy over (teacher view, student view) pairs of different views."""
        if features.shape[0] < 2 or views[1].shape[-1] != views[0].shape[-1]:
            raise RelaError(f"DINO needs two global views first (then any local ones), got {features.shape[0]} views")
        self._frozen = step < self.freeze_fraction * total_steps
        s = self.projection(features.flatten(0, 1)).view(features.shape[0], features.shape[1], -1)
        t = self.teacher(views[:2])
        return self.criterion(list(t), list(s), teacher_temp=self.teacher_temperature(step, total_steps))


def default_local_crops(image_size: int) -> int:
    """Local crops by resolution: none at ≤ 32 px (lightly's CIFAR-10 benchmark, the ReLA reference
    code), six above (lightly's DINOTransform; the DINO paper trains 2×224 + 10×96 at best)."""
    return 0 if image_size <= 32 else 6
