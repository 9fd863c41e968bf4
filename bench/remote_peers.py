"""The streaming loaders users pick for object storage, run by bench/remote.py from their own virtual
environments ($RELA_BENCH_VENVS/<peer>, made with --system-site-packages so torch, torchvision and lightly
are the ones rela's rows use; the peer's own pins stay in its venv).

Each reads the same images from the same S3 endpoint with its authors' recommended settings and
the same views as rela's rows (torchvision RandomResizedCrop 224 + flip for plain crops; lightly's
BYOLTransform for BYOL views), batch 64, 2 DataLoader workers:
- webdataset: `wds.WebDataset(urls, shardshuffle=True).shuffle(1000).decode("pil")`, shards
  streamed with `pipe:aws s3 cp ... -` as its README advises for S3, `wds.WebLoader`.
- litdata: `litdata.StreamingDataset("s3://.../litdata", shuffle=True)` over its own optimized
  chunks, `StreamingDataLoader`.
- mosaic: `streaming.StreamingDataset(remote="s3://.../mds", shuffle=True)` over MDS, a DataLoader.

    python bench/remote_peers.py prepare PEER SHARDS_DIR OUT_DIR     # write the peer's own format
    python bench/remote_peers.py run PEER KIND URL --workers 2        # one JSON line: epochs 1 and 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transform(kind: str):
    from torchvision import transforms as T

    if kind == "plain":
        tf = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(MEAN, STD)])
        return lambda im: [tf(im)]
    from lightly.transforms import BYOLTransform

    return BYOLTransform()


def _samples(shards: Path):
    """(key, jpeg bytes, label) of every sample of rela's packed shards, in order."""
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name[:-4]
                label = int(tar.extractfile(members[key + ".cls"]).read()) if key + ".cls" in members else -1
                yield key, tar.extractfile(members[name]).read(), label


_DATASETS: dict = {}


def _dataset(spec: str):
    """rela's reader of the packed shards (importable here: the venv sees the system's packages)."""
    if spec not in _DATASETS:
        from rela.data.datasets import open_dataset

        _DATASETS[spec] = open_dataset(spec)
    return _DATASETS[spec]


def _litdata_item(arg: tuple[str, int]) -> dict:
    spec, i = arg
    ds = _dataset(spec)
    return {"jpg": ds.encoded(i)[0], "cls": ds.label(i)}


def prepare(peer: str, shards: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if peer == "litdata":
        import litdata

        spec = str(shards / "*.tar")
        n = len(_dataset(spec))
        litdata.optimize(fn=_litdata_item, inputs=[(spec, i) for i in range(n)], output_dir=str(out),
                         chunk_bytes="32MB", num_workers=1)
    elif peer == "mosaic":
        from streaming import MDSWriter

        with MDSWriter(out=str(out), columns={"jpg": "bytes", "cls": "int"}, size_limit="32mb") as w:
            for _, jpg, label in _samples(shards):
                w.write({"jpg": jpg, "cls": label})


def _decode(jpg: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(jpg)).convert("RGB")


def loader(peer: str, kind: str, url: str, workers: int):
    import torch

    tf = transform(kind)
    if peer == "webdataset":
        import webdataset as wds

        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        names = sorted(json.loads(os.environ["RELA_PEER_SHARDS"]))
        urls = [f"pipe:aws s3 cp --quiet --endpoint-url {endpoint} {url}{n} -" for n in names]
        ds = (wds.WebDataset(urls, shardshuffle=True, nodesplitter=wds.split_by_node, empty_check=False)
              .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(tf, lambda y: y).batched(64))
        return wds.WebLoader(ds, batch_size=None, num_workers=workers)
    if peer == "litdata":
        import litdata
        from litdata.streaming import downloader

        # LitData's obstore path builds its S3 client without allow_http, so an http:// endpoint (this
        # loopback server) fails with "BadScheme"; allowed here, its fast path runs as it would on https.
        downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}

        class Views(litdata.StreamingDataset):
            def __getitem__(self, i):
                item = super().__getitem__(i)
                return tf(_decode(item["jpg"])), item["cls"]

        ds = Views(url, shuffle=True, cache_dir=tempfile.mkdtemp(prefix="litdata-cache-"))
        return litdata.StreamingDataLoader(ds, batch_size=64, num_workers=workers)
    import streaming

    class MdsViews(streaming.StreamingDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return tf(_decode(item["jpg"])), item["cls"]

    streaming.base.util.clean_stale_shared_memory()
    ds = MdsViews(remote=url, local=tempfile.mkdtemp(prefix="mds-cache-"), shuffle=True, batch_size=64)
    return torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(peer: str, kind: str, url: str, workers: int) -> dict:
    res = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    dl = loader(peer, kind, url, workers)
    for epoch in (1, 2):
        if hasattr(dl, "set_epoch"):
            dl.set_epoch(epoch)  # torch loaders ignore it; the streaming ones reshuffle
        t, c = (t0, c0) if epoch == 1 else (time.perf_counter(), cpu_seconds())
        n, first = 0, None
        for batch in dl:
            n += len(batch[1])  # the labels: one per image, whatever shape the views take
            first = first or time.perf_counter() - t
        dt = time.perf_counter() - t
        # worker processes' CPU reaches RUSAGE_CHILDREN when they exit (each epoch here)
        res[f"epoch{epoch}"] = {"img_s": n / dt, "cpu_ms": 1e3 * (cpu_seconds() - c) / max(n, 1),
                                "first_batch_s": first, "images": n}
    return res


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("what", choices=("prepare", "run"))
    a.add_argument("peer", choices=("webdataset", "litdata", "mosaic"))
    a.add_argument("args", nargs=2)
    a.add_argument("--workers", type=int, default=2)
    args = a.parse_args()
    if args.what == "prepare":
        prepare(args.peer, Path(args.args[0]), Path(args.args[1]))
    else:
        print(json.dumps(run(args.peer, args.args[0], args.args[1], args.workers)))


if __name__ == "__main__":
    main()
