"""The paper's Table 1 on Fashion-MNIST: priors × budgets, for BYOL and the other methods.

BYOL (seeds 0..--seeds-1, mean ± spread): rows are the priors — none (plain BYOL), a random
ResNet-18, the trained student of the BYOL-100 run (seed 0, `rela export`ed and converted as
`student:`), EfficientNet-Lite0 (ImageNet) — and columns the budgets {10%, 20%, 50%} plus plain
BYOL at 100%. Beside the uniform subsets, Lite0 at 20% and 50% with `policy="scored"` (the
loss-scored dynamic subset). Other methods (`--methods`): the method at 100% and 50%, and the
method after a Lite0 RELA phase at 50%.

Before the table, the baseline sweep of `bench/end_to_end.py` (BYOL-100 over crop min-scale ×
lr); its best setting is used by every BYOL arm, RELA's BYOL phase included. The other methods
run at rela's defaults (AdamW 1e-3, their own ≤ 64-px view presets): they are not swept here,
which the output says. Every arm goes through `rela train` + `rela eval` (L-BFGS probe, kNN-20);
arms are cached under --out and reused when rerun with the same settings (the output marks
which ran now), so an interrupted table resumes.

Floors and ceilings drawn in each plot: the random-init student (no training) and each prior's
own features (L-BFGS probe on the prior's raw features under its own preprocessing).

    python bench/table1.py --short                       # 5k images, 8 epochs, 1 seed
    python bench/table1.py --short --seeds 2 --methods simclr barlowtwins vicreg moco dino
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

from bench import end_to_end as e2e  # noqa: E402
from bench._common import device_line  # noqa: E402

BUDGETS = (0.1, 0.2, 0.5)
BYOL_PRIORS = ("random", "student", "lite0")
METHODS = ("simclr", "moco", "barlowtwins", "vicreg", "dino")
UNTUNED = {"ssl_views": None, "lr": 1e-3}  # other methods: rela's defaults, not the BYOL sweep's


def byol_arms() -> dict:
    """name → (prior, budget, phase[, overrides]) for BYOL's rows (see the module doc)."""
    arms = {"byol-100": (None, 1.0, "off")}
    arms |= {f"byol-{round(100 * b)}": (None, b, "off") for b in BUDGETS}
    arms |= {f"rela-{p}-{round(100 * b)}": (p, b, None) for p in BYOL_PRIORS for b in BUDGETS}
    arms |= {f"rela-lite0-{round(100 * b)}-scored": ("lite0", b, None, {"policy": "scored"}) for b in (0.2, 0.5)}
    return arms


def method_arms(method: str) -> dict:
    base = {**UNTUNED, "method": method}
    return {f"{method}-100": (None, 1.0, "off", base), f"{method}-50": (None, 0.5, "off", base),
            f"rela-{method}-lite0-50": ("lite0", 0.5, None, base)}


def student_store(args) -> str:
    """The BYOL-100 seed-0 run's backbone, exported and converted as the next prior."""
    from rela.data.convert import convert
    from rela.training.run import export_student

    path = args.out / f"store-student-{args.limit or 'full'}"
    weights = args.out / "byol-100-student.safetensors"
    checkpoint = args.out / "byol-100-s0" / "checkpoint.pt"
    if not weights.exists() or weights.stat().st_mtime < checkpoint.stat().st_mtime:
        export_student(args.out / "byol-100-s0", weights)  # a rerun keeps the file, so the store is reused
    e2e.PRIORS["student"] = f"student:{weights}"
    convert("fashion-mnist", e2e.PRIORS["student"], path, dim=64, limit=args.limit,  # at its own 32 px
            progress=not args.quiet)
    return str(path)


def probe_features(backbone, size: int, args, mean=None, std=None) -> dict:
    """L-BFGS probe and kNN-20 of frozen `backbone` features (train: the run's images; test: all)."""
    from rela.data.datasets import open_dataset
    from rela.training.evaluate import extract_features, knn_accuracy, lbfgs_probe

    tr = extract_features(backbone, open_dataset("fashion-mnist", args.limit), size, mean=mean, std=std)
    te = extract_features(backbone, open_dataset("fashion-mnist:test"), size, mean=mean, std=std)
    return {"linear": lbfgs_probe(*tr, *te)["top1"], "knn": knn_accuracy(*tr, *te)}


def floors(args) -> dict:
    """The untrained student and each prior's own features (cached in floors.json)."""
    from rela.data.priors import load_prior
    from rela.training.run import TrainConfig, build_student

    path = args.out / "floors.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if "random-init student" not in cached:
        backbone, _ = build_student(TrainConfig(out=str(args.out), arch="resnet18-cifar", width=0.125))
        cached["random-init student"] = probe_features(backbone, 32, args)
    for name in ("lite0", "random", "student"):
        key = f"prior {name}"
        if key not in cached and name in e2e.PRIORS:
            prior = load_prior(e2e.PRIORS[name], input_size=None if name == "student" else 64)  # as converted
            cached[key] = probe_features(prior.model, prior.input_size, args, prior.mean, prior.std)
    path.write_text(json.dumps(cached, indent=1))
    return cached


