"""The methods the RELA phase hands over to, one module each, on lightly's heads and losses:
`byol`, `simclr`, `moco` (v2), `barlowtwins`, `vicreg`, `dino`, `supervised`. Adding a method is
one module with an `SSLMethod` subclass (`base`) and one line in `METHODS`."""

from __future__ import annotations

from torch import nn

from rela.errors import RelaError
from rela.training.methods.barlowtwins import BarlowTwins
from rela.training.methods.base import MomentumTeacher, SSLMethod
from rela.training.methods.byol import BYOL
from rela.training.methods.dino import DINO
from rela.training.methods.moco import MoCo
from rela.training.methods.simclr import SimCLR
from rela.training.methods.supervised import Supervised
from rela.training.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {"byol": BYOL, "simclr": SimCLR, "moco": MoCo, "barlowtwins": BarlowTwins,
                                       "vicreg": VICReg, "dino": DINO, "supervised": Supervised}
NAMES = tuple(METHODS)  # for messages and --help without importing torch elsewhere
__all__ = ["METHODS", "MomentumTeacher", "SSLMethod", "build_method", *(c.__name__ for c in METHODS.values())]


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kw) -> SSLMethod:
    """The method `name` for `backbone`; keyword options a method doesn't use are ignored."""
    if name not in METHODS:
        raise RelaError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name](backbone, feature_dim, **kw)
