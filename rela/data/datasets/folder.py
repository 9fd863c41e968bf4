"""`ImageFolder`: class sub-folders (torchvision's layout) or a flat folder of images."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from rela.data import folder_scan
from rela.data.datasets.base import RelaDataset
from rela.data.datasets.decode import decode_image
from rela.data.folder_scan import IMG_EXTENSIONS
from rela.errors import CorruptImageError, DatasetError, RelaWarning


class ImageFolder(RelaDataset):
    """Images under a folder: class sub-folders (torchvision's ImageFolder layout) or a flat,
    unlabeled folder. Order: class names sorted, then file paths sorted within each class.
    The listing comes from `rela.data.folder_scan` (parallel, cached until the folder changes;
    `cache=False` or RELA_SCAN_CACHE=0 always scans)."""

    kind = "image-folder"

    @classmethod
    def claims(cls, spec) -> bool:
        """Any other path: a folder of images (asked last)."""
        return isinstance(spec, (str, Path))

    def __init__(self, root: str | Path, cache: bool = True) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset path {self.root} does not exist")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is not a folder (expected an image folder, an .npz or 'fashion-mnist')")
        self._scan = listing = folder_scan.scan(self.root, cache)
        self.classes, self._paths, self._sizes, self._labels = (listing.classes, listing.paths, listing.sizes,
                                                                listing.labels)
        if listing.ignored_top:
            warnings.warn(f"{self.root}: {listing.ignored_top} images at the top level are ignored "
                          "(class sub-folders are in use)", RelaWarning, stacklevel=2)
        if listing.others:
            warnings.warn(f"{self.root}: {len(listing.others)} files in the class folders are not images rela reads "
                          f"and are left out (first: {listing.others[0]}; images are {', '.join(IMG_EXTENSIONS)})",
                          RelaWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        rel, label = self._paths[index], int(self._labels[index])
        if not folder_scan.safe_relative(rel, self.classes[label] if label >= 0 else None):
            raise DatasetError(f"sample {index} of {self.root}: its cached listing puts {rel!r} in class "
                               f"{self.classes[label] if label >= 0 else '(none)'!r}, which no scan of this folder "
                               f"does. Delete {folder_scan.cache_root() / 'scans'} (or set RELA_SCAN_CACHE=0)")
        return self.root / rel

    def size(self, index: int) -> int:
        """File size in bytes as listed (from the cached listing when the folder is unchanged)."""
        return int(self._sizes[index])

    def load(self, index: int) -> np.ndarray:
        try:
            return decode_image(self.path(index))
        except ValueError as e:
            reason = folder_scan.broken_link_reason(str(self.path(index))) or str(e)
            raise CorruptImageError(index, str(self.path(index)), reason) from None

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def _record(self, index: int, deep: bool) -> bytes:
        if deep:  # the file's real size and contents, never the cached listing's size
            data = self.path(index).read_bytes()
            return f"{self._paths[index]}\t{len(data)}\t{self._labels[index]}".encode() + hashlib.sha256(data).digest()
        return f"{self._paths[index]}\t{self._sizes[index]}\t{self._labels[index]}".encode()

    def fingerprint(self, deep: bool = False) -> dict:
        """As RelaDataset's; the shallow digest is computed once and kept with the cached listing."""
        if deep:
            return super().fingerprint(deep=True)
        if self._scan.digest is None:
            self._scan.digest = super().fingerprint()["digest"]
            folder_scan.remember_digest(self.root, self._scan)
        return self._fingerprint(self._scan.digest, False)

    def info(self) -> dict:
        return {"root": str(self.root.resolve()), "classes": len(self.classes)}
