"""The `rela` command (also `python -m rela`)."""

from __future__ import annotations

import argparse
import json
import sys

from rela.errors import RelaError


def _floats3(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return tuple(parts)


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rela",
        description="RELA: convert a dataset into prior-model targets, then train faster with them.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser(
        "convert", help="run a prior over a dataset and write a whitened target store (ReLA-D)",
        description="Run a prior model once over a dataset and write one PCA-whitened float16 target "
        "per sample. Killed runs resume from their last committed chunk when rerun with the same "
        "arguments; the result is bit-identical to an uninterrupted run.",
    )
    c.add_argument("--data", required=True, help="fashion-mnist[:train|:test], an image folder, or an .npz")
    c.add_argument("--prior", required=True,
                   help="efficientnet-lite0 | random:<arch> | torchvision:<arch> | torchscript:<path> | state_dict:<path>")
    c.add_argument("--out", required=True, help="store directory to create")
    c.add_argument("--dim", type=_positive_int, default=256, help="PCA components to keep (default 256)")
    c.add_argument("--limit", type=_positive_int, help="use only the first N samples")
    c.add_argument("--arch", help="architecture for state_dict:<path> priors (torchvision name or efficientnet-lite0)")
    c.add_argument("--weights", help="local weights file for torchvision:<arch> priors")
    c.add_argument("--input-size", type=_positive_int, help="prior input resolution (default: the prior's own)")
    c.add_argument("--mean", type=_floats3, help="override normalisation mean, e.g. 0.485,0.456,0.406")
    c.add_argument("--std", type=_floats3, help="override normalisation std")
    c.add_argument("--seed", type=int, default=0, help="seed for random:<arch> priors (default 0)")
    c.add_argument("--batch-size", type=_positive_int, default=256)
    c.add_argument("--chunk-rows", type=_positive_int, default=4096, help="rows per committed chunk")
    c.add_argument("--workers", type=int, help="decode worker processes per rank (default: 2, fewer if the node has fewer cores "
                   "per rank; 0 for small or in-memory data)")
    c.add_argument("--skip-corrupt", action="store_true",
                   help="record undecodable samples as skipped instead of stopping")
    c.add_argument("--resume", action="store_true", help="require an interrupted conversion to resume")
    c.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    c.add_argument("--keep-raw", action="store_true", help="keep raw prior features in OUT/.convert")
    c.add_argument("--deep", action="store_true", help="fingerprint file contents, not just names and sizes")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow weights files that contain pickled Python objects (runs their code!)")
    c.add_argument("--device", default="auto",
                   help="where the prior runs: auto (this rank's GPU when there is one) | cpu | cuda[:N]")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="print a store's manifest and target statistics",
                       description="Print a target store's manifest and per-component statistics.")
    i.add_argument("store", help="store directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    t = sub.add_parser(
        "train", help="self-supervised training with the RELA phase (ReLA-F)",
        description="Train a student with the RELA phase (regress prior targets on a dynamic subset) "
        "handing over to a self-supervised method. Builds the target store if needed, logs per step "
        "to RUN/steps.csv, checkpoints every epoch; --resume continues exactly.",
    )
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist[:train], an image folder, or an .npz")
    t.add_argument("--prior", default="efficientnet-lite0",
                   help="a prior spec (efficientnet-lite0, random:<arch>, ...) converted into RUN/store, or a STORE directory")
    t.add_argument("--no-rela", action="store_true", help="plain SSL baseline (no prior, no RELA phase)")
    t.add_argument("--budget", type=float, default=1.0, help="fraction of the data visited per epoch (0, 1]")
    t.add_argument("--method", default="byol", help="self-supervised method (byol)")
    t.add_argument("--arch", default="resnet18-cifar", help="resnet18|34|50[-cifar]")
    t.add_argument("--width", type=float, default=0.125, help="width multiplier of the student")
    t.add_argument("--epochs", type=_positive_int, default=20)
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="global batch (default 128); under torchrun each rank takes an equal share")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--phase", default="adaptive", help="adaptive (default) | fixed:<fraction> | blend (see README)")
    t.add_argument("--image-size", type=_positive_int, default=32)
    t.add_argument("--dim", type=_positive_int, help="target dim when converting (default: student feature dim)")
    t.add_argument("--prior-input-size", type=_positive_int, help="prior resolution when converting")
    t.add_argument("--limit", type=_positive_int, help="use only the first N training samples")
    t.add_argument("--test-data", help="test split for the switch probe and eval (default: fashion-mnist:test)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, help="loader workers per rank (default: 0 for in-memory data, else 2, fewer if the node "
                   "has fewer cores per rank)")
    t.add_argument("--backend", default="auto", help="loader backend: auto | torch | dali | ffcv")
    t.add_argument("--policy", default="uniform", help="subset policy: uniform | scored")
    t.add_argument("--freeze-transfer", action="store_true", help="frozen random transfer head (reference code)")
    t.add_argument("--momentum", type=float, default=0.99, help="BYOL EMA momentum")
    t.add_argument("--cosine-momentum", action="store_true", help="cosine momentum schedule up to 1")
    t.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    t.add_argument("--device", default="auto",
                   help="auto (cuda when available; under torchrun each rank's own GPU) | cpu | cuda[:N]")
    t.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across ranks under torchrun (CUDA only)")
    t.add_argument("--switch-threshold", type=float, default=0.995,
                   help="adaptive phase: switch once rho reaches this (default 0.995, the reference's)")
    t.add_argument("--out", required=True, help="run directory")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--auto-resume", action="store_true",
                   help="continue the run in --out if it has a checkpoint, else start it (for torchrun "
                   "--max-restarts and schedulers that rerun the same command)")
    t.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="linear probe and kNN of a trained run",
                       description="Linear probe on frozen features (Adam 3e-4, 100 epochs, mean of the "
                       "last 3 epochs' test top-1) and kNN (k=20, cosine). Writes RUN/eval.json.")
    e.add_argument("run", help="run directory from rela train")
    e.add_argument("--probe-epochs", type=_positive_int, default=100)
    e.add_argument("--k", type=_positive_int, default=20)
    e.add_argument("--test-data", help="test split (default: the run's, or fashion-mnist:test)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--quiet", action="store_true")
    return p


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from rela.train import TrainConfig, train

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(
        data=a.data, out=a.out, prior=None if a.no_rela else a.prior, budget=a.budget, method=a.method,
        arch=a.arch, width=a.width, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        weight_decay=a.weight_decay, phase="off" if a.no_rela else a.phase, image_size=a.image_size, dim=a.dim,
        prior_input_size=a.prior_input_size, limit=a.limit, test_data=a.test_data, seed=a.seed,
        num_workers=a.workers, backend=a.backend, policy=a.policy, freeze_transfer=a.freeze_transfer,
        momentum=a.momentum, cosine_momentum=a.cosine_momentum, device=a.device, sync_bn=a.sync_bn,
        switch_threshold=a.switch_threshold,
    )
    s = train(cfg, resume="auto" if a.auto_resume else a.resume, overwrite=a.overwrite, progress=not a.quiet)
    from rela import distributed as dist_util

    if not dist_util.is_main():
        return 0
    sw = s["switch"]
    print(f"run        {a.out}\n"
          f"steps      {s['steps']} ({s['images_seen']} images), median {1000 * s['median_step_seconds']:.0f} ms/step\n"
          f"seconds    training {s['train_seconds']:.1f} + conversion {s['conversion_seconds']:.1f} = {s['total_seconds']:.1f}\n"
          f"switch     " + (f"step {sw['step']} (epoch {sw['epoch']}), rho {sw['rho']:.4f}"
                             + (f", kNN {sw['knn_top1']:.4f}" if "knn_top1" in sw else "") if sw else "none") + "\n"
          f"next       rela eval {a.out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from rela.train import evaluate_run

    r = evaluate_run(a.run, probe_epochs=a.probe_epochs, k=a.k, test_data=a.test_data, progress=not a.quiet)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"run        {r['run']} ({r['epochs_trained']} epochs)\n"
              f"linear     top-1 {r['linear_top1']:.4f} (mean of last 3 of {r['probe_epochs']} epochs; final {r['linear_final']:.4f})\n"
              f"kNN        top-1 {r['knn_top1']:.4f} (k={r['k']})\n"
              f"data       {r['train_samples']} train / {r['test_samples']} test ({r['test_data']})")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from rela.convert import convert

    store = convert(
        a.data, a.prior, a.out, dim=a.dim, limit=a.limit, batch_size=a.batch_size,
        chunk_rows=a.chunk_rows, num_workers=a.workers, skip_corrupt=a.skip_corrupt,
        resume=True if a.resume else None, overwrite=a.overwrite, keep_raw=a.keep_raw,
        deep=a.deep, progress=not a.quiet, arch=a.arch, weights=a.weights,
        input_size=a.input_size, mean=a.mean, std=a.std, seed=a.seed, trust_pickle=a.trust_pickle,
        device=a.device,
    )
    from rela import distributed as dist_util

    if dist_util.is_main():
        print(summary(store))
    return 0


