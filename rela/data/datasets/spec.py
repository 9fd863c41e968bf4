"""`open_dataset`: what a dataset spec (a name, a path, an object) opens."""

from __future__ import annotations

from pathlib import Path

from rela.data.datasets.arrays import FashionMNIST, _open_npz
from rela.data.datasets.base import RelaDataset
from rela.data.datasets.exif import ExifTransposed
from rela.data.datasets.folder import ImageFolder
from rela.data.datasets.map import MapDataset
from rela.data.datasets.webdataset import WebDataset


def open_dataset(spec, limit: int | None = None, exif_transpose: bool = False) -> RelaDataset:
    """`fashion-mnist[:train|:test]`, an image folder, an `.npz` with `images` (and `labels`),
    WebDataset tar shards (`shards/{000000..000009}.tar`, a glob, or a list), or any map-style
    dataset object (see `MapDataset`). `exif_transpose`: images turned upright by their EXIF
    Orientation tag (`ExifTransposed`); off, as in torchvision."""
    ds = _open(spec, limit)
    return ExifTransposed(ds) if exif_transpose and not isinstance(ds, ExifTransposed) else ds


def _open(spec, limit: int | None) -> RelaDataset:
    if isinstance(spec, RelaDataset):
        ds = spec
    elif isinstance(spec, (list, tuple)) or str(spec).endswith(".tar") or (".tar" in str(spec) and "{" in str(spec)):
        ds = WebDataset(spec)
    elif not isinstance(spec, (str, Path)) and hasattr(spec, "__getitem__"):
        ds = MapDataset(spec)
    else:
        s = str(spec)
        if s == "fashion-mnist" or s.startswith("fashion-mnist:"):
            ds = FashionMNIST(s.partition(":")[2] or "train")
        elif s.endswith(".npz"):
            ds = _open_npz(Path(s))
        else:
            ds = ImageFolder(s)
    return ds.head(limit) if limit else ds
