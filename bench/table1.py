"""The paper's Table 1 on Fashion-MNIST: priors × budgets, for BYOL and the other methods.

BYOL (seeds 0..--seeds-1, mean ± spread): rows are the priors — none (plain BYOL), a random
ResNet-18, the trained student of the BYOL-100 run (seed 0, `rela export`ed and converted as
`student:`), EfficientNet-Lite0 (ImageNet) — and columns the budgets {10%, 20%, 50%} plus plain
BYOL at 100%. Beside the uniform subsets, Lite0 at 20% and 50% with `policy="scored"` (the
loss-scored dynamic subset). Other methods (`--methods`): the method at 100% and 50%, and the
method after a Lite0 RELA phase at 50%, switching at half and under the default `adaptive` phase.

Before the table, the baseline sweep of `bench/end_to_end.py` (BYOL-100 over crop min-scale ×
lr); its best setting is used by every BYOL arm, RELA's BYOL phase included. Each other method
gets its own sweep first (AdamW lr ∈ METHOD_LRS at 100%, seed 0, its own ≤ 64-px view preset) and
all its arms run at its best lr (`--method-seeds` repeats them). The switch modes (RELA only,
adaptive, blend, warm heads) at Lite0 50%, the plain-PyTorch reference BYOL and a class-balanced
subset run beside the table. Every arm goes through `rela train` + `rela eval` (L-BFGS probe,
kNN-20 weighted and majority vote); arms are cached under --out and reused when rerun with the same
settings (the output marks
which ran now), so an interrupted table resumes.

Floors and ceilings drawn in each plot: the random-init student (no training) and each prior's
own features (L-BFGS probe on the prior's raw features under its own preprocessing).

    python bench/table1.py --short                       # 5k images, 8 epochs, 1 seed
    python bench/table1.py --short --seeds 2 --method-seeds 2       # docs/benchmarks.md's Table 1
    python bench/table1.py --short --method-seeds 2 --parts methods  # the other methods only
    python bench/table1.py --short --method-seeds 2 --parts handover # the hand-over

`--parts handover`: BYOL and the five methods, each at its tuned setting (TUNED: the sweeps
above), at 50% and 20% of the steps with a Lite0 RELA phase: the method at 100%, RELA alone
(`fixed:1`), today's switch (`fixed:0.5`, hard, the method's schedules on the run's clock) and the
default phase (`rela train`'s defaults: adaptive, scaled rule, window, hand-over), with the switch
step and why it fired; `--candidates` first runs the hand-over candidates (fixed:0.5 each) on
CANDIDATE_METHODS at 50%, which chose the default.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import end_to_end as e2e  # noqa: E402
from bench._common import device_line  # noqa: E402
from rela.options import positive_int  # noqa: E402

PARTS = ("byol", "methods", "handover")
BUDGETS = (0.1, 0.2, 0.5)
BYOL_PRIORS = ("random", "student", "lite0")
METHODS = ("simclr", "moco", "barlowtwins", "vicreg", "dino")
UNTUNED = {"ssl_views": None}  # other methods: their own view presets, not BYOL's tuned crop
METHOD_LRS = (5e-4, 1e-3, 2e-3)  # each other method's lr sweep (BYOL's lr grid, extended at an edge)


def byol_arms(args) -> dict:
    """label → (run directory name, spec (prior, budget, phase[, overrides])) for BYOL's rows (see
    the module doc); BYOL-100 is the sweep's best setting's own runs (the same config: reused, not rerun)."""
    arms = {f"byol-{round(100 * b)}": (None, b, "off") for b in BUDGETS}
    arms |= {f"rela-{p}-{round(100 * b)}": (p, b, None) for p in BYOL_PRIORS for b in BUDGETS}
    arms |= {f"rela-lite0-{round(100 * b)}-scored": ("lite0", b, None, {"policy": "scored"}) for b in (0.2, 0.5)}
    return {"byol-100": (args.byol100, (None, 1.0, "off")), **own_dirs(arms)}


def own_dirs(arms: dict) -> dict:
    """label → spec as label → (label, spec): each arm runs in a directory named after it."""
    return {label: (label, spec) for label, spec in arms.items()}


def method_arms(method: str, lr: float) -> dict:
    """label → (run directory name, spec), all at the method's own best lr (its 100% seed-0 run is
    the sweep's, reused): the method at 100% and 50%; after a Lite0 RELA phase at 50% with the
    table's switch at half and with the default phase mode (`adaptive`: what `rela train --method M
    --budget 0.5` runs); for DINO also its head before the lightly CIFAR-10 one (no BatchNorm, no
    frozen prototypes) at 100%, so the change is measured in the same run."""
    base = {**UNTUNED, "method": method, "lr": lr}
    arms = [(f"{method}-100", (None, 1.0, "off", base)), (f"{method}-50", (None, 0.5, "off", base)),
            (f"rela-{method}-lite0-50", ("lite0", 0.5, None, base)),
            (f"rela-{method}-lite0-50-adaptive", ("lite0", 0.5, "adaptive", base))]
    if method == "dino":
        arms.append(("dino-100-plain-head", (None, 1.0, "off", {**base, "method_options": OLD_DINO_HEAD})))
    return {label: (f"{label}-lr{lr:g}", spec) for label, spec in arms}


OLD_DINO_HEAD = "batch_norm=false,freeze_last_layer=0"  # rela's DINO head before the lightly CIFAR-10 one


def tune_method(method: str, args, stores: dict) -> float:
    """The method's own baseline sweep: lr ∈ METHOD_LRS at 100%, seed 0, its preset views, then
    further steps (2× the largest, ½ the smallest; at most MAX_BEYOND) while the best sits at the
    edge of what was tried; the best linear top-1 wins (the care BYOL's sweep gets, on one axis:
    its views are its authors')."""
    lrs, runs = list(METHOD_LRS), {}
    while lrs:
        lr = lrs.pop(0)
        dirname, spec = method_arms(method, lr)[f"{method}-100"]
        r = e2e.run_arm(dirname, spec, 0, args, stores)
        print(f"  sweep {method}: lr {lr:g}: linear {r['linear']:.4f} kNN {r['knn']:.4f}", flush=True)
        runs[lr] = r["linear"]
        best = max(runs, key=runs.get)
        if not lrs and len(runs) < len(METHOD_LRS) + MAX_BEYOND and best in (min(runs), max(runs)):
            lrs.append(2 * best if best == max(runs) else best / 2)  # at an edge: one step beyond it
    return max(runs, key=runs.get)


MAX_BEYOND = 3  # steps past METHOD_LRS' edges: up to 8x its largest lr


def student_store(args) -> str:
    """The BYOL-100 seed-0 run's backbone, exported and converted as the next prior."""
    from rela.data.convert import convert
    from rela.training.run import export_student

    path = args.out / f"store-student-{args.limit or 'full'}"
    weights = args.out / "byol-100-student.safetensors"
    run = args.out / f"{args.byol100}-s0"
    if not weights.exists() or weights.stat().st_mtime < (run / "checkpoint.pt").stat().st_mtime:
        export_student(run, weights)  # a rerun keeps the file, so the store is reused
    e2e.PRIORS["student"] = f"student:{weights}"
    convert("fashion-mnist", e2e.PRIORS["student"], path, dim=64, limit=args.limit,  # at its own 32 px
            progress=not args.quiet)
    return str(path)


def balanced_subset(args) -> str:
    """The earlier independent run's data choice: a class-balanced random subset of the 60k training
    images (args.limit / 10 per class, seed 0), as an .npz `rela train` reads."""
    import numpy as np

    from rela.data.datasets import open_dataset

    path = args.out / f"balanced-{args.limit}.npz"
    if not path.exists():
        ds = open_dataset("fashion-mnist")
        labels = np.array([ds.label(i) for i in range(len(ds))])
        order = np.random.default_rng(0).permutation(len(ds))
        keep = np.sort(np.concatenate([order[labels[order] == c][: args.limit // 10] for c in range(10)]))
        np.savez(path, images=np.stack([ds.load(int(i)) for i in keep]), labels=labels[keep])
    return str(path)


SWITCH_ARMS = {  # the default-phase question at Lite0 50%, beside the table's switch at half
    "rela-lite0-50-only": ("lite0", 0.5, "fixed:1"), "rela-lite0-50-adaptive": ("lite0", 0.5, "adaptive"),
    "rela-lite0-50-blend": ("lite0", 0.5, "blend"), "rela-lite0-50-warm": ("lite0", 0.5, None, {"warm_heads": True}),
    "byol-100-reference": ("reference", 1.0, "off"),  # bench/reference_byol.py: rela's loop must match it
}


def earlier_choices(args, stores: dict) -> list[dict]:
    """What the earlier run did differently, tried on the tuned BYOL-100: its class-balanced subset
    (the majority-vote kNN is in every arm's eval.json). Its own student code is not available."""
    data = {"data": balanced_subset(args), "test_data": "fashion-mnist:test"}
    return run_arms(own_dirs({"byol-100-balanced": (None, 1.0, "off", data)}), args, stores, args.seeds)


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
    """Run (or reuse) each arm, label → (run directory name, spec), for seeds 0..seeds-1."""
    rows = []
    for seed in range(seeds):
        for name, (dirname, spec) in arms.items():
            t = time.perf_counter()
            r = e2e.run_arm(dirname, spec, seed, args, stores)
            r["arm"], r["ran_now"] = name, time.perf_counter() - t > 5  # a cached arm returns at once
            print(f"  {name} seed {seed}{'' if r['ran_now'] else ' (cached)'}: linear {r['linear']:.4f} "
                  f"kNN {r['knn']:.4f} (majority {r['knn_majority']:.4f}) steps {r['steps']} "
                  f"total {r['total_s']:.0f}s", flush=True)
            rows.append(r)
    return rows


def cell(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def byol_table(rows: list[dict]) -> str:
    """Priors × budgets, linear / kNN, and total seconds relative to BYOL-100."""
    by = e2e.by_arm(rows)
    full = statistics.mean(r["total_s"] for r in by["byol-100"])
    head = "| prior | " + " | ".join(f"{round(100 * b)}%" for b in BUDGETS) + " | 100% |"
    lines = [head, "|---|" + "---:|" * (len(BUDGETS) + 1)]
    for prior, fmt in (("none", "byol-{}"), *((p, f"rela-{p}-{{}}") for p in BYOL_PRIORS),
                       ("lite0, scored", "rela-lite0-{}-scored")):
        cells = []
        for b in BUDGETS:
            rs = by.get(fmt.format(round(100 * b)))
            cells.append(
                f"{cell(rs, 'linear')} / {cell(rs, 'knn')} ({statistics.mean(r['total_s'] for r in rs) / full:.2f}×)"
                if rs
                else "—"
            )
        last = f"{cell(by['byol-100'], 'linear')} / {cell(by['byol-100'], 'knn')} (1.00×)" if prior == "none" else "—"
        lines.append(f"| {prior} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(lines)


def method_table(rows: list[dict], methods) -> str:
    """Linear top-1 (total seconds relative to the method's 100%) per arm, and each RELA mode's gap
    to the method at 100% — the goal's comparison; the adaptive arm says whether it handed over."""
    lines = ["| method | 100% | 50% | RELA (Lite0) 50%, switch at half | RELA (Lite0) 50%, adaptive | "
             "switch at half − 100% | adaptive − 100% |", "|---|---:|---:|---:|---:|---:|---:|"]
    by = e2e.by_arm(rows)
    for m in methods:
        full, half = by[f"{m}-100"], by[f"{m}-50"]
        fixed, adaptive = by[f"rela-{m}-lite0-50"], by[f"rela-{m}-lite0-50-adaptive"]
        t, base = (statistics.mean(r[k] for r in full) for k in ("total_s", "linear"))

        def arm(rs: list[dict], t: float = t) -> str:
            return f"{cell(rs, 'linear')} ({statistics.mean(r['total_s'] for r in rs) / t:.2f}×)"

        fired = sum(1 for r in adaptive if (r.get("switch") or {}).get("step", -1) >= 0)
        gaps = [100 * (statistics.mean(r["linear"] for r in rs) - base) for rs in (fixed, adaptive)]
        lines.append(f"| {m} | {cell(full, 'linear')} | {arm(half)} | {arm(fixed)} | {arm(adaptive)}, "
                     f"switched in {fired}/{len(adaptive)} | {gaps[0]:+.1f} pts | {gaps[1]:+.1f} pts |")
    if "dino-100-plain-head" in by:
        lines.append(f"\nDINO-100 with its earlier head ({OLD_DINO_HEAD}): {cell(by['dino-100-plain-head'], 'linear')} "
                     f"against {cell(by['dino-100'], 'linear')} with lightly's CIFAR-10 head")
    return "\n".join(lines)


def plot(rows: list[dict], method: str, floor: dict, path: Path) -> None:
    """Linear top-1 against total seconds: the plain method's budget curve as a line, RELA arms as
    points, the untrained student and the priors' own probes as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    curve = re.compile(rf"{method}-\d+")  # the plain method at a budget; other arms are points
    arms = e2e.by_arm(rows)
    mean = {a: [statistics.mean(r[k] for r in rs) for k in ("total_s", "linear")] for a, rs in arms.items()}
    spread = {a: statistics.stdev([r["linear"] for r in rs]) if len(rs) > 1 else 0.0 for a, rs in arms.items()}
    plain = sorted((a for a in arms if curve.fullmatch(a)), key=lambda a: mean[a][0])
    ax.errorbar([mean[a][0] for a in plain], [mean[a][1] for a in plain], [spread[a] for a in plain], fmt="o-",
                c="tab:blue", capsize=3, label=f"{method} (budgets; mean ± sd over seeds)")
    for a in arms:
        if not curve.fullmatch(a):
            ax.errorbar(*mean[a], spread[a], fmt="o", capsize=3, c="tab:red" if a.startswith("rela-") else "tab:grey")
            ax.annotate(a.removeprefix("rela-"), mean[a], fontsize=7, textcoords="offset points", xytext=(4, 3))
    for (name, v), style in zip(floor.items(), (":", "--", "-.", (0, (1, 3))), strict=False):
        ax.axhline(v["linear"], ls=style, c="grey", lw=1, label=name)
    ax.set_xlabel("total wall-clock seconds (training + conversion), CPU")
    ax.set_ylabel("linear-probe top-1 (Fashion-MNIST test)")
    ax.set_title(f"{method}: RELA arms against the method's budget curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- the hand-over ------------------------------------------------------------------------------

# Each method's setting from the sweeps of `--parts byol` and `--parts methods` (docs/benchmarks.md, "Measured:
# Table 1"): BYOL min-scale 0.5 at lr 2e-3; the others at their best lr with their own view presets.
TUNED = {
    "byol": {"ssl_views": "byol,scale=0.5:1", "lr": 2e-3},
    "simclr": {**UNTUNED, "lr": 4e-3},
    "moco": {**UNTUNED, "lr": 2e-3},
    "barlowtwins": {**UNTUNED, "lr": 2e-3},
    "vicreg": {**UNTUNED, "lr": 2e-3},
    "dino": {**UNTUNED, "lr": 2e-3},
}
HANDOVER_BUDGETS = (0.5, 0.2)
TODAY = {
    "handover": 0.0,
    "handover_floor": 0.0,
    "method_clock": "run",
}  # the switch before the hand-over existed: hard, to the method alone, on the run's clock
CANDIDATES = {  # the hand-overs tried at fixed:0.5 (today's is "switch")
    "switch": TODAY,
    "clock": {"handover": 0.0, "method_clock": "switch"},
    "decay": {"handover": 0.1, "method_clock": "switch"},
    "decay-lr": {"handover": 0.1, "method_clock": "switch", "handover_lr": 0.1},
    # a second round, after the first default (decay, switching by the scaled rule) stayed 3.5
    # points under RELA alone for BYOL: hand over slowly, or keep RELA beside the method
    "decay-long": {"handover": 0.5, "method_clock": "switch"},
    "residual": {"handover": 0.1, "method_clock": "switch", "handover_floor": 0.5},
}
CANDIDATE_METHODS = ("byol", "simclr")  # the two the hand-over cost most (−2.8 and −2.3 points)


def handover_arms(method: str) -> dict:
    """label → (run directory, spec) of one method's hand-over table: the method at 100%; per
    budget RELA alone, today's switch at half and the default phase (rela train's defaults)."""
    base = {"method": method, **TUNED[method]}
    arms = {f"{method}-100": (None, 1.0, "off", base)}
    for b in HANDOVER_BUDGETS:
        pct = round(100 * b)
        arms |= {f"rela-{method}-{pct}-only": ("lite0", b, "fixed:1", base),
                 f"rela-{method}-{pct}-switch": ("lite0", b, "fixed:0.5", {**base, **TODAY}),
                 f"rela-{method}-{pct}-default": ("lite0", b, "adaptive", base)}
    return own_dirs(arms)


def candidate_arms(method: str) -> dict:
    base = {"method": method, **TUNED[method]}
    return own_dirs({f"rela-{method}-50-{name}": ("lite0", 0.5, "fixed:0.5", {**base, **o})
                     for name, o in CANDIDATES.items()})


def handover_table(rows: list[dict], methods) -> str:
    """Linear top-1 ± sd (total seconds relative to the method's 100%) per arm; the default arm's
    switch share; the goal's comparisons."""
    by = e2e.by_arm(rows)
    head = ["| method | 100% |"]
    for b in HANDOVER_BUDGETS:
        pct = round(100 * b)
        head.append(f" RELA alone {pct}% | switch at half {pct}% | default {pct}% (switch at) |")
    lines = ["".join(head), "|---|---:|" + "---:|---:|---:|" * len(HANDOVER_BUDGETS)]
    for m in methods:
        full = by[f"{m}-100"]
        t = statistics.mean(r["total_s"] for r in full)
        cells = [f"| {m} | {cell(full, 'linear')} |"]
        for b in HANDOVER_BUDGETS:
            pct = round(100 * b)
            for arm in ("only", "switch", "default"):
                rs = by[f"rela-{m}-{pct}-{arm}"]
                extra = ""
                if arm == "default":
                    shares = [(r.get("switch") or {}).get("share") for r in rs]
                    extra = " (" + "/".join("never" if x is None else f"{x:.2f}" for x in shares) + ")"
                cells.append(f" {cell(rs, 'linear')} ({statistics.mean(r['total_s'] for r in rs) / t:.2f}×){extra} |")
        lines.append("".join(cells))
    return "\n".join(lines)


def handover_goals(rows: list[dict], methods) -> str:
    """The issue's goals, counted: default at 50% ≥ the method at 100%; ≥ RELA alone at 50%."""
    by = e2e.by_arm(rows)
    mean = {a: statistics.mean(r["linear"] for r in rs) for a, rs in by.items()}
    sd = {a: statistics.stdev([r["linear"] for r in rs]) if len(rs) > 1 else 0.0 for a, rs in by.items()}
    beat_full = [m for m in methods if mean[f"rela-{m}-50-default"] >= mean[f"{m}-100"]]
    beat_only = [m for m in methods if mean[f"rela-{m}-50-default"] >= mean[f"rela-{m}-50-only"]]
    out = [f"default at 50% >= the method at 100%: {len(beat_full)} of {len(methods)} ({', '.join(beat_full)})",
           f"default at 50% >= RELA alone at 50%: {len(beat_only)} of {len(methods)} ({', '.join(beat_only)})"]
    for b in HANDOVER_BUDGETS:
        pct = round(100 * b)
        for m in methods:
            arms = [f"rela-{m}-{pct}-{a}" for a in ("only", "switch", "default")]
            best = max(arms, key=mean.get)
            gap = mean[best] - mean[arms[2]]
            out.append(f"  {pct}% {m}: default {mean[arms[2]]:.3f}, best arm {best.split('-')[-1]} {mean[best]:.3f}, "
                       f"gap {100 * gap:.1f} pts vs the best arm's seed sd {100 * sd[best]:.1f}")
    return "\n".join(out)


def handover_part(args, stores: dict, floor: dict) -> dict:
    """Candidates (with --candidates), then each method's hand-over arms; a table, the goals, a plot each."""
    args.tuned = {}  # every arm carries its method's own setting
    out = {}
    if args.candidates:
        cand = []
        for m in CANDIDATE_METHODS:
            cand += run_arms(candidate_arms(m), args, stores, args.method_seeds)
        print("\nhand-over candidates (Lite0, 50%, switch at half):\n" + e2e.table(cand), flush=True)
        out["candidates"] = cand
    rows = []
    for m in args.handover_methods:
        rows += run_arms(handover_arms(m), args, stores, args.method_seeds)
    print("\nthe hand-over, linear top-1 (total seconds, conversion included, relative to the method's 100%):\n"
          + handover_table(rows, args.handover_methods))
    print("\n" + handover_goals(rows, args.handover_methods))
    for m in args.handover_methods:
        plot([r for r in rows if r["arm"].startswith((f"{m}-", f"rela-{m}-"))], m, floor,
             args.out / f"handover-{m}.png")
    return {**out, "handover": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="5k images, 8 epochs (default: 10k, 20)")
    p.add_argument("--seeds", type=positive_int, help="BYOL arms (with --data: every arm) with seeds 0..N-1 "
                   "(default 1; with --data 2)")
    p.add_argument("--method-seeds", type=positive_int, default=1, help="the other methods' arms with seeds 0..N-1")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="other methods (none: BYOL only)")
    p.add_argument("--no-sweep", action="store_true", help="use --lr/--min-scale instead of the baseline sweep")
    p.add_argument(
        "--sweep-seeds", type=positive_int, default=2, help="seeds per baseline-sweep setting (mean decides)"
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-scale", type=float, default=0.08)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/out/table1"))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="byol: the sweep, BYOL's table, the switch, the earlier run's choices; methods: the other "
                        "methods (each part on its own needs only the conversions)")
    p.add_argument("--handover-methods", nargs="*", default=list(TUNED), help="--parts handover: which methods")
    p.add_argument("--candidates", action="store_true", help="--parts handover: run the hand-over candidates first")
    p.add_argument(
        "--data",
        help="an image folder (or any data spec): run the defaults' table on it instead "
        "(bench/table1_data.py); needs --test-data",
    )
    p.add_argument("--test-data", help="with --data: the held-out split for the probes")
    p.add_argument("--limit", type=positive_int, help="with --data: only the first N training samples")
    p.add_argument("--epochs", type=positive_int, default=8, help="with --data: epochs of every arm")
    p.add_argument("--method", default="byol", help="with --data: the method (its 100%% arm and the hand-over)")
    p.add_argument("--prior-sizes", type=positive_int, nargs="*", default=[],
                   help="with --data: also RELA alone at 20%% with the prior converted at these input sizes")
    p.add_argument(
        "--tuned-baseline",
        action="store_true",
        help="with --data: also BYOL-100 at the setting the sweep chose on Fashion-MNIST; the goals use the better",
    )
    p.add_argument("--arms", nargs="*", default=[], help="with --data: only these arms (e.g. byol-100 half-50)")
    p.add_argument("--local-crops", type=int, help="with --data --method dino: DINO's local crops in every arm")
    p.add_argument("--old-default", action="store_true",
                   help="with --data: also the earlier phase default (scaled rule, window 0.2:0.6)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.data:
        args.seeds = args.seeds or 2
        return data_part(args, p)
    args.seeds = args.seeds or 1
    if "methods" not in args.parts:
        args.methods = []
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
    results = {"parts": args.parts}
    if "byol" in args.parts:
        results |= byol_part(args, stores)
    if args.methods:
        results |= methods_part(args, stores, results.get("floors") or floors(args))
    if "handover" in args.parts:
        results |= handover_part(args, stores, results.get("floors") or floors(args))
    path = args.out / ("results.json" if set(args.parts) == set(PARTS) else f"results-{'-'.join(args.parts)}.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"\nplots and {path.name} in {args.out}; benchmark wall {time.perf_counter() - t0:.0f}s "
          "(CPU only; no GPU measured)")


def data_part(args, parser) -> None:
    """`--data FOLDER --test-data FOLDER`: the defaults' table on the user's data (bench/table1_data.py)."""
    from bench import table1_data

    if not args.test_data:
        parser.error("--data needs --test-data (the split the linear and kNN probes are scored on)")
    if args.out == parser.get_default("out"):
        data = Path(args.data.rstrip("/"))
        name = (data.parent.name if data.name in ("train", "training") else data.name).replace(":", "-")
        name += "" if args.method == "byol" else f"-{args.method}"
        name += "" if args.local_crops is None else f"-local{args.local_crops}"
        args.out = Path("bench/out/table1-data") / name
    torch.set_num_threads(args.threads)
    print(f"device: {device_line()}; torch threads {args.threads}")
    t0 = time.perf_counter()
    table1_data.run(args)
    print(f"\nresults.json in {args.out}; benchmark wall {time.perf_counter() - t0:.0f}s (CPU only; no GPU measured)")


def byol_part(args, stores: dict) -> dict:
    """The baseline sweep, BYOL's priors × budgets table, the switch modes and the earlier run's choices."""
    args.best, args.tuned = {"min_scale": args.min_scale, "lr": args.lr}, {}  # the sweep's arms set both
    if not args.no_sweep:
        args.best = e2e.sweep(args, stores)
    args.tuned = {"ssl_views": f"byol,scale={args.best['min_scale']}:1", "lr": args.best["lr"]}
    args.byol100 = "byol-100" if args.no_sweep else f"sweep-scale{args.best['min_scale']}-lr{args.best['lr']:g}"
    arms = byol_arms(args)
    run_arms({"byol-100": arms["byol-100"]}, args, stores, 1)
    stores["student"] = student_store(args)
    rows = run_arms(arms, args, stores, args.seeds)
    floor = floors(args)
    print("\nfloors and priors' own features:", json.dumps(floor))
    print("\nBYOL, linear / kNN top-1 (total seconds relative to BYOL-100):\n" + byol_table(rows))
    plot(rows, "byol", floor, args.out / "byol.png")
    switch = run_arms(own_dirs(SWITCH_ARMS), args, stores, args.seeds)
    print("\nthe switch (Lite0 50%; fixed:0.5 is the table's) and the reference BYOL loop:\n"
          + e2e.table([r for r in rows if r["arm"] in ("byol-100", "rela-lite0-50")] + switch))
    balanced = earlier_choices(args, stores)
    print("\nthe earlier run's choices on BYOL-100 (linear / kNN weighted / kNN majority vote, mean over seeds):")
    for name, rs in (("first 5k images (the table's)", [r for r in rows if r["arm"] == "byol-100"]),
                     ("class-balanced 5k subset", balanced)):
        print(f"  {name}: {cell(rs, 'linear')} / {cell(rs, 'knn')} / {cell(rs, 'knn_majority')}")
    return {"byol": rows, "floors": floor, "switch": switch, "balanced": balanced, "sweep_best": args.best}


def methods_part(args, stores: dict, floor: dict) -> dict:
    """Each other method in turn: its lr sweep, then its arms (method_arms) at its best lr; a plot each."""
    args.tuned = {}  # the methods' arms set their own lr and views
    best_lr, rows = {}, []
    for m in args.methods:  # one method at a time, so an interrupted run leaves whole methods behind
        best_lr[m] = tune_method(m, args, stores)
        rows += run_arms(method_arms(m, best_lr[m]), args, stores, args.method_seeds)
    print("\nother methods (each at its own best lr: " + ", ".join(f"{m} {lr:g}" for m, lr in best_lr.items())
          + "), linear top-1 (total relative to the method's 100%):\n" + method_table(rows, args.methods))
    for m in args.methods:
        plot([r for r in rows if r["arm"].startswith((f"{m}-", f"rela-{m}-"))], m, floor, args.out / f"{m}.png")
    return {"methods": rows, "method_lr": best_lr}


if __name__ == "__main__":
    main()
