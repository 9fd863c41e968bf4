"""`rela convert`'s options: the flags and `rela.convert()`'s keyword defaults, declared once.

Torch-free (like `prior_options`) so `rela convert --help` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from rela import choices
from rela.options import check_options, option, positive_int


@dataclass(frozen=True)
class ConvertOptions:
    """What a conversion is given besides its prior's options (`PriorOptions`)."""

    data: str = option(None, choices.DATA_FORMS, required=True)
    prior: str = option(None, choices.PRIOR_FORMS, required=True)
    out: str = option(None, "store directory to create", required=True)
    dim: int = option(256, "PCA components to keep", type=positive_int, low=1)
    limit: int | None = option(None, "use only the first N samples", type=positive_int)
    batch_size: int = option(256, "images per prior batch", type=positive_int, low=1)
    chunk_rows: int = option(4096, "rows per committed chunk", type=positive_int, low=1)
    num_workers: int | None = option(None, "decode worker processes per rank (default: 2, fewer if the node has fewer "
                                     "cores per rank; 0 for small or in-memory data)", flag="--workers", metavar="N",
                                     low=0, high=256)
    skip_corrupt: bool = option(False, "record undecodable samples as skipped instead of stopping")
    exif_transpose: bool = option(
        False,
        "turn each image upright by its EXIF Orientation tag (phone photos); off, as in torchvision's ImageFolder",
    )
    resume: bool = option(False, "require an interrupted conversion to resume (without it one resumes when found)")
    overwrite: bool = option(False, "replace whatever is at --out")
    keep_raw: bool = option(False, "keep raw prior features in OUT/.convert")
    deep: bool = option(False, "fingerprint file contents, not just names and sizes")
    device: str = option("auto", "where the prior runs: auto (this rank's GPU when there is one) | cpu | cuda[:N]",
                         pattern=choices.DEVICE_PATTERN, pattern_help=choices.DEVICE_FORMS)

    def __post_init__(self) -> None:
        check_options(self)
