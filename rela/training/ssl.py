"""Self-supervised methods the accelerator hands over to. BYOL first, from lightly's parts.

A method is an `nn.Module` with:
- `views`: the loader view family of its phase (`"byol"`),
- `loss(features, views, step, total_steps)`: its loss from the online backbone's features of
  each view ([V, B, F]) and the views themselves (for its target networks),
- `update_target(step, total_steps)`: its momentum/EMA update, called every optimizer step —
  also during the RELA phase, so the target networks track the backbone there (as in the
  reference code),
- `online_parameters()`: what the optimizer trains besides the backbone.
SimCLR or DINO fit the same shape without touching the accelerator.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rela.errors import RelaError


class SSLMethod(nn.Module):
    views: str = "byol"

    def loss(self, features: torch.Tensor, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        raise NotImplementedError

    def update_target(self, step: int, total_steps: int) -> None:
        pass

    def online_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("target_")]


class BYOL(SSLMethod):
    """BYOL (Grill et al. 2020): projection feature→2·feature→256, prediction 256→2·feature→256,
    symmetric negative cosine loss, EMA target backbone + projection (momentum 0.99, or a cosine
    schedule from `momentum` to 1 with `cosine_momentum=True`)."""

    views = "byol"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 256, momentum: float = 0.99,
                 cosine_momentum: bool = False) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = [backbone]  # not registered: the trainer owns it (a list hides it from nn.Module)
        self.projection = BYOLProjectionHead(feature_dim, 2 * feature_dim, out_dim)
        self.prediction = BYOLPredictionHead(out_dim, 2 * feature_dim, out_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection)
        self.criterion = NegativeCosineSimilarity()
        self.momentum, self.cosine_momentum = momentum, cosine_momentum

    def _momentum(self, step: int, total_steps: int) -> float:
        if not self.cosine_momentum:
            return self.momentum
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, max(total_steps, 1), self.momentum, 1.0)

    def update_target(self, step: int, total_steps: int) -> None:
        from lightly.models.utils import update_momentum

        m = self._momentum(step, total_steps)
        update_momentum(self.backbone[0], self.target_backbone, m)
        update_momentum(self.projection, self.target_projection, m)

    def loss(self, features: torch.Tensor, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        if len(views) != 2:
            raise RelaError(f"BYOL needs two views per sample, got {len(views)}")
        p = self.prediction(self.projection(features.flatten(0, 1))).view(2, features.shape[1], -1)
        with torch.no_grad():
            z = self.target_projection(self.target_backbone(torch.cat(views))).view(2, features.shape[1], -1)
        return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))


METHODS = {"byol": BYOL}


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kw) -> SSLMethod:
    if name not in METHODS:
        raise RelaError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](backbone, feature_dim, **kw)
