"""MoCo v2 (Chen et al. 2020): a momentum key encoder and a queue of negatives, lightly's parts."""

from __future__ import annotations

import torch
from torch import nn

from rela.training.methods.base import MomentumTeacher


class MoCo(MomentumTeacher):
    """Projection feature→feature→128, keys from the EMA encoder (momentum 0.99, lightly's CIFAR
    benchmark), NT-Xent at temperature 0.1 against a queue of 4096 past keys (a buffer of the
    loss module, so it is checkpointed and resumes exactly). The loss is symmetrised over the two
    views, so the queue receives both views' keys of each step."""

    views = "simclr"

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int = 128, momentum: float = 0.99,
                 cosine_momentum: bool = False, queue: int = 4096, temperature: float = 0.1) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import MoCoProjectionHead

        super().__init__(momentum, cosine_momentum)
        self.projection = MoCoProjectionHead(feature_dim, feature_dim, out_dim)
        self.make_targets(backbone)
        self.set_criterion(NTXentLoss(temperature=temperature, memory_bank_size=(queue, out_dim)))
        bank = self.criterion.memory_bank  # lightly keeps the queue out of state_dict: put it back in,
        bank.register_buffer("bank", bank.bank)  # so a resumed run contrasts with the same negatives
        bank.register_buffer("bank_ptr", bank.bank_ptr)

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        self.two_views(features, "MoCo")
        q = self.projection(features.flatten(0, 1)).view(2, features.shape[1], -1)
        k = self.teacher(views)
        # lightly's loss pushes the key batch into the queue on each call: the queue then holds
        # both views' keys of each step, as MoCo's symmetrised loss does.
        return 0.5 * (self.criterion(q[0], k[1]) + self.criterion(q[1], k[0]))
