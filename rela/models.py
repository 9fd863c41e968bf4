"""Student backbones: torchvision ResNets, and ResNets with a CIFAR stem and a width multiplier.

`resnet18-cifar` (3×3 stride-1 stem, no max-pool — the reference code's small-image student) is
built from torchvision's own `BasicBlock`/`Bottleneck`, with every stage's width scaled by `width`
so CPU runs stay small. Backbones return pooled features `[B, feature_dim]` (no classifier).

A leaf below every floor: `rela.training` builds students from it, and `rela.data.priors` builds a
trained student back as the next prior (`student:FILE`, from `rela export`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from rela.errors import RelaError

_DEPTHS = {"resnet18": (tv.BasicBlock, (2, 2, 2, 2)), "resnet34": (tv.BasicBlock, (3, 4, 6, 3)),
           "resnet50": (tv.Bottleneck, (3, 4, 6, 3))}
ARCHS = tuple(sorted([*_DEPTHS, *(f"{a}-cifar" for a in _DEPTHS)]))


class ResNet(nn.Module):
    """A ResNet trunk of torchvision blocks; `cifar=True` swaps in the 3×3 stem without max-pool."""

    def __init__(self, block, layers, width: float = 1.0, cifar: bool = False) -> None:
        super().__init__()
        widths = [max(1, round(64 * width * 2**k)) for k in range(4)]
        self.inplanes = widths[0]
        if cifar:
            stem = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(*(self._stage(block, w, n, 1 if k == 0 else 2)
                                      for k, (w, n) in enumerate(zip(widths, layers, strict=True))))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


def build_backbone(arch: str, width: float = 1.0) -> ResNet:
    """`resnet18|34|50` (ImageNet stem) or `resnet18|34|50-cifar`, widths scaled by `width`."""
    base = arch.removesuffix("-cifar")
    if base not in _DEPTHS:
        raise RelaError(f"unknown student architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if not width > 0:
        raise RelaError(f"--width must be positive, got {width}")
    block, layers = _DEPTHS[base]
    return ResNet(block, layers, width=width, cifar=arch.endswith("-cifar"))
