"""Benchmark ReLA-D conversion.

Part 1 — pipeline overhead. `rela.convert` (decode workers + prior + chunk journal + PCA +
float16 store) against the prior's bare inference on the same, already preprocessed images held
in memory, same batch size, same thread count. Goal: conversion ≥ 0.9× bare inference, i.e. the
pipeline is never the bottleneck. Medians over --repeats alternating runs.

Part 2 — memory at ImageNet scale. Streaming PCA (float64 moments, eigendecomposition,
projection, float16 target writes) over N = 1.28M synthetic rows of D = 2048 to d = 512, in a
fresh process, reporting its peak RSS. Goal < 2 GB. Baseline: holding the raw float32 feature
matrix in RAM, as a non-streaming implementation must (N·D·4 bytes; computed, not run).

    python bench/convert.py                         # both parts, defaults below
    python bench/convert.py --images 2048 --repeats 2 --rows 200000   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_seconds, device_line  # noqa: E402


def bare_inference(prior, batches: list[torch.Tensor]) -> tuple[float, float]:
    t, c = time.perf_counter(), cpu_seconds()
    for x in batches:
        prior(x)
    return time.perf_counter() - t, cpu_seconds() - c


def part1(args) -> dict:
    from rela import convert, load_prior, open_dataset

    ds = open_dataset(args.data, limit=args.images)
    prior = load_prior(args.prior, input_size=args.input_size)
    n = len(ds)
    print(f"\n[1] conversion vs bare prior inference: {args.data} first {n} images, prior "
          f"{args.prior} at {prior.input_size}px ({prior.dim}-d), dim {args.dim}, batch {args.batch_size}")
    print("    bare = the prior alone on preprocessed tensors already in RAM; convert = the whole "
          "rela.convert (decode, resize, inference, chunk journal, PCA, store)")
    pre = torch.stack([prior.preprocess(ds.load(i)) for i in range(n)])
    batches = list(pre.split(args.batch_size))
    untuned = n / bare_inference(prior, batches)[0]
    # convert() keeps freed memory in the heap (rela._alloc); give the bare baseline the same.
    from rela._alloc import keep_freed_memory

    tuned = keep_freed_memory()
    bare_inference(prior, batches[:2])  # warm-up
    if tuned:
        print(
            f"    allocator: bare inference {untuned:.1f} img/s with glibc defaults, "
            f"{n / bare_inference(prior, batches)[0]:.1f} img/s with rela's malloc settings (both rows below use them)"
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            def run_convert(r: int = r):
                t, c = time.perf_counter(), cpu_seconds()
                store = convert(ds, prior, Path(tmp) / f"s{r}", dim=args.dim, batch_size=args.batch_size,
                                num_workers=args.workers, progress=False)
                return time.perf_counter() - t, cpu_seconds() - c, store

            # Alternate the order (ABBA...) so drift in this noisy machine's speed cancels out.
            if r % 2 == 0:
                bw, bc = bare_inference(prior, batches)
                cw, cc, store = run_convert()
            else:
                cw, cc, store = run_convert()
                bw, bc = bare_inference(prior, batches)
            rows.append({"bare_img_s": n / bw, "convert_img_s": n / cw, "ratio": bw / cw,
                         "bare_cpu_ms": 1e3 * bc / n, "convert_cpu_ms": 1e3 * cc / n,
                         "extract_img_s": store.manifest["cost"]["images_per_second"],
                         # Time inside the prior's forward calls / the conversion's whole wall time:
                         # measured within one run, so the machine's drift cancels out.
                         "inference_share": store.manifest["cost"]["inference_seconds"] / cw})
            x = rows[-1]
            print(
                f"  pair {r}: bare {x['bare_img_s']:7.1f} img/s {x['bare_cpu_ms']:6.2f} CPU ms/img | "
                f"convert {x['convert_img_s']:7.1f} img/s {x['convert_cpu_ms']:6.2f} CPU ms/img | "
                f"ratio {x['ratio']:.3f} | "
                f"inference share of convert {x['inference_share']:.3f}"
            )
    res = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    res["images"] = n
    res["cpu_ratio"] = res["bare_cpu_ms"] / res["convert_cpu_ms"]
    print(f"  median: convert {res['convert_img_s']:.1f} img/s vs bare {res['bare_img_s']:.1f} img/s; "
          f"paired wall ratio {res['ratio']:.3f}, CPU-time ratio {res['cpu_ratio']:.3f}; "
          f"inside convert, the prior's forward took {res['inference_share']:.3f} of the wall time "
          f"(goal >= 0.9 on the paired ratio: {'met' if res['ratio'] >= 0.9 else 'MISSED'}; "
          f"on the in-run share: {'met' if res['inference_share'] >= 0.9 else 'MISSED'})")
    return res


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _pca_child(rows: int, D: int, d: int, chunk: int, out: str) -> None:
    """Runs in a fresh process with torch loaded, as in `rela convert`; reports its peak RSS."""
    import torch  # noqa: F401  (the real conversion process has it loaded)

    from rela.data.pca import StreamingMoments, fit_whitening
    from rela.data.store import TargetWriter

    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    scales = np.geomspace(3.0, 0.01, D).astype(np.float32)

    def chunks():
        for k, s in enumerate(range(0, rows, chunk)):
            rng = np.random.default_rng(k)
            yield rng.standard_normal((min(chunk, rows - s), D), dtype=np.float32) * scales + 0.5

    t0 = time.perf_counter()
    m = StreamingMoments(D)
    for x in chunks():
        m.update(x)
    t1 = time.perf_counter()
    w = fit_whitening(m, d)
    t2 = time.perf_counter()
    writer = TargetWriter(Path(out), rows, d)
    for x in chunks():
        writer.write(w.transform(x))
    writer.close()
    t3 = time.perf_counter()
    print(json.dumps({"peak_rss_mb": _rss_mb("VmHWM"), "import_rss_mb": base, "moments_s": t1 - t0,
                      "eigh_s": t2 - t1, "project_write_s": t3 - t2}))


def part2(args) -> dict:
    N, D, d, C = args.rows, 2048, 512, args.chunk
    print(f"\n[2] streaming PCA memory: N={N:,} x D={D} -> d={d}, chunks of {C} rows (synthetic features)")
    with tempfile.TemporaryDirectory() as tmp:
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                f"from bench.convert import _pca_child; _pca_child({N}, {D}, {d}, {C}, {tmp + '/t.npy'!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    formula = (8 * D + 8 * D * D + 12 * C * D + 16 * D * D) / 2**20
    baseline_mb = N * D * 4 / 2**20
    res.update({"rows": N, "formula_mb": formula, "in_ram_baseline_mb": baseline_mb})
    print(
        f"  moments {res['moments_s']:.1f} s, eigh {res['eigh_s']:.1f} s, project+write {res['project_write_s']:.1f} s"
    )
    print(f"  peak RSS {res['peak_rss_mb']:.0f} MB = {res['import_rss_mb']:.0f} MB for the process with torch loaded "
          f"+ {res['peak_rss_mb'] - res['import_rss_mb']:.0f} MB for the PCA (formula: {formula:.0f} MB)")
    print(f"  baseline, raw float32 features held in RAM (computed, not run): {baseline_mb:,.0f} MB "
          f"-> streaming uses {res['peak_rss_mb'] / baseline_mb:.3f}x of it")
    print(f"  goal < 2048 MB: {'met' if res['peak_rss_mb'] < 2048 else 'MISSED'}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--prior", default="efficientnet-lite0")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="decode workers for convert (default: rela's)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--rows", type=int, default=1_281_167, help="rows for the PCA memory part (ImageNet-1K train)")
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--skip", choices=["pipeline", "pca"], action="append", default=[])
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "convert.json")
    args = p.parse_args()
    print("device:", device_line())
    out = {"device": device_line()}
    if "pipeline" not in args.skip:
        out["pipeline"] = part1(args)
    if "pca" not in args.skip:
        out["pca"] = part2(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
