"""End-to-end: does RELA reach BYOL's accuracy in fewer steps and less wall-clock, conversion included?

Fashion-MNIST (the first 10k training images by default, `--full` for all 60k; the full 10k test
set), 32 px, CIFAR-stem ResNet-18 at 1/8 width, batch 128, AdamW 1e-3, 20 epochs. Arms (the shape
of the paper's Table 1):

  byol-100 / byol-50 / byol-20   plain BYOL on a fresh uniform subset of 100/50/20% each epoch
  byol-100-reference             a minimal plain-PyTorch BYOL (bench/reference_byol.py, lightly's
                                 example loop) on the same student: rela's BYOL must match it
  rela-50 / rela-20              RELA phase (EfficientNet-Lite0 prior at 64 px → 64-d targets) then BYOL
  rela-50-random                 the same with a randomly initialised ResNet-18 prior
  rela-50-only                   the RELA phase for the whole run (phase fixed:1)
  (--extra adds rela-50-adaptive and rela-50-blend, the other switch modes, and rela-50-warm:
   the switch at half with the SSL heads warmed during the RELA phase, --warm-heads)

Each arm is evaluated by `rela eval`'s default linear probe (converged L-BFGS logistic regression on
standardised frozen features, C = 1) and kNN (k = 20). Costs: conversion seconds (the prior's pass over the data, charged to every arm
that uses it), training seconds, optimizer steps, median seconds per step. Runs are kept under
--out and reused when rerun with the same settings, so an interrupted benchmark resumes.

Baseline: BYOL at 100% of the steps, in the same run, on the same machine. Prints a table and saves
a plot of linear-probe accuracy against total wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import device_line  # noqa: E402
from rela.data.convert import convert  # noqa: E402
from rela.training.evaluate import evaluate_run  # noqa: E402
from rela.training.run import TrainConfig, config_from_run  # noqa: E402
from rela.training.train import train  # noqa: E402

ARMS = {  # name: (prior, budget, phase[, TrainConfig overrides])
    "byol-100": (None, 1.0, "off"),
    "byol-100-reference": ("reference", 1.0, "off"),  # bench/reference_byol.py: the check on rela's loop
    "byol-50": (None, 0.5, "off"),
    "byol-20": (None, 0.2, "off"),
    "rela-50": ("lite0", 0.5, None),
    "rela-20": ("lite0", 0.2, None),
    "rela-50-random": ("random", 0.5, None),
    "rela-50-only": ("lite0", 0.5, "fixed:1"),
}
EXTRA = {"rela-50-adaptive": ("lite0", 0.5, "adaptive"), "rela-50-blend": ("lite0", 0.5, "blend"),
         "rela-50-warm": ("lite0", 0.5, None, {"warm_heads": True})}  # the switch without a cold start
PRIORS = {"lite0": "efficientnet-lite0", "random": "random:resnet18"}


def make_store(name: str, data: str, limit: int | None, out: Path) -> str:
    """One store per prior, shared by its arms (each arm is charged its conversion seconds)."""
    path = out / f"store-{name}-{limit or 'full'}"
    convert(data, PRIORS[name], path, dim=64, limit=limit, input_size=64, progress=True)
    return str(path)


def run_reference(name: str, seed: int, args) -> dict:
    """The plain-PyTorch BYOL of bench/reference_byol.py at the same settings (cached like an arm)."""
    from bench.reference_byol import evaluate as evaluate_reference
    from bench.reference_byol import train_reference

    run = args.out / f"{name}-s{seed}"
    settings = {"limit": args.limit, "epochs": args.epochs, "seed": seed}
    cached = run / "result.json"
    if cached.exists() and json.loads(cached.read_text())["settings"] == settings:
        return json.loads(cached.read_text())["row"]
    backbone, seconds = train_reference(args.limit, args.epochs, seed)
    result = evaluate_reference(backbone, args.limit)
    steps = args.epochs * ((args.limit or 60000) // 128)
    row = {"arm": name, "seed": seed, "linear": result["linear"], "knn": result["knn"], "steps": steps,
           "images": steps * 128, "train_s": seconds, "conv_s": 0.0, "total_s": seconds,
           "step_ms": 1000 * seconds / steps, "switch": None}  # mean, not median, step time
    run.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"settings": settings, "row": row}, indent=1))
    return row


def run_arm(name: str, spec, seed: int, args, stores: dict) -> dict:
    prior, budget, phase, *overrides = spec
    if prior == "reference":
        return run_reference(name, seed, args)
    cfg = TrainConfig(**(overrides[0] if overrides else {}),
        data="fashion-mnist", limit=args.limit, out=str(args.out / f"{name}-s{seed}"),
        prior=stores[prior] if prior else None, budget=budget, phase=phase or args.phase,
        epochs=args.epochs, seed=seed, num_workers=args.workers, width=0.125, arch="resnet18-cifar",
    )
    run = Path(cfg.out)
    same = (run / "config.json").exists() and config_from_run(run) == cfg
    if same and (run / "eval.json").exists() and (run / "summary.json").exists():  # done before: reuse
        summary, result = json.loads((run / "summary.json").read_text()), json.loads((run / "eval.json").read_text())
    else:
        resume = same and (run / "checkpoint.pt").exists()  # an interrupted arm continues
        summary = train(cfg, resume=resume, overwrite=not resume, progress=not args.quiet)
        result = evaluate_run(run, progress=not args.quiet)
    return {
        "arm": name, "seed": seed, "linear": result["linear_top1"], "knn": result["knn_top1"],
        "steps": summary["steps"], "images": summary["images_seen"], "train_s": summary["train_seconds"],
        "conv_s": summary["conversion_seconds"], "total_s": summary["total_seconds"],
        "step_ms": 1000 * summary["median_step_seconds"], "switch": summary.get("switch"),
    }


def table(rows: list[dict]) -> str:
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    base = statistics.mean(r["total_s"] for r in by_arm["byol-100"]) if "byol-100" in by_arm else float("nan")
    lines = ["| arm | linear top-1 | kNN top-1 | steps | median ms/step | train s | conversion s | total s | total / BYOL-100 | switch (step, rho, kNN) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arm, rs in by_arm.items():
        def cell(key, fmt, rs=rs):
            vals = [r[key] for r in rs]
            s = fmt.format(statistics.mean(vals))
            return s + (f" ± {statistics.stdev(vals):{fmt[2:-1]}}" if len(vals) > 1 else "")
        sw = rs[0]["switch"]
        sw_s = f"{sw['step']}, {sw['rho']:.3f}, {sw.get('knn_top1', float('nan')):.3f}" if sw else "—"
        total = statistics.mean(r["total_s"] for r in rs)
        lines.append(f"| {arm} | {cell('linear', '{:.3f}')} | {cell('knn', '{:.3f}')} | {rs[0]['steps']} | "
                     f"{cell('step_ms', '{:.0f}')} | {cell('train_s', '{:.0f}')} | {rs[0]['conv_s']:.1f} | "
                     f"{total:.0f} | {total / base:.2f} | {sw_s} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in enumerate(sorted(rows, key=lambda r: (r["total_s"], r["linear"]))):
        colour = "tab:blue" if r["arm"].startswith("byol") else "tab:red"
        ax.scatter(r["total_s"], r["linear"], c=colour, s=30)
        ax.annotate(f"{r['arm']} s{r['seed']}", (r["total_s"], r["linear"]), textcoords="offset points",
                    xytext=(4, 3 if k % 2 == 0 else -11), fontsize=8)  # alternate: neighbours don't overlap
    ax.set_xlabel("total wall-clock seconds (training + conversion), CPU")
    ax.set_ylabel("linear-probe top-1 (Fashion-MNIST test)")
    ax.set_title("RELA vs BYOL: accuracy against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="all 60k training images (default: the first 10k)")
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=1, help="repeat every arm with seeds 0..N-1")
    p.add_argument("--phase", default="fixed:0.5", help="switch mode for the rela arms")
    p.add_argument("--arms", nargs="+", help="only these arms")
    p.add_argument("--extra", action="store_true", help="also the adaptive and blend switch modes")
    p.add_argument("--short", action="store_true", help="the demo: 5k images, 8 epochs")
    p.add_argument("--workers", type=int, default=0, help="loader workers (0: in the training process)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/out/e2e"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.short:
        args.limit, args.epochs = 5000, 8
        args.out = args.out.with_name(args.out.name + "-short")
    if args.full:
        args.limit = None
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    arms = {**ARMS, **(EXTRA if args.extra else {})}
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms or k == "byol-100"}
    print(f"device: {device_line()}; torch threads {args.threads}; loader workers {args.workers}")
    print(f"data: Fashion-MNIST train first {args.limit or 60000}, test 10000; 32 px; resnet18-cifar x0.125; "
          f"batch 128; AdamW 1e-3; {args.epochs} epochs; rela phase {args.phase}; seeds {args.seeds}")
    t0 = time.perf_counter()
    needed = {spec[0] for spec in arms.values() if spec[0] in PRIORS}
    stores = {name: make_store(name, "fashion-mnist", args.limit, args.out) for name in sorted(needed)}
    rows = []
    for seed in range(args.seeds):
        for name, spec in arms.items():
            r = run_arm(name, spec, seed, args, stores)
            print(f"  {name} seed {seed}: linear {r['linear']:.4f} kNN {r['knn']:.4f} steps {r['steps']} "
                  f"train {r['train_s']:.0f}s total {r['total_s']:.0f}s", flush=True)
            rows.append(r)
    print("\n" + table(rows))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "accuracy_vs_seconds.png")
    print(f"\nplot: {args.out / 'accuracy_vs_seconds.png'}; results: {args.out / 'results.json'}; "
          f"benchmark wall {time.perf_counter() - t0:.0f}s (CPU only; no GPU measured)")


if __name__ == "__main__":
    main()
