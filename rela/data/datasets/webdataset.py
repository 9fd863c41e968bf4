"""`WebDataset`: tar shards in the WebDataset layout, read by member offset."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from rela.data import folder_scan, object_store
from rela.data.datasets.base import RelaDataset
from rela.data.datasets.decode import decode_bytes
from rela.data.datasets.remote_shards import LocalCopies, Prefetcher, RemoteShard
from rela.data.datasets.tar_index import _BAD_LABEL, IMAGE_EXTENSIONS, shard_index
from rela.data.object_store import ObjectURL, is_remote
from rela.data.store import atomic_write_bytes
from rela.errors import CorruptImageError, DatasetError, RelaWarning


class WebDataset(RelaDataset):
    """WebDataset-layout tar shards (`000000.tar`, ... holding `KEY.jpg` + `KEY.cls`), with the
    random access rela's subsets and exact resume need: each shard's member offsets are indexed
    once (Python's tarfile, uncompressed shards) and cached under $RELA_CACHE/wds by the shard's
    path, size and modification time. Order: shards in the given order, samples in tar order.
    JPEG members reach the C++ crop-while-decoding path through `encoded()`."""

    kind = "webdataset"
    IMAGE_EXTENSIONS = IMAGE_EXTENSIONS

    @classmethod
    def claims(cls, spec) -> bool:
        """A list of shards, a `.tar` path or glob, a brace range (`shards/{000000..000009}.tar`),
        or any `s3://` URL (a prefix means every .tar under it)."""
        s = str(spec)
        return isinstance(spec, (list, tuple)) or s.endswith(".tar") or (".tar" in s and "{" in s) or is_remote(s)

    def __init__(self, shards) -> None:
        self.shards = _expand_shards(shards)
        self._prefetch = Prefetcher()
        parts, self._cache_keys = [], []
        for k, (shard, (index, truncated, cache_key)) in enumerate(zip(self.shards, _indexes(self.shards),
                                                                       strict=True)):
            parts.append((k, index))
            self._cache_keys.append(cache_key)
            if truncated:
                warnings.warn(f"{shard} is truncated: {truncated}. Its {len(index.keys)} indexed samples are used (one "
                              "cut short fails when read, like a corrupt image) and the rest of it is lost; re-create "
                              "the shard", RelaWarning, stacklevel=2)
        remote = [s for s in self.shards if isinstance(s, RemoteShard)]
        copies = LocalCopies.for_shards(remote)
        for shard in remote:
            shard.copies = copies
        # one flat column per field: 1.28M tuples cost seconds to build and hundreds of MB to hold
        self._shard = np.concatenate([np.full(len(ix.keys), k, np.int32) for k, ix in parts])
        self._keys = [key for _, ix in parts for key in ix.keys]
        self._exts = [ext for _, ix in parts for ext in ix.exts]
        self._offsets = np.concatenate([ix.offsets for _, ix in parts])
        self._sizes = np.concatenate([ix.sizes for _, ix in parts])
        self._labels = np.concatenate([ix.labels for _, ix in parts])
        if not self._keys:
            raise DatasetError(
                f"no images in {len(self.shards)} shard(s) (looked for KEY{{{','.join(self.IMAGE_EXTENSIONS)}}})"
            )

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
        shard = self.shards[self._shard[index]]
        if isinstance(shard, RemoteShard):
            data = self._prefetch.take(index)
            return data if data is not None else shard.read(int(self._offsets[index]), int(self._sizes[index]))
        with open(shard, "rb") as f:
            f.seek(int(self._offsets[index]))
            return f.read(int(self._sizes[index]))

    def load(self, index: int) -> np.ndarray:
        if self._labels[index] == _BAD_LABEL:
            raise CorruptImageError(index, self.describe(index), "its .cls member is not a class index (>= 0, or -1)")
        try:
            return decode_bytes(self.encoded(index)[0])
        except (OSError, ValueError) as e:
            raise CorruptImageError(index, self.describe(index), str(e)) from None

    def fetched(self, indices):
        """Remote shards: the members of `indices` read concurrently for the block (see
        `RemoteShard`); local shards are read when decoded."""
        reads = {int(i): (shard, int(self._offsets[i]), int(self._sizes[i])) for i in indices
                 if isinstance(shard := self.shards[self._shard[i]], RemoteShard) and shard.local_copy() is None}
        return self._prefetch.fetched(reads)

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
        first = self.shards[0]
        return {"shards": len(self.shards), "first_shard": str(first if isinstance(first, RemoteShard)
                                                                  else first.resolve())}


def _indexes(shards: list) -> list:
    """Each shard's (index, truncated, cache key), in order; remote ones asked for 16 at a time (a
    cold open is a HEAD and a GET per shard: in turn, 1,000 shards would take a minute)."""
    if not any(isinstance(s, RemoteShard) for s in shards):  # _expand_shards gives all local or all remote
        return [shard_index(s) for s in shards]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(RemoteShard.index, shards))


def _expand_shards(spec) -> list[Path | RemoteShard]:
    """A list of shard paths or URLs, or one string with `{000000..000009}` ranges and/or glob
    patterns; an `s3://` prefix with neither means every `.tar` under it."""
    if isinstance(spec, (list, tuple)):
        names = [str(x) for x in spec]
    else:
        names, pending = [], [str(spec)]
        while pending:
            s = pending.pop(0)
            m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
            if m is None:
                names += _glob(s) if any(c in s for c in "*?[") or (is_remote(s) and not s.endswith(".tar")) else [s]
                continue
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            pending += [s[:m.start()] + f"{i:0{width}d}" + s[m.end():] for i in range(lo, hi + 1)]
    if names and all(is_remote(n) for n in names):
        return [RemoteShard(n) for n in names]  # each is asked for (HEAD) only when its index is not cached
    if any(is_remote(n) for n in names):
        raise DatasetError(f"{spec}: mixes s3:// shards with local ones; give one or the other")
    paths = [Path(n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise DatasetError(f"shards not found: {', '.join(missing[:3]) or spec}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return paths


def _glob(pattern: str) -> list[str]:
    """Local files or S3 objects matching a glob (an S3 prefix alone: its .tar objects)."""
    import fnmatch
    import glob

    if not is_remote(pattern):
        return sorted(glob.glob(pattern))
    if not any(c in pattern for c in "*?["):
        pattern = pattern.rstrip("/") + "/*.tar"
    url = ObjectURL.parse(pattern)
    prefix = re.split(r"[*?\[]", url.key, maxsplit=1)[0]
    keys = object_store.list_keys(ObjectURL(url.bucket, prefix))
    found = [f"s3://{url.bucket}/{k}" for k in keys if fnmatch.fnmatchcase(k, url.key)]
    if not found:
        raise DatasetError(f"no objects match {pattern} at {object_store.endpoint()}")
    return found
