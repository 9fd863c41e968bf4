"""Benchmark epoch resampling at ImageNet-1K scale: N = 1,281,167, budget r = 0.5.

rela (`rela._C`, C++): uniform subset (partial Fisher-Yates) and weighted sampling without
replacement (exponential keys + radix select, O(N), multithreaded, deterministic for a seed).
Baselines, same N and k, same machine, one run: numpy `Generator.choice(replace=False[, p=...])`
and `torch.multinomial(w, k, replacement=False)`. Goal: weighted ≤ 15 ms and ≥ 30× numpy.
Medians over --repeats; CPU only.

    python bench/resample.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rela import _ext  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--baseline-repeats", type=int, default=3)
    args = p.parse_args()
    n, k = args.n, int(args.ratio * args.n)
    print(f"device: CPU, {os.cpu_count()} cores; extension built: {_ext.has_extension()}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    print(f"N = {n:,}, k = {k:,} (r = {args.ratio})\n")
    rng = np.random.default_rng(0)
    w = (rng.random(n) + 0.01).astype(np.float32)  # loss-like positive scores
    p64 = w.astype(np.float64) / w.astype(np.float64).sum()
    tw = torch.from_numpy(w)
    seeds = iter(range(10**9))

    rows = [
        ("uniform", "rela._C uniform_subset", median_ms(lambda: _ext.uniform_subset(n, k, next(seeds)), args.repeats)),
        ("uniform", "numpy choice(replace=False)",
         median_ms(lambda: rng.choice(n, k, replace=False), args.baseline_repeats)),
        ("uniform", "torch.randperm[:k]", median_ms(lambda: torch.randperm(n)[:k], args.baseline_repeats)),
    ]
    for threads in sorted({1, min(2, os.cpu_count() or 1)}):
        rows.append(("weighted", f"rela._C weighted_subset, {threads} thread(s)",
                     median_ms(lambda t=threads: _ext.weighted_subset(w, k, next(seeds), threads=t), args.repeats)))
    rows += [
        ("weighted", "numpy choice(replace=False, p=w)",
         median_ms(lambda: rng.choice(n, k, replace=False, p=p64), args.baseline_repeats)),
        ("weighted", "torch.multinomial(w, k, replacement=False)",
         median_ms(lambda: torch.multinomial(tw, k, replacement=False), args.baseline_repeats)),
    ]
    for kind in ("uniform", "weighted"):
        mine = min(ms for kd, name, ms in rows if kd == kind and name.startswith("rela"))
        print(f"{kind}:")
        for kd, name, ms in rows:
            if kd == kind:
                print(f"  {name:46s} {ms:9.2f} ms   rela is x{ms / mine:7.1f} faster" if not name.startswith("rela")
                      else f"  {name:46s} {ms:9.2f} ms")
    best_w = min(ms for kd, name, ms in rows if kd == "weighted" and name.startswith("rela"))
    numpy_w = next(ms for kd, name, ms in rows if kd == "weighted" and name.startswith("numpy"))
    print(f"\ngoal: weighted <= 15 ms: {'met' if best_w <= 15 else 'MISSED'} ({best_w:.1f} ms); "
          f">= 30x numpy: {'met' if numpy_w / best_w >= 30 else 'MISSED'} (x{numpy_w / best_w:.0f})")


if __name__ == "__main__":
    main()
