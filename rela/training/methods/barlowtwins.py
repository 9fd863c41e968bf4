"""Barlow Twins (Zbontar et al. 2021): decorrelate the two views' embeddings, lightly's head and loss."""

from __future__ import annotations

import torch
from torch import nn

from rela.training.methods.base import SSLMethod


class BarlowTwins(SSLMethod):
    """Projector feature→8·feature→8·feature (the paper's 4× expansion of a 2048-d ResNet-50
    feature into 8192, kept proportional for narrow students), cross-correlation loss λ = 5e-3."""

    views = "byol"  # the paper's augmentations are BYOL's

    def __init__(self, backbone: nn.Module, feature_dim: int, lambda_param: float = 5e-3) -> None:
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules.heads import BarlowTwinsProjectionHead

        super().__init__()
        self.projection = BarlowTwinsProjectionHead(feature_dim, 8 * feature_dim, 8 * feature_dim)
        self.set_criterion(BarlowTwinsLoss(lambda_param=lambda_param))

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        self.two_views(features, "Barlow Twins")
        z = self.projection(features.flatten(0, 1)).view(2, features.shape[1], -1)
        return self.criterion(z[0], z[1])
