"""`rela pack`: a dataset written as WebDataset tar shards, resumably.

Sample i becomes `KEY.jpg`, plus `KEY.cls` (its class index) when it has a label; KEY is i as 8
digits. The shards read back (`rela.Loader("OUT/*.tar")`) in the dataset's order with its labels.
A JPEG keeps its bytes unless `max_side` asks to shrink it: no second lossy pass, and the same
pixels as the source. Any other image, and a JPEG over `max_side` (resized with Lanczos to it, as
FFCV's writer's `max_resolution`), is encoded at `quality`. Tar headers are fixed (mtime 0, mode
0644, no owner), so the same data and options give the same bytes.

Each shard is written whole (under a temporary name and renamed; in object storage, one PUT), with
its member index beside it (`000000.tar.index`: a remote reader opens a shard with one small GET
instead of reading it). `OUT` is a folder or an `s3://bucket/prefix` (boto3's credential chain and
`AWS_ENDPOINT_URL`). `OUT/pack.json` records each finished shard (its samples, size and sha256) and
the skipped samples. A killed pack, rerun with the
same arguments, resumes after its last finished shard and writes what an uninterrupted one writes.
A JPEG kept as it is is checked by libjpeg's header read, not decoded: one broken past its header
is packed, and fails when read (skippable there with `on_error="skip"`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from rela.data import object_store
from rela.data.datasets import RelaDataset, jpeg_header, open_dataset
from rela.data.datasets.remote_shards import INDEX_SUFFIX
from rela.data.datasets.tar_index import _index_shard, index_to_bytes
from rela.data.object_store import ObjectURL, is_remote
from rela.data.pack_options import PackOptions
from rela.data.store import atomic_write_bytes
from rela.errors import CorruptImageError, RelaError
from rela.faults import crashpoint

JOURNAL = "pack.json"


def pack(data, out: str | Path, *, limit: int | None = PackOptions.limit, shard_mb: float = PackOptions.shard_mb,
         max_side: int | None = PackOptions.max_side, quality: int = PackOptions.quality,
         skip_corrupt: bool = PackOptions.skip_corrupt, overwrite: bool = PackOptions.overwrite,
         progress: bool = True) -> list:
    """Write `data` (anything `open_dataset` opens) as shards in `out` (a folder or an s3:// prefix);
    returns the shards' paths (URLs for s3://)."""
    from tqdm.auto import tqdm

    PackOptions(data=str(data), out=str(out), limit=limit, shard_mb=shard_mb, max_side=max_side, quality=quality)
    ds = open_dataset(data, limit)
    out = _Out.at(out)
    identity = {"dataset": {k: v for k, v in ds.fingerprint().items() if k in ("kind", "n", "deep", "digest")},
                "limit": limit, "shard_mb": shard_mb, "max_side": max_side, "quality": quality}
    state = _start(out, identity, overwrite)
    if state.get("complete"):
        return [out.locate(s["name"]) for s in state["shards"]]
    shards, skipped = state["shards"], state["skipped"]
    start = shards[-1]["stop"] if shards else 0
    skipped = {k: v for k, v in skipped.items() if int(k) < start}  # what a finished shard already recorded
    writer = _Shard(len(shards), start)
    for i in tqdm(range(start, len(ds)), initial=start, total=len(ds), unit="img", desc="pack", disable=not progress):
        try:
            payload = encode_sample(ds, i, max_side, quality)
        except CorruptImageError as e:
            if not skip_corrupt:
                raise e.with_remedy("Fix or remove the file, or pass --skip-corrupt (skip_corrupt=True) to leave "
                                    "it out") from None
            skipped[str(i)] = f"{ds.describe(i)}: {e.reason}"
            continue
        writer.add(f"{i:08d}", payload, ds.label(i))
        if writer.size >= shard_mb * 2**20:
            shards.append(writer.finish(out, i + 1))
            _save(out, identity, shards, skipped, complete=False)
            crashpoint("shard-written")
            writer = _Shard(len(shards), i + 1)
    if writer.members:
        shards.append(writer.finish(out, len(ds)))
    _save(out, identity, shards, skipped, complete=True)
    return [out.locate(s["name"]) for s in shards]


def journal(out: str | Path) -> dict:
    """What a finished pack at `out` recorded (pack.json): its shards, samples and skipped ones."""
    data = _Out.at(out).read(JOURNAL)
    if data is None:
        raise RelaError(f"{out} holds no {JOURNAL}: it is not a pack's output")
    return json.loads(data)


def encode_sample(ds: RelaDataset, index: int, max_side: int | None, quality: int) -> bytes:
    """Sample `index` as JPEG bytes: its own when it is a JPEG within `max_side`, else encoded."""
    stored = ds.encoded(index, (".jpg", ".jpeg"))
    if stored is not None:
        try:
            width, height = jpeg_header(stored[0])
        except ValueError as e:
            raise CorruptImageError(index, ds.describe(index), str(e)) from None
        if max_side is None or max(width, height) <= max_side:
            return bytes(stored[0])
    from PIL import Image

    image = ds.load(index)  # uint8 H×W×C, C = 1 or 3; CorruptImageError when it can't be decoded
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    if max_side is not None and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class _Shard:
    """One tar shard being written, in memory, then written whole with its index beside it."""

    def __init__(self, number: int, start: int) -> None:
        self.name, self.start = f"{number:06d}.tar", start
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.USTAR_FORMAT)
        self.members = 0

    @property
    def size(self) -> int:
        return self.buf.tell()

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        self._member(f"{key}.jpg", jpeg)
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
        self.members += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def finish(self, out: _Out, stop: int) -> dict:
        self.tar.close()
        data = self.buf.getvalue()
        etag, (ix, truncated) = out.write_shard(self.name, data)
        ix.shard_md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()  # what S3 reports as a PUT's ETag
        out.write(self.name + INDEX_SUFFIX, index_to_bytes(ix, truncated))
        return {"name": self.name, "start": self.start, "stop": stop, "samples": self.members,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **({"etag": etag} if etag else {})}


