"""rela at ImageNet-1K's shape, against torchvision's ImageFolder + DataLoader, in one run.

A folder of N tiny JPEGs in 1000 class folders (default N = 1,281,167, ImageNet-1K's train
split; `--n` for fewer) and the same images as WebDataset shards are generated once (reused
when present). Each open runs in a fresh process, so the warm numbers come from what is on
disk (rela's cached listing, the page cache), never from memory of the last run:

- open: torchvision `ImageFolder(root)` / rela `open_dataset(root)` + `fingerprint()`, first and
  again (warm); rela's first open runs first, so what it warms can only help torchvision's. This
  machine cannot drop the kernel's caches (no permission): "first" is the first open in this
  run, with dentries and inodes as earlier work left them (the issue's 24 s was a colder cache).
- `Loader(...)` construction, first-batch latency (iter() to the first batch);
- RSS of the main process and of each worker at the end of each of `--epochs` epochs over a
  random `--subset` of the data (torchvision: SubsetRandomSampler with the same share).

Goals: open + fingerprint <= 1.5x torchvision's scan, first open; warm re-open <= 2 s
at 1.28M; Loader(...) <= 0.5 s; worker RSS growth <= 5% over the epochs. Each is printed with
its measured value and PASS/MISS.

    python bench/scale.py [--n 1281167] [--root /tmp/rela-scale] [--epochs 5] [--subset 0.005]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = 1000
SHARD_SIZE = 10_000


# --- data ------------------------------------------------------------------------------------
def tiny_jpegs(count: int = 64) -> list[bytes]:
    """`count` distinct 16×16 JPEGs (sizes differ, as real files' do)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(50, 95)))
        out.append(buf.getvalue())
    return out


def class_sizes(n: int) -> list[int]:
    base, extra = divmod(n, CLASSES)
    return [base + (c < extra) for c in range(CLASSES)]


def make_folder(root: Path, n: int) -> Path:
    """root/train/nXXXXXXXX/*.JPEG, ImageNet's layout; kept when it already holds n images."""
    train = root / "train"
    marker = root / f"folder-{n}.done"
    if marker.exists():
        return train
    shutil.rmtree(train, ignore_errors=True)
    jpegs = tiny_jpegs()
    t = time.perf_counter()
    for c, count in enumerate(class_sizes(n)):
        d = train / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(count):
            with open(d / f"n{c:08d}_{i}.JPEG", "wb") as f:
                f.write(jpegs[(c + i) % len(jpegs)])
        if c % 100 == 99:
            print(f"  wrote {c + 1} of {CLASSES} class folders ({time.perf_counter() - t:.0f} s)", flush=True)
    marker.touch()
    return train


def make_shards(root: Path, n: int) -> str:
    """The same images, in the same order, as WebDataset shards of SHARD_SIZE samples."""
    shards = root / "shards"
    marker = root / f"shards-{n}.done"
    count = -(-n // SHARD_SIZE)
    spec = str(shards / f"{{000000..{count - 1:06d}}}.tar")
    if marker.exists():
        return spec
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    jpegs, i, tar = tiny_jpegs(), 0, None
    for c, per in enumerate(class_sizes(n)):
        for j in range(per):
            if i % SHARD_SIZE == 0:
                if tar:
                    tar.close()
                tar = tarfile.open(shards / f"{i // SHARD_SIZE:06d}.tar", "w")
            for name, data in ((f"{i:08d}.jpg", jpegs[(c + j) % len(jpegs)]), (f"{i:08d}.cls", str(c).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            i += 1
    tar.close()
    marker.touch()
    return spec


# --- measurements, each in a fresh process ----------------------------------------------------
def child(kind: str, data: str, args: dict) -> dict:
    """Runs in a subprocess: one open (and optionally a loader run), as JSON on stdout."""
    import psutil
    import torch
    import torchvision
    import torchvision.transforms.v2 as T

    from rela.data.datasets import open_dataset

    out: dict = {}
    t = time.perf_counter()  # imports above are not part of an open
    if kind == "torchvision":
        ds = torchvision.datasets.ImageFolder(
            data,
            transform=T.Compose(
                [
                    T.RandomResizedCrop(args.get("size", 32)),
                    T.RandomHorizontalFlip(),
                    T.ToImage(),
                    T.ToDtype(torch.float32, True),
                ]
            ),
        )
    else:
        ds = open_dataset(data)
        ds.fingerprint()
    out["open_s"] = time.perf_counter() - t
    out["n"] = len(ds)
    if args.get("epochs"):
        out.update(run_loader(kind, ds, args, psutil.Process()))
    return out


def run_loader(kind: str, ds, args: dict, me) -> dict:
    import numpy as np
    import torch

    k, workers, batch = int(len(ds) * args["subset"]), args["workers"], args["batch"]
    t = time.perf_counter()
    if kind == "torchvision":
        from torch.utils.data import DataLoader, SubsetRandomSampler

        g = torch.Generator().manual_seed(0)
        loader = DataLoader(ds, batch, sampler=SubsetRandomSampler(torch.randperm(len(ds), generator=g)[:k].tolist(),
                                                                   generator=g),
                            num_workers=workers, drop_last=True)
    else:
        import rela

        loader = rela.Loader(ds, batch, views="rela", image_size=args["size"], subset=args["subset"],
                             num_workers=workers, seed=0)
    out = {"loader_s": time.perf_counter() - t, "main_rss": [], "worker_rss": [], "epoch_s": []}
    for epoch in range(args["epochs"]):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        t = time.perf_counter()
        it = iter(loader)
        next(it)
        if epoch == 0:
            out["first_batch_s"] = time.perf_counter() - t
        for i, _ in enumerate(it, start=1):
            if i == len(loader) - 2:  # near the end of the epoch, workers still alive
                kids = me.children(recursive=True)
                out["worker_rss"].append([p.memory_info().rss / 2**20 for p in kids])
                out["main_rss"].append(me.memory_info().rss / 2**20)
        out["epoch_s"].append(time.perf_counter() - t)
    out["img_per_s"] = float(np.median([len(loader) * batch / s for s in out["epoch_s"]]))
    return out


def measure(kind: str, data: str, args: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, data, json.dumps(args)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------
def growth(series: list[list[float]]) -> float:
    """Largest relative RSS growth of any worker slot from the first epoch to the last."""
    first, last = series[0], series[-1]
    return (
        max((b - a) / a for a, b in zip(sorted(first), sorted(last), strict=False)) if first and last else float("nan")
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--n", type=int, default=1_281_167)
    a.add_argument("--root", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rela-scale")
    a.add_argument("--epochs", type=int, default=5)
    a.add_argument("--subset", type=float, default=0.005)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--batch", type=int, default=256)
    a.add_argument("--size", type=int, default=32)
    a.add_argument("--no-shards", action="store_true", help="skip the WebDataset rows")
    a.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], json.loads(args.child[2]))))
        return

    from bench._common import device_line

    root = args.root / str(args.n)
    cache = root / "rela-cache"
    os.environ["RELA_CACHE"] = str(cache)  # children inherit it; a fresh cache per data size
    print(f"# bench/scale.py: {args.n:,} images, {device_line()}", flush=True)
    t = time.perf_counter()
    train = str(make_folder(root, args.n))
    print(f"  folder ready ({time.perf_counter() - t:.0f} s)", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    time.sleep(2.5)  # past the listing cache's racy window for a just-written folder
    run = dict(epochs=args.epochs, subset=args.subset, workers=args.workers, batch=args.batch, size=args.size)
    rows = {}
    # rela's first open runs before torchvision's: whatever the first walk warms (dentries, inodes)
    # then helps torchvision, never rela. The warm opens follow, in the other order.
    first = measure("rela", train, {})
    rows["torchvision"] = [measure("torchvision", train, {}), measure("torchvision", train, run)]
    rows["rela"] = [first, measure("rela", train, run)]
    if not args.no_shards:
        spec = make_shards(root, args.n)
        rows["rela-wds"] = [measure("rela", spec, {}), measure("rela", spec, run)]
    report(rows, args)


def report(rows: dict, args) -> None:
    tv, rl = rows["torchvision"], rows["rela"]
    print(f"\n| {args.n:,} images | open first | open warm | loader | first batch | main RSS MB | "
          f"worker RSS MB (epoch 1 -> {args.epochs}) | img/s (median epoch) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"torchvision": "torchvision ImageFolder + DataLoader", "rela": "rela open_dataset + fingerprint, Loader",
             "rela-wds": "rela WebDataset shards + fingerprint, Loader"}
    for key, (first, warm) in rows.items():
        w = warm["worker_rss"]
        print(f"| {names[key]} | {first['open_s']:.2f} s | {warm['open_s']:.2f} s | {warm['loader_s']:.3f} s | "
              f"{warm['first_batch_s']:.2f} s | {warm['main_rss'][0]:.0f} -> {warm['main_rss'][-1]:.0f} | "
              f"{'/'.join(f'{x:.0f}' for x in sorted(w[0]))} -> {'/'.join(f'{x:.0f}' for x in sorted(w[-1]))} | "
              f"{warm['img_per_s']:.0f} |")
    ratio = rl[0]["open_s"] / tv[0]["open_s"]
    print(f"\nrela / torchvision, first open: x{ratio:.2f}; warm: x{rl[1]['open_s'] / tv[1]['open_s']:.2f}")
    scale = 1_281_167 / args.n
    goals = [
        ("open + fingerprint <= 1.5x torchvision's scan (first open)", f"x{ratio:.2f}", ratio <= 1.5),
        ("warm re-open <= 2 s at 1.28M" + (f" (measured at {args.n:,}, x{scale:.1f} linear)" if scale > 1.01 else ""),
         f"{rl[1]['open_s'] * scale:.2f} s", rl[1]["open_s"] * scale <= 2),
        ("Loader(...) <= 0.5 s", f"{rl[1]['loader_s']:.3f} s", rl[1]["loader_s"] <= 0.5),
        (f"worker RSS growth <= 5% over {args.epochs} epochs", f"{growth(rl[1]['worker_rss']):+.1%}",
         growth(rl[1]["worker_rss"]) <= 0.05),
    ]
    for goal, value, ok in goals:
        print(f"  {verdict(ok)}  {goal}: {value}")


if __name__ == "__main__":
    main()
