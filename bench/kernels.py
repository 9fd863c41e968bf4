"""Benchmark the RELA loss: rela's path vs eager PyTorch, forward + backward.

Baseline: what a user writes without rela — `F.normalize(pred)`, `F.normalize(target)`,
elementwise product, sum, mean, with autograd (`rela.kernels.rela_loss.eager_rela_loss`), one
call per view. rela: `rela_loss(pred[V, B, d], target)` — on CPU tensors the fused PyTorch path
(custom autograd Function, no [V, B, d] temporaries in the forward, one fused pass in the backward);
on CUDA tensors the Triton kernels.

Bytes the kernel must move per fwd+bwd call (V views, fp32 pred, fp16 target):
    forward  V·B·d·4 + B·d·2,  backward 2·V·B·d·4 + B·d·2   (+ 16·V·B per-row stats each way)

On CUDA the table also shows achieved GB/s against those bytes and against a measured
device-to-device copy bandwidth (goal ≥ 80%). Without a GPU that part is skipped and says so.

    python bench/kernels.py                  # all shapes, 1 and 2 threads
    python bench/kernels.py --quick          # fewer shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RELA_KERNELS", "auto")
from rela.kernels.rela_loss import eager_rela_loss, rela_loss  # noqa: E402


def timeit(fn, min_time: float = 0.3, max_reps: int = 50) -> dict:
    """p20/p50/p80 of per-call wall time in ms (after one warm-up call)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    q = statistics.quantiles(times, n=10) if len(times) >= 3 else times * 9
    return {"p20": q[1], "p50": statistics.median(times), "p80": q[7], "reps": len(times)}


def make_calls(pred: torch.Tensor, target: torch.Tensor, sync=lambda: None):
    """(eager baseline, rela) closures doing one fwd+bwd each over all V views of `pred`."""
    V = pred.shape[0]

    def eager():
        pred.grad = None
        (sum(eager_rela_loss(pred[v], target) for v in range(V)) / V).backward()
        sync()

    def fused():
        pred.grad = None
        rela_loss(pred, target).backward()
        sync()

    return eager, fused


def cpu_case(V: int, B: int, d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(V, B, d, generator=g, requires_grad=True)
    target = torch.randn(B, d, generator=g).half()
    eager, fused = make_calls(pred, target)
    e, f = timeit(eager), timeit(fused)
    return {"eager_ms": e, "rela_ms": f, "speedup": e["p50"] / f["p50"]}


def cuda_part(shapes) -> list[dict]:
    rows = []
    dev = torch.device("cuda")
    x = torch.empty(256 * 2**20 // 4, device=dev)
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)
        torch.cuda.synchronize()

    copy_gbs = 2 * x.numel() * 4 / (timeit(copy)["p50"] / 1e3) / 1e9
    print(f"\nCUDA: {torch.cuda.get_device_name()} — device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    for V, B, d in shapes:
        pred = torch.randn(V, B, d, device=dev, requires_grad=True)
        target = torch.randn(B, d, device=dev).half()
        eager, fused = make_calls(pred, target, torch.cuda.synchronize)
        e, f = timeit(eager), timeit(fused)
        nbytes = 3 * V * B * d * 4 + 2 * B * d * 2 + 32 * V * B
        gbs = nbytes / (f["p50"] / 1e3) / 1e9
        rows.append({"V": V, "B": B, "d": d, "eager_ms": e, "rela_ms": f, "speedup": e["p50"] / f["p50"],
                     "GB/s": gbs, "of_copy": gbs / copy_gbs})
        print(f"  V={V} B={B:5d} d={d:5d}  eager {e['p50']:8.3f} ms  rela {f['p50']:8.3f} ms  "
              f"x{e['p50'] / f['p50']:5.2f}  {gbs:7.1f} GB/s = {100 * gbs / copy_gbs:5.1f}% of copy")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--views", type=int, nargs="+", default=[2, 1])
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "kernels.json")
    args = p.parse_args()
    Bs, ds = ([256, 4096], [128, 2048]) if args.quick else ([256, 1024, 4096], [128, 512, 2048])
    shapes = [(V, B, d) for V in args.views for B in Bs for d in ds]
    print(f"device: CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}; "
          f"pred fp32, target fp16; fwd+bwd per call, p50 [p20-p80] ms")
    print("CPU path: rela's fused PyTorch autograd Function vs eager PyTorch (baseline)")
    out = {"cpu": [], "cuda": None, "torch": torch.__version__}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s)")
        print(f"  {'V':>1} {'B':>5} {'d':>5}  {'eager ms':>22}  {'rela ms':>22}  speedup")
        for V, B, d in shapes:
            r = cpu_case(V, B, d)
            r.update({"threads": threads, "V": V, "B": B, "d": d})
            out["cpu"].append(r)
            e, f = r["eager_ms"], r["rela_ms"]
            print(f"  {V:>1} {B:5d} {d:5d}  {e['p50']:8.3f} [{e['p20']:6.2f}-{e['p80']:6.2f}]  "
                  f"{f['p50']:8.3f} [{f['p20']:6.2f}-{f['p80']:6.2f}]  x{r['speedup']:.2f}")
    sp = [r["speedup"] for r in out["cpu"]]
    print(f"\nCPU speedup over eager: median x{statistics.median(sp):.2f}, min x{min(sp):.2f}, max x{max(sp):.2f} "
          f"(goal >= x1.5: {'met' if statistics.median(sp) >= 1.5 else 'MISSED'} on the median)")
    if torch.cuda.is_available():
        out["cuda"] = cuda_part(shapes)
    else:
        print("\nGPU part skipped: no CUDA device here, so Triton GB/s on GPU is unmeasured.")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
