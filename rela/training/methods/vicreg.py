"""VICReg (Bardes et al. 2022): variance, invariance and covariance terms, lightly's head and loss."""

from __future__ import annotations

import torch
from torch import nn

from rela.training.methods.base import SSLMethod


class VICReg(SSLMethod):
    """Expander feature→8·feature→8·feature (two layers), loss weights 25 / 25 / 1 (the paper's)."""

    views = "byol"  # VICReg uses BYOL's augmentations

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        from lightly.loss import VICRegLoss
        from lightly.models.modules.heads import VICRegProjectionHead

        super().__init__()
        self.projection = VICRegProjectionHead(feature_dim, 8 * feature_dim, 8 * feature_dim, num_layers=2)
        self.set_criterion(VICRegLoss())

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        self.two_views(features, "VICReg")
        z = self.projection(features.flatten(0, 1)).view(2, features.shape[1], -1)
        return self.criterion(z[0], z[1])