def summary(store) -> str:
    m = store.manifest
    st = store.stats()
    cost = m.get("cost", {})
    lines = [
        f"store      {store.path}",
        f"dataset    {m['dataset'].get('kind')} n={m['n']} digest={m['dataset']['digest'][:16]}",
        f"prior      {m['prior'].get('name')} ({m['prior'].get('arch')}) sha256={m['prior'].get('weights_sha256', '')[:16]}",
        f"input      {m['preprocessing']['input_size']} px, mean={m['preprocessing']['mean']} std={m['preprocessing']['std']}",
        f"targets    [{m['n']}, {m['dim']}] float16 from {m['raw_dim']}-d features, "
        f"explained variance {m['whitening']['explained_variance_ratio']:.3f}",
        f"skipped    {len(m['skipped'])}",
        f"stats      component mean in [{st['mean'].min():+.4f}, {st['mean'].max():+.4f}], "
        f"std in [{st['std'].min():.4f}, {st['std'].max():.4f}], NaN {st['nan']}, inf {st['inf']}",
        f"cost       {cost.get('seconds')} s ({cost.get('images_per_second')} img/s extraction"
        + (f"; {cost['processes']} processes, {cost['process_seconds']} process-s" if cost.get("processes", 1) > 1 else "")
        + (f"; prior on {cost['device']}" if "device" in cost else "") + ")",
        f"created    {m['created']} by rela {m['library']['version']}",
    ]
    return "\n".join(lines)


