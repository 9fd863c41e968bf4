"""`rela pack`'s options: the flags and `rela.data.pack.pack()`'s keyword defaults, declared once (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from rela import choices
from rela.options import check_options, option, positive_int


@dataclass(frozen=True)
class PackOptions:
    """How a dataset is written as WebDataset shards."""

    data: str = option(None, choices.DATA_FORMS, required=True)
    out: str = option(None, "folder or s3://bucket/prefix to write the shards (000000.tar, ...), their indexes "
                      "and pack.json into", required=True)
    limit: int | None = option(None, "pack only the first N samples", type=positive_int)
    shard_mb: float = option(256.0, "start a new shard once one holds this many MB (WebDataset's advice: "
                             "100 MB-1 GB)", type=float, low=0.0, low_open=True)
    max_side: int | None = option(None, "re-encode images whose longer side exceeds this, resized to it (as FFCV's "
                                  "writer's max_resolution); default: keep every image's size", type=positive_int)
    quality: int = option(95, "JPEG quality of re-encoded images (images kept as they are keep their bytes)",
                          type=positive_int, low=1, high=100)
    skip_corrupt: bool = option(False, "leave undecodable samples out (recorded in pack.json) instead of stopping")
    overwrite: bool = option(False, "replace whatever is at --out")

    def __post_init__(self) -> None:
        check_options(self)
