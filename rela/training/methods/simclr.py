"""SimCLR (Chen et al. 2020): NT-Xent over the two views' projections, lightly's head and loss."""

from __future__ import annotations

import torch
from torch import nn

from rela.training.methods.base import SSLMethod


class SimCLR(SSLMethod):
    """Projection feature→feature→128 (lightly's CIFAR benchmark head), NT-Xent at temperature 0.5
    with the batch's other samples as negatives."""

    views = "simclr"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 128, temperature: float = 0.5) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__()
        self.projection = SimCLRProjectionHead(feature_dim, feature_dim, out_dim)
        self.set_criterion(NTXentLoss(temperature=temperature))

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        self.two_views(features, "SimCLR")
        z = self.projection(features.flatten(0, 1)).view(2, features.shape[1], -1)
        return self.criterion(z[0], z[1])
