"""Tar shard indexes: each member's name, offset and size, read once and cached beside the shard."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rela.data import folder_scan
from rela.data.store import atomic_write_bytes
from rela.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".ppm", ".bmp")  # the members a sample's image may be
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


@dataclass
class _ShardIndex:
    keys: list[str]
    exts: list[str]  # the image member's lower-case suffix
    offsets: np.ndarray  # int64 data offset of the image member
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64; -1 without a .cls member, _BAD_LABEL for an unreadable one
    shard_bytes: int | None = None  # the size of the shard it describes, where known
    shard_md5: str | None = None  # its MD5 (an S3 ETag of a single-part upload), where known


def index_to_bytes(ix: _ShardIndex, truncated: str | None) -> bytes:
    """An index as rela stores it (an .npz of flat arrays, no pickles): the local cache's entries
    and the `.index` objects `rela pack` writes beside its shards."""
    buf = io.BytesIO()
    meta = {"truncated": truncated, "shard_bytes": ix.shard_bytes, "shard_md5": ix.shard_md5}
    np.savez(buf, keys=_join(ix.keys), exts=_join(ix.exts), offsets=ix.offsets, sizes=ix.sizes, labels=ix.labels,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return buf.getvalue()


def index_from_bytes(data: bytes) -> tuple[_ShardIndex, str | None]:
    """`index_to_bytes`'s inverse; ValueError / KeyError for anything else."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        ix = _ShardIndex(_unjoin(z["keys"]), _unjoin(z["exts"]), z["offsets"], z["sizes"], z["labels"],
                         meta.get("shard_bytes"), meta.get("shard_md5"))
    return ix, meta["truncated"]


def shard_index(shard: Path) -> tuple[_ShardIndex, str | None, str]:
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
            ix, truncated = index_from_bytes(cached.read_bytes())
            if _index_is_sound(ix, st.st_size):
                return ix, truncated, key
    except (OSError, ValueError, KeyError):
        pass  # not indexed yet, or an unreadable cache entry: index the shard
    ix, truncated = _index_shard(shard, st.st_size)
    if cached is not None:
        atomic_write_bytes(cached, index_to_bytes(ix, truncated), durable=False)
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


def _index_shard(shard: Path, size: int) -> tuple[_ShardIndex, str | None]:
    """Read the tar headers of a local shard: its index, and why it is truncated (None: whole)."""
    rows, truncated = _read_headers(shard, size)
    ix = _ShardIndex([r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows], np.int64),
                     np.array([r[3] for r in rows], np.int64), np.array([r[4] for r in rows], np.int64), size)
    return ix, truncated


def _read_headers(shard: Path, size: int) -> tuple[list[tuple[str, str, int, int, int]], str | None]:
    """(key, image suffix, data offset, size, label) per sample, and why the shard is truncated."""
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
    if ext in IMAGE_EXTENSIONS and "image" not in entry:
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
            if (
                kind not in _PLAIN_TYPES
                and kind != b"5"
                or hdr[124] & 0x80
                or (hdr[257:263] == b"ustar\0" and hdr[345])
            ):
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
