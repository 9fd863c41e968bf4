"""Benchmark: one process against `torchrun` with two, for conversion and for training.

Baseline: the same `rela` command as ONE process using every core through torch's intra-op
threads (what a user gets without torchrun). Contender: `torchrun --nproc-per-node 2`, one
thread per rank (torchrun's default), the same global batch. Every run is a fresh command, so
its wall time includes interpreter start, imports and (for conversion) loading the prior —
reported beside the steady-state rate taken from the run's own accounting:

- conversion: images/s of the extraction phase, from the store manifest (cost.extract_seconds:
  the busiest rank's summed chunk seconds, decode-worker start-up included); chunks of 256 rows
  so that both ranks get an equal share;
- training: images/s from summary.json (images seen / training seconds; conversion excluded).

Two conversion inputs: Fashion-MNIST held in memory (no decoding: the prior's compute is all
there is) and a folder of photo JPEGs (decoding in DataLoader workers competes for the same cores).
Runs alternate (1 proc, 2 procs, 1 proc, ...) and medians are reported with their ratio.

    python bench/scaling.py                       # defaults below (~10 minutes on 2 cores)
    python bench/scaling.py --repeats 1 --images 2000 --epochs 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import device_line  # noqa: E402


def command(args: list[str], procs: int, threads: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, "-m", "rela", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "rela", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r


def convert_once(data: str, limit: int, out: Path, procs: int, threads: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = command(["convert", "--data", data, "--limit", str(limit), "--prior", args.prior,
                       "--input-size", str(args.input_size), "--dim", "64", "--batch-size", "256",
                       "--chunk-rows", "256",  # enough chunks for both ranks (the default is 4096)
                       "--out", str(out), "--quiet", "--device", "cpu"], procs, threads)
    cost = json.loads((out / "manifest.json").read_text())["cost"]
    return {"wall": wall, "rate": limit / cost["extract_seconds"]}


def train_once(data: str, store: Path, out: Path, procs: int, threads: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = command(["train", "--data", data, "--limit", str(args.images), "--prior", str(store),
                       "--epochs", str(args.epochs), "--batch-size", "128", "--phase", "fixed:1",
                       "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)], procs, threads)
    s = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "rate": s["images_seen"] / s["train_seconds"],
            "step_ms": 1000 * s["median_step_seconds"]}


def compare(name: str, runs: dict[str, list[dict]]) -> dict:
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    one, two = med["1 process"], med["torchrun 2"]
    print(f"\n{name}")
    print(
        f"  {'':26} {'img/s (steady)':>15} {'wall s (whole cmd)':>19}"
        + ("  median ms/step" if "step_ms" in one else "")
    )
    for k, m in med.items():
        extra = f"  {m['step_ms']:14.0f}" if "step_ms" in m else ""
        print(f"  {k:26} {m['rate']:15.0f} {m['wall']:19.1f}{extra}")
    ratio, wall_ratio = two["rate"] / one["rate"], one["wall"] / two["wall"]
    print(
        f"  torchrun 2 / 1 process: throughput x{ratio:.2f}, wall-clock speed-up x{wall_ratio:.2f} "
        f"(ideal on {os.cpu_count()} cores: x{min(2, os.cpu_count() or 1):.0f} "
        "only where one process leaves cores idle)"
    )
    return {"median": med, "throughput_ratio": ratio, "wall_ratio": wall_ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6000, help="Fashion-MNIST images (default 6000)")
    p.add_argument("--jpegs", type=int, default=2500, help="photo JPEGs for the decode-bound case (default 2500)")
    p.add_argument("--prior", default="efficientnet-lite0")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="training epochs per run (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "scaling.json"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print("device:", device_line())
    print(f"baseline: one process with {cores} intra-op threads; contender: torchrun --nproc-per-node 2, "
          "1 thread per rank (torchrun's default). Every run is a fresh command.")
    configs = {"1 process": (1, cores), "torchrun 2": (2, 1)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from bench.loader import build_jpegs

        folder = build_jpegs(args.jpegs, tmp / "jpegs")
        for name, data, n in (
            ("conversion, Fashion-MNIST in memory (prior compute only)", "fashion-mnist", args.images),
            (f"conversion, {args.jpegs} photo JPEGs 400x350 (decode + prior)", str(folder), args.jpegs),
        ):
            runs: dict[str, list[dict]] = {k: [] for k in configs}
            for _ in range(args.repeats):
                for k, (procs, threads) in configs.items():
                    runs[k].append(convert_once(data, n, tmp / "store", procs, threads, args))
            results[name] = compare(name + f", {n} images, {args.prior} @ {args.input_size}px", runs)
        store = tmp / "train-store"
        convert_once("fashion-mnist", args.images, store, 1, cores, args)
        name = (f"training, Fashion-MNIST {args.images} images, resnet18-cifar x1/8, global batch 128, "
                f"{args.epochs} epochs, RELA phase")
        runs = {k: [] for k in configs}
        for _ in range(args.repeats):
            for k, (procs, threads) in configs.items():
                runs[k].append(train_once("fashion-mnist", store, tmp / "run", procs, threads, args))
        results[name] = compare(name, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device_line(), "results": results}, indent=1))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
