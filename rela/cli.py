"""The `rela` command (also `python -m rela`)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path

from rela.data.convert_options import ConvertOptions
from rela.data.pack_options import PackOptions
from rela.data.prior_options import PriorOptions
from rela.errors import RelaError, RelaWarning
from rela.options import add_arguments, from_args, positive_int
from rela.training.eval_options import EvalOptions
from rela.training.run import TrainConfig


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
    add_arguments(c, ConvertOptions)
    add_arguments(c.add_argument_group("prior options"), PriorOptions)
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    k = sub.add_parser("pack", help="write a dataset as WebDataset tar shards (KEY.jpg + KEY.cls)",
                       description="Write any dataset rela opens as WebDataset shards, in its order with its labels: "
                       "JPEGs keep their bytes (unless --max-side shrinks them), other images are encoded at "
                       "--quality. Killed runs resume after their last finished shard; the same data and options "
                       "give the same bytes. Read them back with --data 'OUT/*.tar'.")
    add_arguments(k, PackOptions)
    k.add_argument("--quiet", action="store_true", help="no progress bars")

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
    add_arguments(t, TrainConfig)
    t.add_argument("--no-rela", action="store_true", help="plain SSL baseline (no prior, no RELA phase)")
    t.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--auto-resume", action="store_true",
                   help="continue the run in --out if it has a checkpoint, else start it (for torchrun "
                   "--max-restarts and schedulers that rerun the same command)")
    t.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    x = sub.add_parser("export", help="write a trained run's backbone as a prior (student:FILE)",
                       description="Write a run's final backbone to a safetensors file with its architecture and "
                       "preprocessing in the metadata, to use as the next prior: rela convert --prior student:FILE.")
    x.add_argument("run", help="run directory from rela train")
    x.add_argument("--out", required=True, help="the .safetensors file to write")

    e = sub.add_parser("eval", help="linear probe and kNN of a trained run",
                       description="Linear probe on frozen, standardised features — by default a converged "
                       "L2 logistic regression (full-batch L-BFGS, scikit-learn's default C=1), or the reference "
                       "code's Adam protocol (--probe adam: Adam 3e-4, 100 epochs, mean of the last 3 epochs) — "
                       "and kNN (k=20, cosine). Writes RUN/eval.json.")
    e.add_argument("run", help="run directory from rela train")
    add_arguments(e, EvalOptions)
    e.add_argument("--skip-corrupt", action=argparse.BooleanOptionalAction, default=None,
                   help=EvalOptions.__dataclass_fields__["skip_corrupt"].metadata["help"])  # tri-state: by hand
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--quiet", action="store_true")
    return p


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from rela.training.train import train

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = from_args(TrainConfig, a, **({"prior": None, "phase": "off"} if a.no_rela else {}))
    s = train(cfg, resume="auto" if a.auto_resume else a.resume, overwrite=a.overwrite, progress=not a.quiet)
    from rela import distributed as dist_util

    if not dist_util.is_main():
        return 0
    sw = s["switch"]
    print(
        f"run        {a.out}\n"
        f"steps      {s['steps']} ({s['images_seen']} images), median {1000 * s['median_step_seconds']:.0f} ms/step\n"
        f"seconds    training {s['train_seconds']:.1f} + conversion {s['conversion_seconds']:.1f} "
        f"= {s['total_seconds']:.1f}"
        f" (conversion {100 * s['conversion_seconds'] / max(s['total_seconds'], 1e-9):.1f}% of the run)\n"
        f"phase      {s['phase']}\n"
        f"switch     "
        + (
            f"step {sw['step']} (epoch {sw['epoch']}), rho {sw['rho']:.4f}"
            + (f", kNN {sw['knn_top1']:.4f}" if "knn_top1" in sw else "")
            if sw
            else "none"
        )
        + "\n"
        f"next       rela eval {a.out}"
    )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from rela.training.evaluate import evaluate_run

    r = evaluate_run(a.run, **dataclasses.asdict(from_args(EvalOptions, a, skip_corrupt=a.skip_corrupt)),
                     progress=not a.quiet)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    p = r["probe"]
    how = (f"L-BFGS logistic regression, C={p['C']}, {r['probe_iterations']} iterations"
           + ("" if r["probe_converged"] else ", NOT converged") if p["probe"] == "lbfgs"
           else f"Adam, mean of last {p['last']} of {p['epochs']} epochs; final {r['linear_final']:.4f}")
    print(f"run        {r['run']} ({r['epochs_trained']} epochs)\n"
          f"linear     top-1 {r['linear_top1']:.4f} ({how})\n"
          f"kNN        top-1 {r['knn_top1']:.4f} (k={r['k']}, weighted; majority vote {r['knn_majority_top1']:.4f})\n"
          f"data       {r['train_samples']} train / {r['test_samples']} test ({r['test_data']})")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from rela.training.run import export_student

    out = export_student(a.run, a.out)
    print(f"wrote {out}\nuse it   rela convert --prior student:{out} ...")
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from rela.data.pack import journal, pack

    o = dataclasses.asdict(from_args(PackOptions, a))
    shards = pack(o.pop("data"), o.pop("out"), **o, progress=not a.quiet)
    done = journal(a.out)
    size = sum(s["bytes"] for s in done["shards"]) / 2**20
    print(f"wrote    {len(shards)} shards, {done['samples']} samples, {size:.1f} MB in {a.out}"
          + (f" ({len(done['skipped'])} undecodable left out, listed in pack.json)" if done["skipped"] else ""))
    where = f"{a.out.rstrip('/')}/" if a.out.startswith("s3://") else f"{Path(a.out) / '*.tar'}"
    print(f"use it   rela train --data '{where}' ...")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from rela.data.convert import convert

    o = dataclasses.asdict(from_args(ConvertOptions, a))
    o["resume"] = True if o["resume"] else None  # the flag insists; without it a found conversion resumes
    store = convert(o.pop("data"), o.pop("prior"), o.pop("out"), **o, progress=not a.quiet,
                    **dataclasses.asdict(from_args(PriorOptions, a)))
    from rela import distributed as dist_util

    if dist_util.is_main():
        print(store.summary())
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from rela.data.store import TargetStore

    store = TargetStore.open(a.store)
    if a.json:
        st = store.stats()
        out = {"manifest": store.manifest,
               "stats": {"rows": st["rows"], "nan": st["nan"], "inf": st["inf"],
                         "mean": st["mean"].tolist(), "std": st["std"].tolist()}}
        print(json.dumps(out, indent=1))
    else:
        print(store.summary())
    return 0


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then rerun the same command (a conversion resumes from its last "
                  "committed chunk, training with --resume from its last checkpoint)",
    errno.EDQUOT: "the disk quota is used up: free space, then rerun the same command",
    errno.EACCES: "no permission: choose a folder you can write to (--out) or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write to (--out) or fix its permissions",
    errno.EROFS: "that file system is read-only: choose another folder (--out)",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.ENOENT: "check the path",
}


def _os_error(e: OSError) -> str:
    """An environment problem (permissions, a full disk, a path) as one line: what, where, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    hint = _OS_HINTS.get(e.errno)
    return f"{where}{e.strerror or e}" + (f"; {hint}" if hint else "")


