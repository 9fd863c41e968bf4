"""`open_dataset`: what a dataset spec (a name, a path, an object) opens."""

from __future__ import annotations

from rela import registry
from rela.data.datasets.base import RelaDataset
from rela.data.datasets.exif import ExifTransposed
from rela.errors import DatasetError


def open_dataset(spec, limit: int | None = None, exif_transpose: bool = False) -> RelaDataset:
    """`fashion-mnist[:train|:test]`, an image folder, an `.npz` with `images` (and `labels`),
    WebDataset tar shards (`shards/{000000..000009}.tar`, a glob, or a list), or any map-style
    dataset object (see `MapDataset`). `exif_transpose`: images turned upright by their EXIF
    Orientation tag (`ExifTransposed`); off, as in torchvision."""
    ds = _open(spec, limit)
    return ExifTransposed(ds) if exif_transpose and not isinstance(ds, ExifTransposed) else ds


def _open(spec, limit: int | None) -> RelaDataset:
    """The first format in `rela.registry.DATASETS` that claims `spec` opens it."""
    for entry in registry.DATASETS.values():
        fmt = entry.load()
        if fmt.claims(spec):
            ds = fmt.from_spec(spec)
            return ds.head(limit) if limit else ds
    raise DatasetError(f"no dataset format takes {spec!r}: give a path, fashion-mnist[:split], shards or a "
                       "map-style dataset (rela.registry.DATASETS lists the formats)")
