"""WebDataset shards in S3-compatible object storage, read by member byte range.

A remote shard is read as a local one is: by its member index (each member's offset and size), so a
sample-level shuffle needs no shuffle buffer and a mid-epoch resume needs no replay. The index is:

1. cached locally by (URL, ETag) under $RELA_CACHE/wds, with the URL's last-seen ETag beside it, so
   a warm open sends no request at all; every member read carries `If-Match: <ETag>`, so a shard
   replaced since it was indexed fails loudly (and is re-indexed at the next open) rather than
   returning another file's bytes;
2. else the index `rela pack` writes beside each shard (`000000.tar.index`: one small GET);
3. else the shard itself, downloaded once to a temporary file and indexed as a local one is.

`fetched(indices)` reads a batch's members concurrently (threads over one client's connection pool)
before its samples decode: with one request per member, requests in flight are what keeps a
decode thread busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rela.data import folder_scan, object_store
from rela.data.datasets.tar_index import _index_is_sound, _index_shard, _ShardIndex, index_from_bytes, index_to_bytes
from rela.data.object_store import ObjectStoreError, ObjectURL
from rela.data.store import atomic_write_bytes

INDEX_SUFFIX = ".index"  # rela pack's member index beside each shard: 000000.tar.index
FETCH_THREADS = int(os.environ.get("RELA_S3_FETCH_THREADS", 32))  # member reads in flight per process


class RemoteShard:
    """One shard object: its URL, the ETag its index describes, and reads pinned to that ETag."""

    def __init__(self, url: str) -> None:
        self.url = ObjectURL.parse(url)
        self.name = self.url.name
        self.etag = ""

    def __str__(self) -> str:
        return str(self.url)

    def index(self) -> tuple[_ShardIndex, str | None, str]:
        """(index, why truncated or None, cache key), from the cheapest source that has it."""
        folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
        seen = None if folder is None else folder / f"remote-{_digest(str(self.url))}.json"
        try:
            self.etag = json.loads(seen.read_text())["etag"]
            return (*self._cached(folder), self._key())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not seen yet, or its cached index is gone: ask the store
        head = object_store.head(self.url)
        self.etag = head.etag
        found = self._cached(folder) if folder is not None else None
        if found is None:
            found = self._beside(head.size) or self._download(head.size)
            if folder is not None:
                atomic_write_bytes(folder / f"{self._key()}.npz", index_to_bytes(*found), durable=False)
        if seen is not None:
            atomic_write_bytes(seen, json.dumps({"etag": self.etag, "size": head.size}).encode(), durable=False)
        return (*found, self._key())

    def read(self, offset: int, size: int) -> bytes:
        try:
            return object_store.read(self.url, offset, size, self.etag)
        except ObjectStoreError:
            self.forget()  # changed or deleted: the next open asks the store again
            raise

    def forget(self) -> None:
        folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
        if folder is not None:
            with contextlib.suppress(OSError):
                (folder / f"remote-{_digest(str(self.url))}.json").unlink()

    def _key(self) -> str:
        return "remote-" + _digest(f"v1\t{self.url}\t{self.etag}")

    def _cached(self, folder: Path | None) -> tuple[_ShardIndex, str | None] | None:
        if folder is None:
            return None
        try:
            return index_from_bytes((folder / f"{self._key()}.npz").read_bytes())
        except (OSError, ValueError, KeyError):
            return None

    def _beside(self, size: int) -> tuple[_ShardIndex, str | None] | None:
        """The index `rela pack` wrote beside the shard, if it describes this very shard: by the
        MD5 it records where the ETag is one (a single-part upload), else by the tar headers of its
        first and last members, read back (a replaced shard with a stale index beside it is
        re-indexed, not misread)."""
        try:
            ix, truncated = index_from_bytes(object_store.read(self.url.sibling(self.name + INDEX_SUFFIX)))
        except object_store.ObjectNotFound:
            return None
        except (ValueError, KeyError):
            return None  # not an index rela wrote: index the shard itself
        if not _index_is_sound(ix, size) or ix.shard_bytes not in (None, size):
            return None
        md5 = self.etag.strip('"')
        if ix.shard_md5 and len(md5) == 32 and "-" not in md5:
            return (ix, truncated) if md5 == ix.shard_md5 else None
        return (ix, truncated) if self._headers_match(ix) else None

    def _headers_match(self, ix: _ShardIndex) -> bool:
        """Whether the first and last indexed members' tar headers name what the index says."""
        for k in {0, len(ix.keys) - 1} if ix.keys else ():
            start = int(ix.offsets[k]) - 512
            header = object_store.read(self.url, start, 512, self.etag) if start >= 0 else b""
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if name.rpartition(".")[0] != ix.keys[k] or "." + name.rpartition(".")[2].lower() != ix.exts[k]:
                return False
        return True

    def _download(self, size: int) -> tuple[_ShardIndex, str | None]:
        """Index the shard itself: once, from a temporary local copy."""
        with tempfile.TemporaryDirectory(prefix="rela-shard-") as tmp:
            path = Path(tmp) / self.name
            object_store.download(self.url, path, self.etag)
            index, truncated = _index_shard(path, size)
        return index, truncated


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Prefetcher:
    """A batch's remote members read concurrently, held per building thread until its samples
    have read them (a sample read outside a batch, or walked to by `on_error="skip"`, reads alone)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        with self._lock:
            if pid not in self._pools:
                self._pools.clear()  # a forked worker: the parent's threads did not come along
                self._pools[pid] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rela-s3")
            return self._pools[pid]

    @contextlib.contextmanager
    def fetched(self, reads: dict[int, tuple[RemoteShard, int, int]]):
        """`reads`: sample index → (shard, offset, size). Within the block, `take(i)` returns the
        bytes already read (or raises what reading them raised)."""
        pool = self._pool()
        futures = {i: pool.submit(shard.read, offset, size) for i, (shard, offset, size) in reads.items()}
        self._local.held = futures
        try:
            yield
        finally:
            self._local.held = {}
            for f in futures.values():
                f.cancel()

    def take(self, index: int):
        """The prefetched bytes of sample `index`, or None when it was not prefetched."""
        future = getattr(self._local, "held", {}).pop(index, None)
        return None if future is None else future.result()

    def __getstate__(self) -> dict:  # pickled into worker processes: pools and held reads stay behind
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