class _Terminated(Exception):
    """SIGTERM: torchrun ends the other ranks this way when one of them fails."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def _one_line_warnings() -> None:
    """rela's own warnings as one line each, like its errors; other libraries' keep Python's form."""
    import warnings

    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, RelaWarning):
            return f"rela: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (WORLD_SIZE > 1), `convert` and `train` join the process group first."""
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    joined, dist_util = False, None
    try:
        if args.command in ("convert", "train"):
            from rela import distributed as dist_util  # imports torch: not for --help or info

            if dist_util.launched():  # a rank the launcher stops still says why, in one line
                import signal

                signal.signal(signal.SIGTERM, _on_sigterm)
            joined = dist_util.init(args.device)
        code = {"convert": cmd_convert, "pack": cmd_pack, "info": cmd_info, "train": cmd_train, "eval": cmd_eval,
                "export": cmd_export}[args.command](args)
    except RelaError as e:
        rank, world = dist_util.rank_world() if dist_util else (0, 1)
        where = f" (rank {rank} of {world})" if world > 1 else ""
        print(f"rela: error{where}: {e}", file=sys.stderr, flush=True)
        return 2  # no clean-up collective: peers may be stuck elsewhere; torchrun stops them
    except KeyboardInterrupt:
        print("rela: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"rela: error: {_os_error(e)}", file=sys.stderr, flush=True)
        return 2
    except _Terminated:
        rank, world = dist_util.rank_world() if dist_util else (0, 1)
        print(f"rela: error (rank {rank} of {world}): stopped by the launcher (SIGTERM): another rank stopped "
              "(its error is above) or the job was cancelled", file=sys.stderr, flush=True)
        return 143
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
