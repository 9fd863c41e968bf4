"""EXIF orientation: read the tag, turn the pixels upright, and the dataset wrapper that does both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rela.data.datasets.base import RelaDataset


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation tag (1–8; 1 = upright) of an encoded image, from PIL's header parse;
    1 when there is none or it is unreadable."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # any header PIL can't parse: no orientation to apply (decoding says the rest)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """`image` (H×W×C) turned as EXIF orientation `orientation` asks, as PIL's exif_transpose."""
    turned = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }[orientation](image)
    return turned if orientation == 1 else np.ascontiguousarray(turned)


class ExifTransposed(RelaDataset):
    """`base` with every image turned upright by its EXIF Orientation tag (phone photos), as PIL's
    `ImageOps.exif_transpose`. Off unless asked for (`exif_transpose=True` / `--exif-transpose`):
    torchvision's ImageFolder and decode_jpeg leave the tag alone, and so does rela by default. A
    rotated JPEG is not offered to the fast decoders (`encoded` gives None), so every backend
    takes its upright pixels from `load`; its fingerprint differs from the base's, so a store made
    without the option is not used with it."""

    def __init__(self, base: RelaDataset) -> None:
        self.base, self.kind, self.in_memory = base, f"{base.kind}+exif-transpose", base.in_memory
        self.runs_user_code = base.runs_user_code

    def __getattr__(self, name: str):  # everything else (name, classes, root, ...) is the base's
        base = self.__dict__.get("base")
        if base is None:  # while unpickling in a worker process, before __dict__ is filled
            raise AttributeError(name)
        return getattr(base, name)

    def __len__(self) -> int:
        return len(self.base)

    def _orientation(self, index: int) -> int:
        try:
            enc = self.base.encoded(index)
        except OSError:
            return 1  # unreadable: load() says why
        return 1 if enc is None else exif_orientation(enc[0])

    def load(self, index: int) -> np.ndarray:
        return upright(self.base.load(index), self._orientation(index))

    def encoded(self, index: int, suffixes: tuple[str, ...] | None = None) -> tuple[bytes, str] | None:
        enc = self.base.encoded(index, suffixes)
        return None if enc is None or exif_orientation(enc[0]) != 1 else enc

    def label(self, index: int) -> int:
        return self.base.label(index)

    def labels(self) -> np.ndarray:
        return self.base.labels()

    def describe(self, index: int) -> str:
        return self.base.describe(index)

    def path(self, index: int) -> Path | None:
        return self.base.path(index)

    def _record(self, index: int, deep: bool) -> bytes:
        return self.base._record(index, deep)

    def fingerprint(self, deep: bool = False) -> dict:
        return {**self.base.fingerprint(deep), "kind": self.kind}

    def info(self) -> dict:
        return self.base.info()
