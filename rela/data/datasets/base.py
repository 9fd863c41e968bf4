"""The dataset protocol: a stable index order, a cheap fingerprint, `head(n)`.

Row i of a target store belongs to sample i, so a dataset's order must never depend on the
file system's listing order, and a store must be able to tell whether it was made from this
very dataset. Every dataset therefore has a sorted, deterministic order and a `fingerprint()`
over each sample's identity (name, size, label — contents only with `deep`). Samples decode to
uint8 HWC numpy arrays (C = 1 or 3) so every backend and prior can share them.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from rela.errors import CorruptImageError, DatasetError

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
    # Every label, in index order (int64; -1 for none), for the datasets that know them up front:
    # `label` and `labels` read it. A dataset that reads labels lazily overrides both.
    _labels: np.ndarray | None = None

    @classmethod
    def claims(cls, spec) -> bool:
        """Whether `open_dataset(spec)` opens `spec` as this format (`rela.registry.DATASETS` asks
        each format in turn); a RelaDataset object is taken as it is."""
        return isinstance(spec, RelaDataset)

    @classmethod
    def from_spec(cls, spec) -> RelaDataset:
        """The dataset `spec` names, once this format claimed it."""
        return spec if isinstance(spec, RelaDataset) else cls(spec)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Decode sample `index` to a uint8 H×W×C array (C = 1 or 3); CorruptImageError if it can't."""

    def label(self, index: int) -> int:
        return int(self._labels[index])

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

    def fetched(self, indices) -> contextlib.AbstractContextManager:
        """A block within which the samples `indices` read fast: a remote dataset reads them
        concurrently ahead (one batch's worth); a local one needs nothing."""
        return contextlib.nullcontext()

    @abstractmethod
    def _record(self, index: int, deep: bool) -> bytes:
        """The bytes that identify sample `index` in the fingerprint."""

    def info(self) -> dict:
        """Descriptive fields stored beside the fingerprint (not compared)."""
        return {}

    def labels(self) -> np.ndarray:
        if self._labels is not None:
            return self._labels.copy()
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
        return self._fingerprint(h.hexdigest(), deep)

    def _fingerprint(self, digest: str, deep: bool) -> dict:
        """The fingerprint dict from a digest: what a store compares (kind, n, deep, digest) and the
        descriptive `info()` beside it. Every dataset builds it here."""
        return {"kind": self.kind, "n": len(self), "deep": deep, "digest": digest, **self.info()}

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

    def encoded(self, index: int, suffixes: tuple[str, ...] | None = None) -> tuple[bytes, str] | None:
        return self.base.encoded(self._check(index), suffixes)

    def fetched(self, indices) -> contextlib.AbstractContextManager:
        return self.base.fetched([self._check(int(i)) for i in indices])

    def _record(self, index: int, deep: bool) -> bytes:
        return self.base._record(index, deep)

    def info(self) -> dict:
        return {**self.base.info(), "limit": self.n}
