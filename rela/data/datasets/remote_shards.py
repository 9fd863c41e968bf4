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
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rela.data import folder_scan, object_store
from rela.data.datasets.tar_index import _index_is_sound, _index_shard, _ShardIndex, index_from_bytes, index_to_bytes
from rela.data.object_store import ObjectStoreError, ObjectURL, PerProcess
from rela.data.store import atomic_write_bytes

INDEX_SUFFIX = ".index"  # rela pack's member index beside each shard: 000000.tar.index
FETCH_THREADS = int(os.environ.get("RELA_S3_FETCH_THREADS", 32))  # member reads in flight per process


class RemoteShard:
    """One shard object: its URL, the ETag its index describes, and reads pinned to that ETag."""

    def __init__(self, url: str) -> None:
        self.url = ObjectURL.parse(url)
        self.name = self.url.name
        self.etag, self.size = "", 0
        self.copies: LocalCopies | None = None  # whole-shard copies on local disk, when the data fits
        self._local: Path | None = None
        self.where = f"{object_store.endpoint()} {self.url}"  # what the local caches key on (with the ETag)

    def __str__(self) -> str:
        return str(self.url)

    def index(self) -> tuple[_ShardIndex, str | None, str]:
        """(index, why truncated or None, cache key), from the cheapest source that has it."""
        folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
        seen = None if folder is None else folder / f"remote-{_digest(self.where)}.json"
        if seen is not None:
            try:
                known = json.loads(seen.read_text())
                self.etag, self.size = known["etag"], int(known["size"])
                if (found := self._cached(folder)) is not None:
                    return (*found, self._key())
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not seen yet: ask the store
        head = object_store.head(self.url)
        self.etag, self.size = head.etag, head.size
        found = self._cached(folder) if folder is not None else None
        if found is None:
            found = self._beside(head.size) or self._download(head.size)
            if folder is not None:
                atomic_write_bytes(folder / f"{self._key()}.npz", index_to_bytes(*found), durable=False)
        if seen is not None:
            atomic_write_bytes(seen, json.dumps({"etag": self.etag, "size": head.size}).encode(), durable=False)
        return (*found, self._key())

    def local_copy(self) -> Path | None:
        """The shard's complete local copy, once there is one (remembered: no stat per member)."""
        if self._local is None and self.copies is not None:
            self._local = self.copies.get(self)
        return self._local

    def read(self, offset: int, size: int) -> bytes:
        """A member's bytes: from the local copy once it is there, else by a ranged GET."""
        local = self.local_copy()
        if local is not None:
            with open(local, "rb") as f:
                f.seek(offset)
                return f.read(size)
        try:
            return object_store.read(self.url, offset, size, self.etag)
        except ObjectStoreError:
            self.forget()  # changed or deleted: the next open asks the store again
            raise

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_local": None}

    def forget(self) -> None:
        folder = folder_scan.cache_dir("wds", "WebDataset shard indexes")
        if folder is not None:
            with contextlib.suppress(OSError):
                (folder / f"remote-{_digest(self.where)}.json").unlink()

    def _key(self) -> str:
        return "remote-" + _digest(f"v1\t{self.where}\t{self.etag}")

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


class LocalCopies:
    """Whole shards copied to local disk in the background, one GET each, the first time a member
    of theirs is read; until a copy lands its members are read by range. Ranged GETs cost the
    client ~1.8 ms of CPU each through boto3 (bench/remote.py), a whole-shard GET next to nothing
    per member: the copies are what lets an epoch from S3 run at local speed with the same
    sample-level shuffle. Used when the shards fit the budget (`budget_bytes`); kept under
    $RELA_CACHE/s3 by (URL, ETag), so the next run starts local. Processes share the copies
    (a lock file per shard: one copies, the others read by range meanwhile)."""

    STALE_LOCK_S = 600  # a lock older than this is a killed copier's: taken over

    def __init__(self, folder: Path, threads: int = 4) -> None:
        self.folder, self.threads = folder, threads
        self._started: set[str] = set()
        self._lock = threading.Lock()
        self._pool = PerProcess(lambda: ThreadPoolExecutor(threads, thread_name_prefix="rela-s3-copy"))

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["threads"])

    def path(self, shard: RemoteShard) -> Path:
        return self.folder / (_digest(f"{shard.where} {shard.etag}") + ".tar")

    def get(self, shard: RemoteShard) -> Path | None:
        """The local copy if it is complete; else None, and its copy started (once)."""
        path = self.path(shard)
        if path.exists():
            return path
        with self._lock:
            if path.name in self._started:
                return None
            self._started.add(path.name)
        self._pool.get().submit(self._copy, shard, path)
        return None

    def _copy(self, shard: RemoteShard, path: Path) -> None:
        lock = path.with_suffix(".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime < self.STALE_LOCK_S:
                    return  # another process copies it
                lock.unlink()
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except OSError:
                return
        os.close(fd)
        part = path.with_suffix(f".part{os.getpid()}")
        try:
            object_store.download(shard.url, part, shard.etag)
            if part.stat().st_size == shard.size:
                os.replace(part, path)
        except (ObjectStoreError, OSError):
            pass  # the ranged reads go on, and say what is wrong if anything is
        finally:
            with contextlib.suppress(OSError):
                part.unlink()
            with contextlib.suppress(OSError):
                lock.unlink()
            with self._lock:
                if not path.exists():
                    self._started.discard(path.name)  # a later read tries again

    @staticmethod
    def budget_bytes() -> int:
        """How much of the local disk the copies may take: RELA_S3_CACHE_GB (0: no copies, read
        every member by range), else half the free space where they go."""
        given = os.environ.get("RELA_S3_CACHE_GB")
        if given is not None:
            return int(float(given) * 2**30)
        folder = folder_scan.cache_root()
        try:
            return shutil.disk_usage(folder if folder.exists() else folder.parent).free // 2
        except OSError:
            return 0

    @classmethod
    def for_shards(cls, shards: list[RemoteShard]) -> LocalCopies | None:
        """Copies for these shards if they fit the budget (and the cache folder is usable)."""
        total = sum(s.size for s in shards)
        if not shards or total > cls.budget_bytes():
            return None
        folder = folder_scan.cache_dir("s3", "local copies of S3 shards")
        return None if folder is None else cls(folder)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Prefetcher:
    """A batch's remote members read concurrently, held per building thread until its samples
    have read them (a sample read outside a batch, or walked to by `on_error="skip"`, reads alone)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._pool = PerProcess(lambda: ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rela-s3"))

    @contextlib.contextmanager
    def fetched(self, reads: dict[int, tuple[RemoteShard, int, int]]):
        """`reads`: sample index → (shard, offset, size). Within the block, `take(i)` returns the
        bytes already read (or raises what reading them raised)."""
        pool = self._pool.get()
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