def cmd_info(a: argparse.Namespace) -> int:
    from rela.store import TargetStore

    store = TargetStore.open(a.store)
    if a.json:
        st = store.stats()
        out = {"manifest": store.manifest,
               "stats": {"rows": st["rows"], "nan": st["nan"], "inf": st["inf"],
                         "mean": st["mean"].tolist(), "std": st["std"].tolist()}}
        print(json.dumps(out, indent=1))
    else:
        print(summary(store))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (WORLD_SIZE > 1), `convert` and `train` join the process group first."""
    args = build_parser().parse_args(argv)
    joined, dist_util = False, None
    try:
        if args.command in ("convert", "train"):
            from rela import distributed as dist_util  # imports torch: not for --help or info

            joined = dist_util.init(args.device)
        code = {"convert": cmd_convert, "info": cmd_info, "train": cmd_train, "eval": cmd_eval}[args.command](args)
    except RelaError as e:
        rank, world = dist_util.rank_world() if dist_util else (0, 1)
        where = f" (rank {rank} of {world})" if world > 1 else ""
        print(f"rela: error{where}: {e}", file=sys.stderr, flush=True)
        return 2  # no clean-up collective: peers may be stuck elsewhere; torchrun stops them
    except KeyboardInterrupt:
        print("rela: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not (dist_util and dist_util.active() and dist_util.lost_peer(e)):
            raise
        rank, world = dist_util.rank_world()
        print(f"rela: error (rank {rank} of {world}): another rank stopped (its error is above); "
              f"this rank's collective failed: {str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
        return 3
    if joined:
        dist_util.shutdown()
    return code
