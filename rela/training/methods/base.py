"""The interface every method implements, and the momentum teacher BYOL, MoCo and DINO share.

A method is an `nn.Module` with:
- `views`: the views of its phase — a preset name (e.g. `"byol"`, see `rela.loading.views`), its own
  `ViewSpec`s, or a method `views(self, size)` returning them for the run's image size (as a lightly
  method carries its transform: a method with new views needs no edit of the loading floor) — used
  unless `--ssl-views` says otherwise,
- `needs_labels`: True if its loss reads the labels (every sample must then have one),
- a constructor `(backbone, feature_dim, <its options>)` that takes only what it declares: the
  trainer's settings (`momentum`, `cosine_momentum`, `classes`) reach the methods that declare them,
  and a misspelled option fails,
- `loss(features, views, step, total_steps, labels)`: its loss from the online backbone's features
  of each view ([V, B, F]), the views themselves (for target networks) and the labels (supervised),
- `update_target(step, total_steps, backbone)`: its momentum/EMA update from the online `backbone`
  (which the trainer owns and passes in: the method holds no hidden reference), called every optimizer step — also
  during the RELA phase, so target networks track the backbone there (as in the reference code),
- `online_parameters()`: what the optimizer trains besides the backbone (not the `target_*` copies),
- its loss criterion set with `set_criterion`, which computes it in float32 under autocast (in
  `rela train`, in `Accelerator` loops and in yours alike).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from rela.errors import RelaError


class SSLMethod(nn.Module):
    views: str | tuple | Callable[[int], tuple] = "byol"
    needs_labels: bool = False

    def set_criterion(self, criterion: nn.Module) -> None:
        """`self.criterion`, computed in float32 under autocast: the losses' exp/log/normalise
        overflow or lose the signal in bf16/fp16 (rela.training.precision.float32_loss)."""
        from rela.training.precision import float32_loss

        self.criterion = float32_loss(criterion)

    def loss(self, features: torch.Tensor, views: list[torch.Tensor], step: int, total_steps: int,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def update_target(self, step: int, total_steps: int, backbone: nn.Module) -> None:
        pass

    def online_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("target_")]

    @staticmethod
    def two_views(features: torch.Tensor, name: str) -> None:
        if features.shape[0] != 2:
            raise RelaError(f"{name} needs two views per sample, got {features.shape[0]}")


class MomentumTeacher(SSLMethod):
    """A method whose target (teacher) is an EMA of the backbone and of `self.projection`:
    `target_backbone`, `target_projection`, updated with lightly's `update_momentum` at a fixed
    momentum or on a cosine schedule from `momentum` to 1."""

    def __init__(self, momentum: float, cosine_momentum: bool) -> None:
        super().__init__()
        self.momentum, self.cosine_momentum = momentum, cosine_momentum

    def make_targets(self, backbone: nn.Module, new_projection=None) -> None:
        """Copy the online backbone and the projection head as the frozen teacher (call after
        building heads). `new_projection()` builds a fresh head to load the weights into, for heads
        that can't be deep-copied (weight-normalised layers hold non-leaf tensors)."""
        from lightly.models.utils import deactivate_requires_grad

        self.target_backbone = copy.deepcopy(backbone)
        if new_projection is None:
            self.target_projection = copy.deepcopy(self.projection)
        else:
            self.target_projection = new_projection()
            self.target_projection.load_state_dict(self.projection.state_dict())
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection)

    def _momentum(self, step: int, total_steps: int) -> float:
        if not self.cosine_momentum:
            return self.momentum
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, max(total_steps, 1), self.momentum, 1.0)

    def update_target(self, step: int, total_steps: int, backbone: nn.Module) -> None:
        """target ← m·target + (1 − m)·online, as lightly's `update_momentum`, but in two
        `torch._foreach_*` calls over every parameter instead of two kernels per parameter."""
        m = self._momentum(step, total_steps)
        online = [*backbone.parameters(), *self.projection.parameters()]
        target = [*self.target_backbone.parameters(), *self.target_projection.parameters()]
        with torch.no_grad():
            torch._foreach_mul_(target, m)
            torch._foreach_add_(target, online, alpha=1 - m)

    @torch.no_grad()
    def teacher(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's projections of every view, [V, B, D]."""
        z = self.target_projection(self.target_backbone(torch.cat(views)))
        return z.view(len(views), len(views[0]), -1)