def run_arms(arms: dict, args, stores: dict, seeds: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        for name, spec in arms.items():
            t = time.perf_counter()
            r = e2e.run_arm(name, spec, seed, args, stores)
            r["ran_now"] = time.perf_counter() - t > 5  # a cached arm returns at once
            print(f"  {name} seed {seed}{'' if r['ran_now'] else ' (cached)'}: linear {r['linear']:.4f} "
                  f"kNN {r['knn']:.4f} steps {r['steps']} total {r['total_s']:.0f}s", flush=True)
            rows.append(r)
    return rows


def cell(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def byol_table(rows: list[dict]) -> str:
    """Priors × budgets, linear / kNN, and total seconds relative to BYOL-100."""
    by = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    full = statistics.mean(r["total_s"] for r in by["byol-100"])
    head = "| prior | " + " | ".join(f"{round(100 * b)}%" for b in BUDGETS) + " | 100% |"
    lines = [head, "|---|" + "---:|" * (len(BUDGETS) + 1)]
    for prior, fmt in (("none", "byol-{}"), *((p, f"rela-{p}-{{}}") for p in BYOL_PRIORS),
                       ("lite0, scored", "rela-lite0-{}-scored")):
        cells = []
        for b in BUDGETS:
            rs = by.get(fmt.format(round(100 * b)))
            cells.append(f"{cell(rs, 'linear')} / {cell(rs, 'knn')} ({statistics.mean(r['total_s'] for r in rs) / full:.2f}×)"
                         if rs else "—")
        last = f"{cell(by['byol-100'], 'linear')} / {cell(by['byol-100'], 'knn')} (1.00×)" if prior == "none" else "—"
        lines.append(f"| {prior} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(lines)


def method_table(rows: list[dict], methods) -> str:
    lines = ["| method | 100% | 50% | RELA (Lite0) 50% | RELA 50% − method 100% |", "|---|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    for m in methods:
        full, half, rela = by[f"{m}-100"], by[f"{m}-50"], by[f"rela-{m}-lite0-50"]
        t = statistics.mean(r["total_s"] for r in full)
        gap = statistics.mean(r["linear"] for r in rela) - statistics.mean(r["linear"] for r in full)
        lines.append(f"| {m} | {cell(full, 'linear')} | {cell(half, 'linear')} "
                     f"({statistics.mean(r['total_s'] for r in half) / t:.2f}×) | {cell(rela, 'linear')} "
                     f"({statistics.mean(r['total_s'] for r in rela) / t:.2f}×) | {100 * gap:+.1f} pts |")
    return "\n".join(lines)


def plot(rows: list[dict], method: str, floor: dict, path: Path) -> None:
    """Linear top-1 against total seconds: the plain method's budget curve as a line, RELA arms as
    points, the untrained student and the priors' own probes as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plain = sorted((r for r in rows if r["arm"].startswith(f"{method}-")), key=lambda r: r["total_s"])
    ax.plot([r["total_s"] for r in plain], [r["linear"] for r in plain], "o-", c="tab:blue", label=f"{method} (budgets)")
    for r in rows:
        if r["arm"].startswith("rela-"):
            ax.scatter(r["total_s"], r["linear"], c="tab:red", s=28)
            ax.annotate(r["arm"].removeprefix("rela-"), (r["total_s"], r["linear"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    for (name, v), style in zip(floor.items(), (":", "--", "-.", (0, (1, 3))), strict=False):
        ax.axhline(v["linear"], ls=style, c="grey", lw=1, label=name)
    ax.set_xlabel("total wall-clock seconds (training + conversion), CPU")
    ax.set_ylabel("linear-probe top-1 (Fashion-MNIST test)")
    ax.set_title(f"{method}: RELA arms against the method's budget curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="5k images, 8 epochs (default: 10k, 20)")
    p.add_argument("--seeds", type=int, default=1, help="BYOL arms with seeds 0..N-1 (other methods: seed 0)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="other methods (none: BYOL only)")
    p.add_argument("--no-sweep", action="store_true", help="use --lr/--min-scale instead of the baseline sweep")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-scale", type=float, default=0.08)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/out/table1"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    args.limit, args.epochs = (5000, 8) if args.short else (10000, 20)
    args.out = args.out.with_name(args.out.name + ("-short" if args.short else ""))
    args.phase, args.workers = "fixed:0.5", 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"device: {device_line()}; torch threads {args.threads}")
    print(f"data: Fashion-MNIST train first {args.limit}, test 10000; 32 px; resnet18-cifar x0.125; batch 128; "
          f"{args.epochs} epochs; RELA phase fixed:0.5; probe: L-BFGS logistic regression (C=1), kNN-20")
    stores = {name: e2e.make_store(name, "fashion-mnist", args.limit, args.out) for name in ("lite0", "random")}
    args.best = {"min_scale": args.min_scale, "lr": args.lr}
    if not args.no_sweep:
        args.best = e2e.sweep(args, stores)
    args.tuned = {"ssl_views": f"byol,scale={args.best['min_scale']}:1", "lr": args.best["lr"]}
    rows = run_arms({"byol-100": (None, 1.0, "off")}, args, stores, 1)
    stores["student"] = student_store(args)
    rows = run_arms(byol_arms(), args, stores, args.seeds)
    floor = floors(args)
    print("\nfloors and priors' own features:", json.dumps(floor))
    print("\nBYOL, linear / kNN top-1 (total seconds relative to BYOL-100):\n" + byol_table(rows))
    plot(rows, "byol", floor, args.out / "byol.png")
    m_rows = run_arms({k: v for m in args.methods for k, v in method_arms(m).items()}, args, stores, 1)
    if args.methods:
        print("\nother methods (rela's defaults, not swept), linear top-1 (total relative to the method's 100%):\n"
              + method_table(m_rows, args.methods))
        for m in args.methods:
            plot([r for r in m_rows if m in r["arm"]], m, floor, args.out / f"{m}.png")
    (args.out / "results.json").write_text(json.dumps({"byol": rows, "methods": m_rows, "floors": floor,
                                                       "sweep_best": args.best}, indent=1))
    print(f"\nplots and results.json in {args.out}; benchmark wall {time.perf_counter() - t0:.0f}s "
          "(CPU only; no GPU measured)")


if __name__ == "__main__":
    main()
