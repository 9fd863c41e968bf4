"""Datasets with a stable index order and a cheap fingerprint.

Row i of a target store belongs to sample i, so a dataset's order must never depend on the
file system's listing order, and a store must be able to tell whether it was made from this
very dataset. Every dataset here therefore has a sorted, deterministic order and a
`fingerprint()` over each sample's identity (name, size, label — contents only with `deep`).

Samples decode to uint8 HWC numpy arrays (C = 1 or 3) so every backend and prior can share them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import operator
import os
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rela.data import folder_scan
from rela.data.folder_scan import IMG_EXTENSIONS
from rela.data.store import atomic_write_bytes
from rela.errors import CorruptImageError, DatasetError, RelaWarning

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Refuse images whose header claims more pixels than this (decompression bombs); ImageNet's
# largest image is ~ 20 MP.
MAX_PIXELS = 100_000_000


class RelaDataset(ABC):
    """A map-style dataset: `load(i)` gives the image, `label(i)` its class (-1 if unlabeled).

    Capabilities are declared here so backends ask instead of probing: `in_memory` (decoding
    is a memory copy, so decode workers would cost more than they save), `runs_user_code` (a
    sample runs the user's Python, which holds the GIL: worker processes, not threads) and
    `path(i)` (the file a sample lives in, so a backend may read its bytes itself, e.g. the JPEG
    crop decoder)."""

    kind: str = "dataset"
    in_memory: bool = False
    runs_user_code: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Decode sample `index` to a uint8 H×W×C array (C = 1 or 3); CorruptImageError if it can't."""

    @abstractmethod
    def label(self, index: int) -> int: ...

    @abstractmethod
    def describe(self, index: int) -> str:
        """Where sample `index` comes from (a file path, an array row), for error messages."""

    def path(self, index: int) -> Path | None:
        """The file sample `index` is decoded from, or None when it does not come from a file."""
        return None

    def encoded(self, index: int, suffixes: tuple[str, ...] | None = None) -> tuple[bytes, str] | None:
        """Sample `index`'s encoded bytes and lower-case suffix, for backends that decode themselves
        (the JPEG crop decoder, DALI); None when it isn't stored encoded, or its suffix isn't one of
        `suffixes` (checked before reading). OSError when it can't be read."""
        path = self.path(index)
        if path is None or (suffixes is not None and path.suffix.lower() not in suffixes):
            return None
        return path.read_bytes(), path.suffix.lower()

    @abstractmethod
    def _record(self, index: int, deep: bool) -> bytes:
        """The bytes that identify sample `index` in the fingerprint."""

    def info(self) -> dict:
        """Descriptive fields stored beside the fingerprint (not compared)."""
        return {}

    def labels(self) -> np.ndarray:
        return np.fromiter((self.label(i) for i in range(len(self))), np.int64, len(self))

    def typical_side(self, samples: int = 16) -> int:
        """The median shorter side of `samples` evenly spaced images (undecodable ones left out),
        e.g. to choose a prior's input size that fits the data."""
        sides = []
        for i in np.linspace(0, len(self) - 1, min(samples, len(self))).astype(int).tolist():
            try:
                sides.append(min(self.load(i).shape[:2]))
            except CorruptImageError:
                continue
        if not sides:
            raise DatasetError("none of the sampled images could be decoded")
        return int(np.median(sides))

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.load(index), self.label(index)

    def fingerprint(self, deep: bool = False) -> dict:
        """Identity of the dataset: kind, size, and a sha256 over every sample's record in order."""
        h = hashlib.sha256()
        for i in range(len(self)):
            rec = self._record(i, deep)
            h.update(len(rec).to_bytes(8, "little"))
            h.update(rec)
        return {"kind": self.kind, "n": len(self), "deep": deep, "digest": h.hexdigest(), **self.info()}

    def head(self, n: int) -> RelaDataset:
        """The first n samples, as a dataset of its own (with its own fingerprint)."""
        if n <= 0:
            raise DatasetError(f"--limit must be positive, got {n}")
        return self if n >= len(self) else _Head(self, n)


class _Head(RelaDataset):
    def __init__(self, base: RelaDataset, n: int) -> None:
        self.base, self.n, self.kind, self.in_memory = base, n, base.kind, base.in_memory
        self.runs_user_code = base.runs_user_code

    def __len__(self) -> int:
        return self.n

    def _check(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return index

    def load(self, index: int) -> np.ndarray:
        return self.base.load(self._check(index))

    def label(self, index: int) -> int:
        return self.base.label(self._check(index))

    def describe(self, index: int) -> str:
        return self.base.describe(index)

    def path(self, index: int) -> Path | None:
        return self.base.path(self._check(index))

    def _record(self, index: int, deep: bool) -> bytes:
        return self.base._record(index, deep)

    def info(self) -> dict:
        return {**self.base.info(), "limit": self.n}


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
    turned = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
              8: lambda a: np.rot90(a, 1)}[orientation](image)
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


class ArrayDataset(RelaDataset):
    """Images held in a numpy array [N, H, W] or [N, H, W, C] (uint8), with optional labels."""

    kind = "array"
    in_memory = True  # decoding is a memory copy: no need for decode workers

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

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

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
        return {"kind": self.kind, "n": len(self), "deep": deep, "digest": h.hexdigest(), **self.info()}

    def typical_side(self, samples: int = 16) -> int:
        return int(min(self.images.shape[1:3]))

    def info(self) -> dict:
        return {"name": self.name, "shape": list(self.images.shape[1:])}


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files (60k train / 10k test)."""

    kind = "fashion-mnist"
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

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


# torchvision 0.29 deprecates its image codecs (warning on every call) in favour of TorchCodec;
# they are still the fastest JPEG decoder installed here. Silence exactly that message; move to
# TorchCodec once its image decoding is available to us.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A `load()` result (uint8 H×W×C, C = 1 or 3) as a contiguous H×W×3 array, for libraries
    that take only RGB (DALI's external source, FFCV's RGBImageField)."""
    image = np.asarray(image)
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


def jpeg_header(data) -> tuple[int, int]:
    """(width, height) of a JPEG as its decoder reads them: libjpeg's own `jpeg_read_header` in
    rela._C (PIL's header parse without the extension). The only size rela uses for a JPEG — crop
    boxes, the pixel limit — so no second parser can disagree with the decoder. ValueError with the
    reason when there is none (not a JPEG, a cut header, a zero width or height)."""
    from rela import _ext

    if _ext.has_jpeg_decoder():
        w, h = _ext.jpeg_header(data)[:2]
    else:
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
    check_size(w, h)
    return w, h


def check_size(width: int, height: int) -> None:
    """Refuse an image size before anything is allocated for it: empty, or over MAX_PIXELS."""
    if width < 1 or height < 1:
        raise ValueError(f"its header says {width}x{height} pixels (an empty image)")
    if width * height > MAX_PIXELS:
        raise ValueError(f"declared size {width}x{height} exceeds the {MAX_PIXELS:,}-pixel limit")


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """libjpeg-turbo through torchvision (faster than PIL); None for what it doesn't handle (CMYK).
    The size is read (and refused) before torchvision allocates anything."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    w, h = jpeg_header(data)
    try:
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise ValueError(str(e).strip().splitlines()[-1]) from None
    if t.shape[0] not in (1, 3):
        return None
    if tuple(t.shape[1:]) != (h, w):  # two libjpeg copies that disagree: trust neither
        raise ValueError(f"decoded {t.shape[2]}x{t.shape[1]} pixels where its header says {w}x{h}")
    return t.permute(1, 2, 0).numpy()  # H×W×C view of the C×H×W buffer: no copy


def decode_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 H×W×C (C = 1 or 3); raises ValueError with the reason."""
    if str(path).lower().endswith((".jpg", ".jpeg")):  # read once; libjpeg-turbo first, PIL for the rest
        try:
            return decode_bytes(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(str(e)) from None
    return _decode_pil(path)


def decode_bytes(data: bytes) -> np.ndarray:
    """`decode_image` for an encoded image held in memory (e.g. a tar member)."""
    import io

    if not data:
        raise ValueError("empty file")
    if data[:2] == b"\xff\xd8":
        out = _decode_jpeg(data)
        if out is not None:
            return out
    return _decode_pil(io.BytesIO(data))


def _decode_pil(source) -> np.ndarray:
    """PIL's decode of a path or file object to uint8 H×W×C; ValueError with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            check_size(*im.size)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                return np.clip(np.rint(a * (255.0 / _full_scale(im.mode, a))), 0, 255).astype(np.uint8)[..., None]
            if im.mode == "L":
                return np.asarray(im, dtype=np.uint8)[..., None]
            if im.mode != "RGB":
                im = im.convert("RGB")  # CMYK, P, RGBA, LA, YCbCr ...
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(str(e) or type(e).__name__) from e


def _full_scale(mode: str, a: np.ndarray) -> float:
    """The white of a high-bit-depth greyscale image: its bit depth, never its own brightest pixel
    (a dark 16-bit image must stay dark). PIL opens 16-bit PNG/PGM/TIFF as I;16* or I (32-bit
    container of 16-bit data); an I image with values past 16 bits is taken as 32-bit. F keeps its
    earlier rule (16-bit values past 255, else 8-bit)."""
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "I":
        return 65535.0 if a.size == 0 or a.max() <= 65535 else 4294967295.0
    return 65535.0 if a.size and a.max() > 255 else 255.0


class ImageFolder(RelaDataset):
    """Images under a folder: class sub-folders (torchvision's ImageFolder layout) or a flat,
    unlabeled folder. Order: class names sorted, then file paths sorted within each class.
    The listing comes from `rela.data.folder_scan` (parallel, cached until the folder changes;
    `cache=False` or RELA_SCAN_CACHE=0 always scans)."""

    kind = "image-folder"

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

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

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
        return {"kind": self.kind, "n": len(self), "deep": False, "digest": self._scan.digest, **self.info()}

    def info(self) -> dict:
        return {"root": str(self.root.resolve()), "classes": len(self.classes)}


class WebDataset(RelaDataset):
    """WebDataset-layout tar shards (`000000.tar`, ... holding `KEY.jpg` + `KEY.cls`), with the
    random access rela's subsets and exact resume need: each shard's member offsets are indexed
    once (Python's tarfile, uncompressed shards) and cached under $RELA_CACHE/wds by the shard's
    path, size and modification time. Order: shards in the given order, samples in tar order.
    JPEG members reach the C++ crop-while-decoding path through `encoded()`."""

    kind = "webdataset"
    IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".ppm", ".bmp")

    def __init__(self, shards) -> None:
        self.shards = _expand_shards(shards)
        parts, self._cache_keys = [], []
        for k, shard in enumerate(self.shards):
            index, truncated, cache_key = _shard_index(shard)
            parts.append((k, index))
            self._cache_keys.append(cache_key)
            if truncated:
                warnings.warn(f"{shard} is truncated: {truncated}. Its {len(index.keys)} indexed samples are used (one "
                              "cut short fails when read, like a corrupt image) and the rest of it is lost; re-create "
                              "the shard", RelaWarning, stacklevel=2)
        # one flat column per field: 1.28M tuples cost seconds to build and hundreds of MB to hold
        self._shard = np.concatenate([np.full(len(ix.keys), k, np.int32) for k, ix in parts])
        self._keys = [key for _, ix in parts for key in ix.keys]
        self._exts = [ext for _, ix in parts for ext in ix.exts]
        self._offsets = np.concatenate([ix.offsets for _, ix in parts])
        self._sizes = np.concatenate([ix.sizes for _, ix in parts])
        self._labels = np.concatenate([ix.labels for _, ix in parts])
        if not self._keys:
            raise DatasetError(f"no images in {len(self.shards)} shard(s) (looked for KEY{{{','.join(self.IMAGE_EXTENSIONS)}}})")

    def __len__(self) -> int:
        return len(self._keys)

    def encoded(self, index: int, suffixes: tuple[str, ...] | None = None) -> tuple[bytes, str] | None:
        ext, size = self._exts[index], int(self._sizes[index])
        if (suffixes is not None and ext not in suffixes) or self._labels[index] == _BAD_LABEL:
            return None  # a bad label: the general path's load() names it
        data = self._read(index)
        if len(data) < size:
            raise OSError(f"the shard ends {len(data)} bytes into this {size}-byte member (truncated)")
        return data, ext

    def _read(self, index: int) -> bytes:
        """Sample `index`'s member bytes as the shard holds them (fewer when the shard is truncated)."""
        with open(self.shards[self._shard[index]], "rb") as f:
            f.seek(int(self._offsets[index]))
            return f.read(int(self._sizes[index]))

    def load(self, index: int) -> np.ndarray:
        if self._labels[index] == _BAD_LABEL:
            raise CorruptImageError(index, self.describe(index), "its .cls member is not a class index (>= 0, or -1)")
        try:
            return decode_bytes(self.encoded(index)[0])
        except (OSError, ValueError) as e:
            raise CorruptImageError(index, self.describe(index), str(e)) from None

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self, index: int) -> str:
        return f"{self.shards[self._shard[index]]}:{self._keys[index]}{self._exts[index]}"

    def _record(self, index: int, deep: bool) -> bytes:
        rec = (f"{self.shards[self._shard[index]].name}\t{self._keys[index]}{self._exts[index]}\t"
               f"{self._sizes[index]}\t{self._labels[index]}").encode()
        return rec + (hashlib.sha256(self._read(index)).digest() if deep else b"")

    def fingerprint(self, deep: bool = False) -> dict:
        """As RelaDataset's; the shallow digest is cached beside the shard indexes, keyed on them
        (each on its shard's path, size and mtime), so a warm open does not hash 1.28M records."""
        if deep:
            return super().fingerprint(deep=True)
        key = hashlib.sha256("\n".join(self._cache_keys).encode()).hexdigest()[:24]
        folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
        cached = None if folder is None else folder / f"digest-{key}.json"
        try:
            fp = json.loads(cached.read_text()) if cached is not None else {}
            if fp.get("n") == len(self) and fp.get("kind") == self.kind and isinstance(fp.get("digest"), str):
                return {**fp, **self.info()}
        except (OSError, ValueError):
            pass
        fp = super().fingerprint()
        if cached is not None:
            atomic_write_bytes(cached, json.dumps({k: fp[k] for k in ("kind", "n", "deep", "digest")}).encode(),
                               durable=False)
        return fp

    def info(self) -> dict:
        return {"shards": len(self.shards), "first_shard": str(self.shards[0].resolve())}


def _expand_shards(spec) -> list[Path]:
    """A list of shard paths, or one string with `{000000..000009}` ranges and/or glob patterns."""
    import glob
    import re

    if isinstance(spec, (list, tuple)):
        names = [str(x) for x in spec]
    else:
        names, pending = [], [str(spec)]
        while pending:
            s = pending.pop(0)
            m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
            if m is None:
                names += sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
                continue
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            pending += [s[:m.start()] + f"{i:0{width}d}" + s[m.end():] for i in range(lo, hi + 1)]
    paths = [Path(n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise DatasetError(f"shards not found: {', '.join(missing[:3]) or spec}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return paths


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


@dataclass
class _ShardIndex:
    keys: list[str]
    exts: list[str]  # the image member's lower-case suffix
    offsets: np.ndarray  # int64 data offset of the image member
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64; -1 without a .cls member, _BAD_LABEL for an unreadable one


def _shard_index(shard: Path) -> tuple[_ShardIndex, str | None, str]:
    """Each sample's key, image suffix, data offset, size and label in one shard, why the shard is
    truncated (None when whole), and the cache key; cached as arrays. A truncated shard keeps the
    members it holds: one cut short fails when read (a corrupt sample, skippable), the rest are
    lost and said so."""
    st = shard.stat()
    key = hashlib.sha256(f"v3\t{shard.resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
    cached = None if folder is None else folder / f"{key}.npz"
    try:
        if cached is not None:
            with np.load(cached, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                ix = _ShardIndex(_unjoin(z["keys"]), _unjoin(z["exts"]), z["offsets"], z["sizes"], z["labels"])
            if _index_is_sound(ix, st.st_size):
                return ix, meta["truncated"], key
    except (OSError, ValueError, KeyError):
        pass  # not indexed yet, or an unreadable cache entry: index the shard
    index, truncated = _index_shard(shard, st.st_size)
    ix = _ShardIndex([k for k, *_ in index], [r[1] for r in index], np.array([r[2] for r in index], np.int64),
                     np.array([r[3] for r in index], np.int64), np.array([r[4] for r in index], np.int64))
    buf = io.BytesIO()
    np.savez(buf, keys=_join(ix.keys), exts=_join(ix.exts), offsets=ix.offsets, sizes=ix.sizes, labels=ix.labels,
             meta=np.frombuffer(json.dumps({"truncated": truncated}).encode(), np.uint8))
    if cached is not None:
        atomic_write_bytes(cached, buf.getvalue(), durable=False)
    return ix, truncated, key


def _index_is_sound(ix: _ShardIndex, shard_size: int) -> bool:
    """A cached shard index is used only if it could describe this shard: one entry per sample,
    every member's bytes inside the file, labels a class, -1 or the bad-label mark."""
    n = len(ix.keys)
    if not (len(ix.exts) == len(ix.offsets) == len(ix.sizes) == len(ix.labels) == n):
        return False
    return bool(n == 0 or ((ix.offsets >= 0).all() and (ix.sizes >= 0).all()
                           and (ix.offsets + ix.sizes <= shard_size).all() and (ix.labels >= _BAD_LABEL).all()))


def _join(names: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), np.uint8)


def _unjoin(blob: np.ndarray) -> list[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\0") if blob.size else []


def _index_shard(shard: Path, size: int) -> tuple[list[tuple[str, str, int, int, int]], str | None]:
    """Read the tar headers: (key, image suffix, data offset, size, label) per sample, and why the
    shard is truncated."""
    import tarfile

    with open(shard, "rb") as f:
        if f.read(6).startswith(_COMPRESSED):
            raise DatasetError(f"{shard}: a compressed tar; rela reads members at their offsets, so shards must be "
                               "uncompressed .tar (decompress them with gunzip, zstd -d, ...)")
    members: dict[str, dict] = {}
    plain = _index_plain_tar(shard, size)
    if plain is not None:
        return plain, None
    truncated, end = None, 0
    try:
        with tarfile.open(shard, mode="r:") as tar:
            try:
                for m in tar:
                    end = m.offset_data + -(-m.size // 512) * 512
                    if m.isfile():
                        _index_member(tar, m, members)
            except tarfile.ReadError as e:  # a header cut short
                truncated = f"it ends inside a member header ({e})"
    except (tarfile.TarError, OSError) as e:
        truncated = f"no member is readable ({e})"
    if truncated is None and size < end + 1024:  # no end-of-archive blocks: cut at a member boundary
        truncated = "it ends without tar's end-of-archive marker"
    return [(k, *v["image"], v.get("label", -1)) for k, v in members.items() if "image" in v], truncated


_BAD_LABEL = -2  # a .cls member that is not a class index: the sample fails when read (skippable)


def _index_member(tar, m, members: dict[str, dict]) -> None:
    import tarfile

    def read() -> bytes:
        try:
            return tar.extractfile(m).read()
        except tarfile.TarError as e:  # a member cut short: an unreadable label, as a read error is
            raise OSError(str(e)) from None

    _add_member(members, m.name, m.offset_data, m.size, read)


def _add_member(members: dict[str, dict], path: str, offset: int, size: int, read) -> None:
    """Record one regular member: an image's place, or a .cls member's label (read() its bytes)."""
    stem, dot, ext = path.rpartition("/")[2].partition(".")
    name = path.rpartition("/")[0] + "/" + stem if "/" in path else stem
    entry = members.setdefault(name, {})
    ext = "." + ext.lower()
    if ext in WebDataset.IMAGE_EXTENSIONS and "image" not in entry:
        entry["image"] = (ext, offset, size)
    elif ext == ".cls":
        try:
            data = read()
            label = int(data.decode().strip() or -1) if len(data) == size else _BAD_LABEL
        except (ValueError, UnicodeDecodeError, OSError):
            label = _BAD_LABEL
        entry["label"] = label if label >= -1 else _BAD_LABEL


_PLAIN_TYPES, _ZERO_BLOCK = (b"0", b"\0", b"7"), bytes(512)


def _index_plain_tar(shard: Path, size: int) -> list[tuple[str, str, int, int, int]] | None:
    """The index of a whole shard of plain members (ustar/v7 headers, octal sizes, no long-name
    or pax records, no ustar prefix: what webdataset's writers and `tar` produce for short names),
    read header by header — Python's tarfile builds a TarInfo per member, ~10x slower over 1.28M.
    None for anything else (a truncated shard included): tarfile then indexes it, with its words."""
    members: dict[str, dict] = {}
    with open(shard, "rb", buffering=0) as f:
        pos = 0
        while True:
            f.seek(pos)
            hdr = f.read(512)
            if hdr == _ZERO_BLOCK:
                break
            if len(hdr) < 512 or sum(hdr) - sum(hdr[148:156]) + 256 != _octal(hdr[148:156]):
                return None
            kind = hdr[156:157]
            if kind not in _PLAIN_TYPES and kind != b"5" or hdr[124] & 0x80 or (hdr[257:263] == b"ustar\0" and hdr[345]):
                return None
            length = _octal(hdr[124:136])
            data_at, pos = pos + 512, pos + 512 + -(-length // 512) * 512
            if kind == b"5":
                continue
            name = hdr[:100].split(b"\0", 1)[0].decode(sys.getfilesystemencoding(), "surrogateescape")

            def read(at=data_at, n=length) -> bytes:
                f.seek(at)
                return f.read(n)

            _add_member(members, name, data_at, length, read)
    if size < pos + 1024:  # no end-of-archive blocks, or cut inside a member: tarfile says which
        return None
    return [(k, *v["image"], v.get("label", -1)) for k, v in members.items() if "image" in v]


def _octal(field: bytes) -> int:
    try:
        return int(field.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError:
        return -1


_IMAGE_KEYS, _LABEL_KEYS = ("image", "img", "pixel_values"), ("label", "labels", "target", "class")


class MapDataset(RelaDataset):
    """Any map-style dataset (`__len__` + `__getitem__`: torchvision's, Hugging Face `datasets`'
    with an image column, the user's own class) as a
    rela dataset. An item may be a PIL image, an H×W(×C) uint8 array, a C×H×W uint8 tensor, an
    `(image, label, ...)` tuple or a dict (`image_key=` / `label_key=`, found by name otherwise).

    Fingerprint: the class, the length and a hash of 16 items at fixed, evenly spaced positions
    (their pixels and labels) — cheap, and it catches another dataset, another order of a sorted
    one or changed files among those 16; it cannot see a change elsewhere. `fingerprint=` (e.g. a
    dataset version) replaces that hash: the class, the length and your string are then the identity.

    A dataset whose transform already turns items into float tensors is refused: rela applies the
    views itself. `as_is=True` (what `rela.Loader(views="as-is")` sets) takes such items as they
    are — a tensor, or a list of tensors, one per view — and stacks them into the batch; rela then
    draws no views, and since random views can't be hashed, a store is matched by `fingerprint=`."""

    kind = "map-dataset"
    runs_user_code = True  # the dataset's own __getitem__ (and transform) per sample

    def __init__(self, dataset, image_key: str | None = None, label_key: str | None = None,
                 fingerprint: str | None = None, as_is: bool = False) -> None:
        try:
            n = len(dataset)
        except TypeError:
            raise DatasetError(f"{type(dataset).__name__} has no len(): rela needs a map-style dataset "
                               "(an IterableDataset can't be indexed for subsets and exact resume)") from None
        self.dataset, self.n, self.image_key, self.label_key = dataset, n, image_key, label_key
        self.name, self.user_fingerprint = f"{type(dataset).__module__}.{type(dataset).__qualname__}", fingerprint
        self.kind = f"map-dataset:{self.name}"  # compared when a store is opened: another class is other data
        self.as_is = as_is
        self._last_label: tuple[int, int] | None = None
        if n == 0:
            raise DatasetError(f"{self.name} is empty")
        self._probe()

    def _probe(self) -> None:
        """Read item 0 once, so a dataset rela can't use (one whose transform already made tensors
        or views — or, used as-is, didn't — or whose dict items hold no image) is refused here, in
        the caller's process, not in a worker. A broken item 0 itself is left to on_error, like any
        other sample."""
        try:
            item = self._item(0)
        except CorruptImageError:  # its __getitem__ failed: one bad sample, left to on_error
            return
        try:
            image = self._split(item, 0)[0]
        except CorruptImageError as e:
            if isinstance(item, dict):  # no image key: the layout, not one bad item
                raise DatasetError(f"{self.name}: {e.reason}") from None
            return
        why = _not_views(image) if self.as_is else _made_by_a_transform(image)
        if why:
            raise DatasetError(f"{self.name}: {why}")

    def used_as_is(self) -> MapDataset:
        """The same dataset with its items taken as they are (see the class doc)."""
        return self if self.as_is else MapDataset(self.dataset, self.image_key, self.label_key,
                                                  self.user_fingerprint, as_is=True)

    def __len__(self) -> int:
        return self.n

    def _item(self, index: int):
        try:
            return self.dataset[index]
        except Exception as e:  # the user's __getitem__: name the sample, keep the reason
            raise CorruptImageError(index, self.describe(index), f"{type(e).__name__}: {e}") from None

    def _split(self, item, index: int) -> tuple[object, object]:
        """(image, label) of one item; a label column, when there is one, is the label's source."""
        if isinstance(item, dict):
            key = self.image_key or next((k for k in _IMAGE_KEYS if k in item), None)
            if key is None or key not in item:
                raise self._bad(index, f"the item is a dict with keys {sorted(item)} and no image; pass image_key=")
            lkey = self.label_key or next((k for k in _LABEL_KEYS if k in item), None)
            image, label = item[key], item.get(lkey, -1) if lkey else -1
        elif isinstance(item, (tuple, list)) and item:
            image, label = item[0], item[1] if len(item) > 1 else -1
        else:
            image, label = item, -1
        column = self._label_column()
        return image, self._class_index(column[index] if column is not None else label, index)

    def _bad(self, index: int, reason: str) -> CorruptImageError:
        return CorruptImageError(index, self.describe(index), reason)

    def load(self, index: int) -> np.ndarray:
        """The item's image as uint8 H×W×C; an item rela can't read (None, the wrong shape or dtype,
        zero-sized, a bad label) raises CorruptImageError with its index, so on_error='skip' covers it."""
        if self.as_is:
            raise DatasetError(f"{self.name} is used as-is (its own transform makes the views): rela can't "
                               "decode its items. Convert and evaluate from the dataset without its transform")
        image, label = self._split(self._item(index), index)
        try:
            out = _as_uint8_hwc(image)
        except ValueError as e:
            raise self._bad(index, str(e)) from None
        self._last_label = (index, label)  # label(index) right after: no second __getitem__
        return out

    def item_views(self, index: int) -> tuple[list, int]:
        """As-is: the item's views (its tensor, or its list of tensors) and its label."""
        image, label = self._split(self._item(index), index)
        why = _not_views(image)
        if why:
            raise self._bad(index, why)
        return list(image) if isinstance(image, (list, tuple)) else [image], label

    def _class_index(self, value, index: int) -> int:
        """An integer class index >= 0, or -1 for unlabeled; anything else is a bad sample."""
        try:
            label = operator.index(value)  # ints, numpy ints, one-element integer tensors; not 3.5 or "cat"
        except TypeError:
            raise self._bad(index, f"its label {value!r} is not an integer class index") from None
        if label < -1:
            raise self._bad(index, f"its label {label} is negative (class indices are >= 0; -1 means unlabeled)")
        return label

    def _label_column(self) -> np.ndarray | None:
        """All labels without decoding an image: torchvision's `.targets`, or a Hugging Face
        `datasets` label column (read once)."""
        if not hasattr(self, "_labels"):
            self._labels = None
            targets = getattr(self.dataset, "targets", None)
            columns = getattr(self.dataset, "column_names", None)
            key = self.label_key or next((k for k in _LABEL_KEYS if k in (columns or ())), None)
            if targets is not None and len(targets) == self.n:
                column = np.asarray(targets)
            elif columns is not None and key in columns:
                column = np.asarray(self.dataset[key])
            else:
                return None
            # Integer columns only; anything else (strings, floats) is read per item and refused there.
            self._labels = column.astype(np.int64) if np.issubdtype(column.dtype, np.integer) else None
        return self._labels

    def labels(self) -> np.ndarray:
        column = self._label_column()
        return column.copy() if column is not None else super().labels()

    def label(self, index: int) -> int:
        last = self._last_label  # set by load(index): one read of the item serves both
        if last is not None and last[0] == index:
            return last[1]
        column = self._label_column()
        if column is not None:
            return self._class_index(column[index], index)
        return self._split(self._item(index), index)[1]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _record(self, index: int, deep: bool) -> bytes:
        return self.load(index).tobytes() + self.label(index).to_bytes(8, "little", signed=True)

    def fingerprint(self, deep: bool = False) -> dict:
        h = hashlib.sha256()
        if self.user_fingerprint is not None:
            h.update(b"user:" + str(self.user_fingerprint).encode())
        elif self.as_is:
            raise DatasetError(f"{self.name} is used as-is: its items are random views, so rela can't "
                               "fingerprint them to match a target store. Pass the same fingerprint= (e.g. a "
                               "dataset version) to rela.data.MapDataset when converting and when training")
        else:
            for i in sorted(set(np.linspace(0, self.n - 1, min(16, self.n)).astype(int).tolist())):
                rec = self._record(i, deep)
                h.update(len(rec).to_bytes(8, "little") + rec)
        return {"kind": self.kind, "n": self.n, "deep": deep, "digest": h.hexdigest(), **self.info()}

    def info(self) -> dict:
        return {"name": self.name, "fingerprint": self.user_fingerprint}


# The fast path first (rela decodes and makes the views itself, in C++), the as-is path second
# (the dataset's own transform per item, in Python: measured x0.96 of a plain DataLoader).
_TRANSFORM_ADVICE = ("Fast: give rela.Loader the data without its transform (the folder path, or the dataset made "
                     "without transform=) and the transform as views= (e.g. views=BYOLTransform(...): lightly's and "
                     "torchvision's transforms are translated into rela's views). Slower: keep it and pass "
                     "views='as-is' to train on the items as they are")


def _made_by_a_transform(image) -> str | None:
    """Why an item looks like a transform's output (float tensors, a list of views), or None."""
    if hasattr(image, "dim") and getattr(image, "dtype", None) is not None and image.dtype.is_floating_point:
        return f"items are float tensors — its transform (e.g. ToTensor/Normalize) already ran. {_TRANSFORM_ADVICE}"
    if isinstance(image, (list, tuple)) and image and all(hasattr(v, "size") for v in image):
        return f"items hold a list of {len(image)} images — its transform already makes views. {_TRANSFORM_ADVICE}"
    return None


def _not_views(image) -> str | None:
    """Why an as-is item is not views (a tensor, or a list of tensors, one per view), or None."""
    views = list(image) if isinstance(image, (list, tuple)) else [image]
    if views and all(hasattr(v, "dim") and hasattr(v, "dtype") for v in views):
        return None
    got = type(views[0]).__name__ if views else "an empty list"
    return (f"as-is items must be tensors (or a list of them, one per view), got {got}; without a transform, "
            "let rela make the views (views='rela', 'byol', ...)")


def _as_uint8_hwc(image) -> np.ndarray:
    """A PIL image, uint8 array (H×W, H×W×C) or uint8 tensor (C×H×W) → uint8 H×W×C, C = 1 or 3.
    ValueError with the reason for anything else."""
    if image is None:
        raise ValueError("the item's image is None")
    why = _made_by_a_transform(image)
    if why:
        raise ValueError(why)
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL
        image = image if image.mode in ("L", "RGB") else image.convert("RGB")
        a = np.asarray(image, dtype=np.uint8)
    elif hasattr(image, "numpy") and hasattr(image, "dim"):  # torch tensor: C×H×W
        a = image.numpy()
        a = a.transpose(1, 2, 0) if a.ndim == 3 else a
    else:
        a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"its image is {a.dtype}, not uint8 (PIL images or 0..255 arrays); drop the dataset's "
                         "transform (rela applies the views) or pass views='as-is' to rela.Loader")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot read an image of shape {a.shape}; expected H×W, H×W×C or C×H×W with C in 1, 3, 4")
    if 0 in a.shape:
        raise ValueError(f"the image is empty (shape {a.shape})")
    return a[..., :3] if a.shape[2] == 4 else a


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
