"""BYOL (Grill et al. 2020) from lightly's heads and loss."""

from __future__ import annotations

import torch
from torch import nn

from rela.training.methods.base import MomentumTeacher


class BYOL(MomentumTeacher):
    """Projection feature→2·feature→256, prediction 256→2·feature→256, symmetric negative cosine
    loss, EMA target backbone + projection (momentum 0.99, or a cosine schedule to 1)."""

    views = "byol"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 256, momentum: float = 0.99,
                 cosine_momentum: bool = False) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

        super().__init__(momentum, cosine_momentum)
        self.projection = BYOLProjectionHead(feature_dim, 2 * feature_dim, out_dim)
        self.prediction = BYOLPredictionHead(out_dim, 2 * feature_dim, out_dim)
        self.make_targets(backbone)
        self.set_criterion(NegativeCosineSimilarity())

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        self.two_views(features, "BYOL")
        p = self.prediction(self.projection(features.flatten(0, 1))).view(2, features.shape[1], -1)
        z = self.teacher(views)
        return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))