class _Out:
    """Where the shards go: a local folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def at(out) -> _Out:
        return _RemoteOut(str(out)) if is_remote(str(out)) else _Out(Path(out))

    def __str__(self) -> str:
        return str(self.path)

    def locate(self, name: str):
        return self.path / name

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except OSError:
            return None

    def write(self, name: str, data: bytes) -> str | None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / name, data)
        return None

    def write_shard(self, name: str, data: bytes) -> tuple[str | None, tuple]:
        """Write a shard; its ETag (None here) and its member index, read back as a reader would."""
        self.write(name, data)
        return None, _index_shard(self.path / name, len(data))

    def holds(self, shard: dict) -> bool:
        """Whether the finished shard the journal records is there, whole and unchanged."""
        path = self.path / shard["name"]
        return (path.is_file() and path.stat().st_size == shard["bytes"]
                and hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"])


class _RemoteOut(_Out):
    """Where the shards go: an s3:// prefix (each object written whole by one PUT)."""

    def __init__(self, url: str) -> None:
        self.prefix = ObjectURL.parse(url.rstrip("/") + "/")

    def __str__(self) -> str:
        return str(self.prefix)

    def locate(self, name: str) -> str:
        return str(self._url(name))

    def _url(self, name: str) -> ObjectURL:
        return ObjectURL(self.prefix.bucket, self.prefix.key + name)

    def is_empty(self) -> bool:
        return not object_store.list_keys(self.prefix)

    def clear(self) -> None:
        for key in object_store.list_keys(self.prefix):
            object_store.delete(ObjectURL(self.prefix.bucket, key))

    def read(self, name: str) -> bytes | None:
        try:
            return object_store.read(self._url(name))
        except object_store.ObjectNotFound:
            return None

    def write(self, name: str, data: bytes) -> str | None:
        return object_store.write(self._url(name), data)

    def write_shard(self, name: str, data: bytes) -> tuple[str | None, tuple]:
        """Upload a shard; its ETag and its member index (indexed from a temporary local copy)."""
        with tempfile.TemporaryDirectory(prefix="rela-pack-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            index = _index_shard(path, len(data))
        return self.write(name, data), index

    def holds(self, shard: dict) -> bool:
        """By size and ETag (the store's checksum of what was PUT): no shard is read back."""
        try:
            head = object_store.head(self._url(shard["name"]))
        except object_store.ObjectNotFound:
            return False
        return head.size == shard["bytes"] and head.etag == shard.get("etag")


def _start(out: _Out, identity: dict, overwrite: bool) -> dict:
    """The journal to continue from: a fresh one, or the finished shards of this very pack (each
    checked against its recorded size and hash; the first that does not match and those after it
    are written again)."""
    if overwrite and not out.is_empty():
        out.clear()
    fresh = {"shards": [], "skipped": {}}
    if out.is_empty():
        return fresh
    try:
        state = json.loads(out.read(JOURNAL) or b"")
    except ValueError:
        state = None
    if state is None or state.get("identity") != identity:
        raise RelaError(f"{out} holds something other than this pack (other data or options): pass --overwrite "
                        "(overwrite=True) to replace it, or choose another --out")
    good = []
    for shard in state["shards"]:
        if not out.holds(shard):
            break
        good.append(shard)
    return {**state, "shards": good, "complete": state.get("complete") and len(good) == len(state["shards"])}


def _save(out: _Out, identity: dict, shards: list[dict], skipped: dict, complete: bool) -> None:
    state = {"identity": identity, "shards": shards, "skipped": skipped, "complete": complete,
             "samples": sum(s["samples"] for s in shards)}
    out.write(JOURNAL, json.dumps(state, indent=1).encode())
