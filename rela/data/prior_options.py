"""What a prior spec may be given besides its name: weights, architecture, preprocessing.

Kept apart from `rela.data.priors` (which needs torch) so `rela convert --help`, whose prior
flags are these fields, stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rela import choices
from rela.options import check_options, floats3, option, positive_int


@dataclass(frozen=True)
class PriorOptions:
    """What a prior spec may be given besides its name (also `rela convert`'s prior flags)."""

    arch: str | None = option(
        None, "architecture for state_dict:<path> priors (torchvision name or efficientnet-lite0)"
    )
    weights: str | Path | None = option(None, "local weights file for torchvision:, timm: and open_clip: priors")
    input_size: int | None = option(None, "prior input resolution (default: the prior's own)", type=positive_int,
                                    low=8, high=2048)
    resize: int | None = option(None, "resize the shorter side to this before the centre crop (default: the "
                                "prior's own, e.g. timm's input size / crop_pct)", type=positive_int, low=8,
                                high=4096)
    interpolation: str | None = option(None, "resize interpolation (default: the prior's own)",
                                       choices=choices.INTERPOLATIONS)
    mean: tuple[float, float, float] | None = option(None, "override normalisation mean, e.g. 0.485,0.456,0.406",
                                                     type=floats3)
    std: tuple[float, float, float] | None = option(None, "override normalisation std", type=floats3)
    seed: int = option(0, "seed for random:<arch> priors")
    trust_pickle: bool = option(False, "allow weights files that contain pickled Python objects, and torchscript: "
                                "priors (runs their code!)")

    def __post_init__(self) -> None:
        check_options(self)
