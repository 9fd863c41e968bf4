"""In-memory datasets: numpy arrays, Fashion-MNIST's IDX files, `.npz` files."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from rela.data.datasets.base import RelaDataset
from rela.errors import DatasetError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


class ArrayDataset(RelaDataset):
    """Images held in a numpy array [N, H, W] or [N, H, W, C] (uint8), with optional labels."""

    kind = "array"
    in_memory = True  # decoding is a memory copy: no need for decode workers

    @classmethod
    def claims(cls, spec) -> bool:
        """An `.npz` file with `images` (and `labels`)."""
        return isinstance(spec, (str, Path)) and str(spec).endswith(".npz")

    @classmethod
    def from_spec(cls, spec) -> ArrayDataset:
        return _open_npz(Path(spec))

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array") -> None:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DatasetError(
                f"{name}: images must have shape [N, H, W] or [N, H, W, C] with C in (1, 3), "
                f"got {tuple(images.shape)}"
            )
        if images.dtype != np.uint8:
            raise DatasetError(f"{name}: images must be uint8, got {images.dtype}; scale to 0..255 first")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise DatasetError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < -1:
            i = int(np.flatnonzero(labels < -1)[0])
            raise DatasetError(f"{name}: label {labels[i]} of sample {i} is negative (class indices are >= 0; -1 "
                               "means unlabeled)")
        if 0 in images.shape[1:3]:
            raise DatasetError(f"{name}: images of shape {tuple(images.shape[1:])} are empty")
        self.images, self._labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _record(self, index: int, deep: bool) -> bytes:
        # Arrays are in memory: hashing their contents is as cheap as any name would be.
        return self.images[index].tobytes() + self._labels[index].tobytes()

    def fingerprint(self, deep: bool = False) -> dict:
        # Vectorised: one pass over the whole buffer instead of a Python loop per sample.
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self._labels.tobytes())
        return self._fingerprint(h.hexdigest(), deep)

    def typical_side(self, samples: int = 16) -> int:
        return int(min(self.images.shape[1:3]))

    def info(self) -> dict:
        return {"name": self.name, "shape": list(self.images.shape[1:])}


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files (60k train / 10k test)."""

    kind = "fashion-mnist"
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    @classmethod
    def claims(cls, spec) -> bool:
        """`fashion-mnist`, `fashion-mnist:train` or `fashion-mnist:test` (Debian's files)."""
        return isinstance(spec, str) and (spec == "fashion-mnist" or spec.startswith("fashion-mnist:"))

    @classmethod
    def from_spec(cls, spec) -> FashionMNIST:
        return cls(spec.partition(":")[2] or "train")

    def __init__(self, split: str = "train", root: str | Path | None = None) -> None:
        root = Path(root or os.environ.get("RELA_FASHION_MNIST", FASHION_MNIST_ROOT))
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise DatasetError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
        img_path = root / f"{prefix}-images-idx3-ubyte.gz"
        lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
        if not img_path.exists() or not lbl_path.exists():
            raise DatasetError(
                f"Fashion-MNIST not found under {root}. Install it with "
                "`apt-get install dataset-fashion-mnist` (or set RELA_FASHION_MNIST to its folder)."
            )
        images = _read_idx(img_path)
        labels = _read_idx(lbl_path)
        super().__init__(images, labels, name=f"fashion-mnist:{split}")
        self.split = split

    def info(self) -> dict:
        return {"split": self.split}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX uint8 file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable, owned
    if arr.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: truncated (expected {int(np.prod(dims))} values, got {arr.size})")
    return arr.reshape(tuple(dims))


def _open_npz(path: Path) -> ArrayDataset:
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            img_key = next((k for k in ("images", "x", "x_train") if k in keys), None)
            if img_key is None:
                raise DatasetError(f"{path}: no 'images' array (found {sorted(keys)})")
            lbl_key = next((k for k in ("labels", "y", "y_train") if k in keys), None)
            images = z[img_key]
            labels = z[lbl_key] if lbl_key else None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable .npz ({e})") from None
    return ArrayDataset(images, labels, name=path.name)
