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
    c.add_argument("--workers", type=int, help="decode worker processes (default: 2, 0 for small data)")
    c.add_argument("--skip-corrupt", action="store_true",
                   help="record undecodable samples as skipped instead of stopping")
    c.add_argument("--resume", action="store_true", help="require an interrupted conversion to resume")
    c.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    c.add_argument("--keep-raw", action="store_true", help="keep raw prior features in OUT/.convert")
    c.add_argument("--deep", action="store_true", help="fingerprint file contents, not just names and sizes")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow weights files that contain pickled Python objects (runs their code!)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="print a store's manifest and target statistics",
                       description="Print a target store's manifest and per-component statistics.")
    i.add_argument("store", help="store directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def cmd_convert(a: argparse.Namespace) -> int:
    from rela.convert import convert

    store = convert(
        a.data, a.prior, a.out, dim=a.dim, limit=a.limit, batch_size=a.batch_size,
        chunk_rows=a.chunk_rows, num_workers=a.workers, skip_corrupt=a.skip_corrupt,
        resume=True if a.resume else None, overwrite=a.overwrite, keep_raw=a.keep_raw,
        deep=a.deep, progress=not a.quiet, arch=a.arch, weights=a.weights,
        input_size=a.input_size, mean=a.mean, std=a.std, seed=a.seed, trust_pickle=a.trust_pickle,
    )
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
        f"cost       {cost.get('seconds')} s ({cost.get('images_per_second')} img/s extraction)",
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
    args = build_parser().parse_args(argv)
    try:
        return {"convert": cmd_convert, "info": cmd_info}[args.command](args)
    except RelaError as e:
        print(f"rela: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rela: interrupted", file=sys.stderr)
        return 130
