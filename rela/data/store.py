"""The target store: one whitened target vector per dataset sample, on disk.

Layout of a store directory::

    manifest.json     written last, atomically; a store without it is not a store
    targets.npy       float16 [N, d], row i = sample i, read through a memory map
    pca.safetensors   mean [D], components [d, D], scale [d], eigenvalues [d] (float32)
    .convert/         only while a conversion runs (raw feature chunks + journal)

Readers memory-map `targets.npy`, so they need RAM only for the rows they ask for. Opening a
store against a dataset compares fingerprints and refuses a store made from other data.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rela.errors import StoreError, StoreMismatchError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = "targets.npy"
PCA = "pca.safetensors"
WORKDIR = ".convert"
TARGET_DTYPE = np.float16
# Fingerprint fields that must agree; the others (root path, name) are informational.
IDENTITY_FIELDS = ("kind", "n", "digest", "split", "limit", "shape", "classes")


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write-to-temp, fsync, rename: readers see the old file or the new one, never a torn one.
    The temp name is per process, so processes writing the same file (ranks filling one cache)
    never write into each other's. `durable=False` skips the fsyncs: for caches, which are
    checked when read and rebuilt when lost."""
    atomic_write(path, lambda f: f.write(data), durable)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """`write(file)` into a per-process temp file beside `path` (created exclusively, never
    through a planted link), fsynced and renamed over `path`, then the folder fsynced: what the
    store, checkpoints and exports are written with."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a temp file this pid left behind when it was killed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except OSError as e:  # a full disk, say: leave no torn temp file behind, and say which file
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # its folder is gone or is a file: there is no temp file to remove
        e.filename = e.filename or str(path)
        raise
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint_differences(stored: dict, actual: dict) -> list[str]:
    """Human-readable list of identity fields that differ between two dataset fingerprints."""
    diffs = []
    for key in IDENTITY_FIELDS:
        if key == "digest" and stored.get("deep") != actual.get("deep"):
            continue  # a deep and a shallow digest can't be compared; n/kind still are
        a, b = stored.get(key), actual.get(key)
        if a != b:
            diffs.append(f"{key}: store has {a!r}, dataset has {b!r}")
    return diffs


class TargetWriter:
    """Writes float16 rows into `targets.npy` at their row offsets with plain file writes.

    `create=True` writes the .npy header and sizes the file once; then one writer per rank
    (`create=False`) fills its own disjoint row ranges, so a sharded conversion writes the same
    bytes as a single process. A writable memory map would keep every written page in this
    process's RSS; plain writes keep memory bounded by one chunk. Rows with NaN/inf are refused.
    """

    def __init__(self, path: Path, n: int, dim: int, *, create: bool = True) -> None:
        self.path, self.n, self.dim = Path(path), n, dim
        self.offset = len(self._header(n, dim))
        self.row_bytes = dim * np.dtype(TARGET_DTYPE).itemsize
        if create:
            self.create(path, n, dim)
        self.f = open(self.path, "r+b")
        self.next = 0  # where a write without `start` goes
        self.rows = 0  # rows this writer wrote

    @staticmethod
    def _header(n: int, dim: int) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(TARGET_DTYPE)),
                                                   "fortran_order": False, "shape": (n, dim)})
        return buf.getvalue()

    @classmethod
    def create(cls, path: Path, n: int, dim: int) -> None:
        """Write the header and size the file to hold all n rows (once, before any writer)."""
        header = cls._header(n, dim)
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + n * dim * np.dtype(TARGET_DTYPE).itemsize)

    def write(self, rows: np.ndarray, start: int | None = None) -> None:
        rows = np.asarray(rows)
        start = self.next if start is None else int(start)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise StoreError(f"target rows must be [*, {self.dim}], got {rows.shape}")
        if start < 0 or start + len(rows) > self.n:
            raise StoreError(f"more than {self.n} target rows written")
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0]) + start
            raise StoreError(f"target row {i} contains NaN or inf; refusing to write it to {self.path}")
        with np.errstate(over="ignore"):
            half = rows.astype(TARGET_DTYPE)
        if not np.isfinite(half).all():
            i = int(np.flatnonzero(~np.isfinite(half).all(axis=1))[0]) + start
            raise StoreError(f"target row {i} overflows float16; the targets were not standardised")
        try:
            self.f.seek(self.offset + start * self.row_bytes)
            self.f.write(np.ascontiguousarray(half).tobytes())
        except OSError as e:  # a full disk: say which file
            e.filename = e.filename or str(self.path)
            raise
        self.next = start + len(rows)
        self.rows += len(rows)

    def close(self, expect_rows: int | None = None) -> None:
        """Flush and fsync; `expect_rows` (default: all n) is what this writer had to write."""
        expect = self.n if expect_rows is None else expect_rows
        if self.rows != expect:
            self.f.close()
            raise StoreError(f"{self.path}: wrote {self.rows} of {expect} rows")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _skipped_indices(path: Path, listed, n: int) -> np.ndarray:
    """The manifest's `skipped` list as sample indices, refused unless each is an integer in
    [0, n): a -1 would silently drop the last sample, a 1000 in a 100-sample store fail later."""
    if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise StoreError(f"{path}: manifest 'skipped' must be a list of sample indices; the store is corrupt, "
                         "convert again with --overwrite")
    bad = [i for i in listed if not 0 <= i < n]
    if bad:
        raise StoreError(f"{path}: manifest 'skipped' lists {bad[:3]}, outside the store's {n} samples [0, {n}); "
                         "the store is corrupt, convert again with --overwrite")
    return np.asarray(listed, dtype=np.int64)


class TargetStore:
    """A finished store, opened read-only. `store[idx]` gives float32 rows."""

    def __init__(self, path: Path, manifest: dict, targets: np.ndarray) -> None:
        self.path = path
        self.manifest = manifest
        self.targets = targets  # read-only float16 memmap [N, d]
        self.skipped = _skipped_indices(path, manifest.get("skipped", []), len(targets))
        self._pca: dict | None = None

    @classmethod
    def open(cls, path: str | Path, dataset=None, deep: bool = False) -> TargetStore:
        """Open a store; with `dataset`, refuse it unless it was made from that dataset."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"target store {path} does not exist; create it with `rela convert --out {path}`")
        mpath = path / MANIFEST
        if not mpath.exists():
            if (path / WORKDIR).exists():
                raise StoreError(
                    f"{path} is an unfinished conversion (no manifest yet); rerun the same "
                    "`rela convert ... --out` command to resume it"
                )
            raise StoreError(f"{path} is not a target store (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{mpath} is unreadable ({e}); recreate the store") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema {version}, this rela reads schema {SCHEMA_VERSION}")
        try:
            targets = np.load(path / TARGETS, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{path / TARGETS} is unreadable ({e}); recreate the store") from None
        n, d = manifest["n"], manifest["dim"]
        if targets.shape != (n, d) or targets.dtype != TARGET_DTYPE:
            raise StoreError(
                f"{path / TARGETS} has shape {targets.shape} {targets.dtype}, manifest says "
                f"({n}, {d}) float16; the store is corrupt, recreate it"
            )
        store = cls(path, manifest, targets)
        store._check_finite()
        if dataset is not None:
            store.check_dataset(dataset, deep=deep)
        return store

    def _check_finite(self, chunk_rows: int = 65536) -> None:
        """Refuse NaN/inf targets: they would reach the batches silently. `rela convert` writes only
        finite rows and records the file's size and mtime; a file still as written is not read
        again, a changed (or unrecorded) one is scanned — one streamed pass, ~1 s per GB."""
        st = (self.path / TARGETS).stat()
        if self.manifest.get("targets_file") == {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return
        for start in range(0, len(self), chunk_rows):
            bad = ~np.isfinite(self.targets[start:start + chunk_rows]).all(axis=1)
            if bad.any():
                rows = int(bad.sum())
                raise StoreError(f"{self.path / TARGETS} holds NaN or inf values (first in row "
                                 f"{start + int(np.flatnonzero(bad)[0])}; {rows}+ rows): the file was changed after "
                                 "conversion. Recreate the store (rela convert ... --overwrite)")

    def check_dataset(self, dataset, deep: bool = False) -> None:
        stored = self.manifest["dataset"]
        actual = dataset.fingerprint(deep=deep and stored.get("deep", False))
        diffs = fingerprint_differences(stored, actual)
        if diffs:
            raise StoreMismatchError(
                f"target store {self.path} was made from a different dataset — "
                + "; ".join(diffs)
                + ". Its rows would not line up with your samples: convert this dataset "
                "into a new store (`rela convert`)."
            )

    def __len__(self) -> int:
        return self.targets.shape[0]

    @property
    def dim(self) -> int:
        return self.targets.shape[1]

    def valid_mask(self) -> np.ndarray:
        """True for samples that have a target (i.e. were not skipped at conversion)."""
        mask = np.ones(len(self), dtype=bool)
        mask[self.skipped] = False
        return mask

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows as float32 copies; only the rows asked for are read."""
        return np.asarray(self.targets[index], dtype=np.float32)

    def pca(self) -> dict[str, np.ndarray]:
        if self._pca is None:
            from safetensors.numpy import load_file

            self._pca = load_file(str(self.path / PCA))
        return self._pca

    def transform(self, raw_features: np.ndarray) -> np.ndarray:
        """Whiten new prior features with this store's PCA (e.g. for held-out images)."""
        p = self.pca()
        return ((np.asarray(raw_features, np.float32) - p["mean"]) @ p["components"].T) / p["scale"]

    def stats(self, chunk_rows: int = 65536) -> dict:
        """Per-component mean/std over valid rows and NaN/inf counts, streamed in chunks."""
        valid = self.valid_mask()
        s = np.zeros(self.dim)
        ss = np.zeros(self.dim)
        nan = inf = 0
        count = 0
        for start in range(0, len(self), chunk_rows):
            block = np.asarray(self.targets[start:start + chunk_rows], dtype=np.float64)
            block = block[valid[start:start + chunk_rows]]
            nan += int(np.isnan(block).sum())
            inf += int(np.isinf(block).sum())
            block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
            s += block.sum(axis=0)
            ss += (block * block).sum(axis=0)
            count += len(block)
        mean = s / max(count, 1)
        std = np.sqrt(np.maximum(ss / max(count, 1) - mean * mean, 0.0))
        return {"rows": count, "mean": mean, "std": std, "nan": nan, "inf": inf}

    def summary(self) -> str:
        """The manifest and target statistics as the few lines `rela convert` and `rela info` print."""
        m = self.manifest
        st = self.stats()
        cost = m.get("cost", {})
        lines = [
            f"store      {self.path}",
            f"dataset    {m['dataset'].get('kind')} n={m['n']} digest={m['dataset']['digest'][:16]}",
            f"prior      {m['prior'].get('name')} ({m['prior'].get('arch')}) "
            f"sha256={m['prior'].get('weights_sha256', '')[:16]}",
            f"input      {m['preprocessing']['input_size']} px, "
            f"mean={m['preprocessing']['mean']} std={m['preprocessing']['std']}",
            f"targets    [{m['n']}, {m['dim']}] float16 from {m['raw_dim']}-d features, "
            f"explained variance {m['whitening']['explained_variance_ratio']:.3f}",
            f"skipped    {len(m['skipped'])}",
            f"stats      component mean in [{st['mean'].min():+.4f}, {st['mean'].max():+.4f}], "
            f"std in [{st['std'].min():.4f}, {st['std'].max():.4f}], NaN {st['nan']}, inf {st['inf']}",
            f"cost       {cost.get('seconds')} s ({cost.get('images_per_second')} img/s extraction"
            + (
                f"; {cost['processes']} processes, {cost['process_seconds']} process-s"
                if cost.get("processes", 1) > 1
                else ""
            )
            + (f"; prior on {cost['device']}" if "device" in cost else "")
            + ")",
            f"created    {m['created']} by rela {m['library']['version']}",
        ]
        return "\n".join(lines)
