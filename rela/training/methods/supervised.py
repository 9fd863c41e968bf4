"""Supervised training (cross-entropy on the labels): the paper accelerates "(self-)supervised"
learning, so the RELA phase can hand over to plain classification too."""

from __future__ import annotations

import torch
from torch import nn

from rela.errors import RelaError
from rela.training.methods.base import SSLMethod


class Supervised(SSLMethod):
    """A linear classifier on the backbone's features, cross-entropy averaged over the views."""

    views = "supervised"
    needs_labels = True

    def __init__(self, backbone: nn.Module, feature_dim: int, classes: int = 0) -> None:
        super().__init__()
        self.classes = classes
        self.classifier = nn.Linear(feature_dim, max(classes, 1))

    def loss(self, features, views, step, total_steps, labels=None) -> torch.Tensor:
        # Unlabelled samples (-1): checked here only where that costs no device sync; rela train
        # checks the whole dataset's labels before training.
        if labels is None or self.classes < 2 or (labels.device.type == "cpu" and bool((labels < 0).any())):
            raise RelaError("method 'supervised' needs a labelled dataset (class sub-folders, an .npz with "
                            "labels, fashion-mnist); this one has unlabelled samples")
        logits = self.classifier(features.flatten(0, 1))
        return nn.functional.cross_entropy(logits.float(), labels.to(logits.device).repeat(features.shape[0]))
