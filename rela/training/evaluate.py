"""Evaluation of a frozen backbone: a converged linear probe, the reference code's probe, and kNN.

Features of the un-augmented training and test images are computed once, standardised with the
training set's mean and std, and probed:

- `lbfgs` (the default): multinomial logistic regression with an L2 penalty, fitted full-batch by
  L-BFGS to convergence — scikit-learn's default `LogisticRegression` (C = 1: minimise
  C·Σ cross-entropy + ½‖W‖², intercept unpenalised), in float64, deterministic. A probe that is
  not converged measures the optimiser, not the features: the reference protocol below read
  6.8 points low on random features and 3.2 on BYOL's (Fashion-MNIST, 10k images) and little on
  strong features, which inflated RELA's margin.
- `adam`: the reference code's protocol — a linear layer trained with Adam (lr 3e-4) for 100
  epochs, mini-batches of 64; the reported top-1 is the mean of the last 3 epochs.
- kNN: k = 20 nearest training features by cosine similarity, votes weighted by exp(sim / 0.07)
  (the usual SSL kNN monitor, Wu et al. 2018).

`evaluate_run` (`rela eval RUN`) runs both on a run's final backbone and writes RUN/eval.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rela.data.datasets import RelaDataset, open_dataset
from rela.distributed import resolve_device
from rela.errors import RelaError
from rela.models import build_backbone
from rela.training.eval_options import EvalOptions
from rela.training.run import (
    CHECKPOINT,
    config_from_run,
    default_test_data,
    load_checkpoint,
)


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: RelaDataset, image_size: int, batch_size: int = 512,
                     num_workers: int | None = None, progress: bool = False, desc: str = "features",
                     mean=None, std=None, device: torch.device | str = "cpu",
                     on_error: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels (on the CPU) of every sample under the eval view (resize +
    centre crop), computed on `device`. With on_error="skip", undecodable samples are left out
    (the loader's replacement would count its sample twice)."""
    from tqdm.auto import tqdm

    from rela.loading.loader import Loader

    loader = Loader(dataset, batch_size, views="eval", image_size=image_size, shuffle=False, drop_last=False,
                    num_workers=num_workers, mean=mean, std=std, device=device, on_error=on_error,
                    rank=0, world_size=1)  # every sample, also when called on one rank of several
    was_training = backbone.training
    backbone.eval()
    feats, labels, index = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        feats.append(backbone(batch["views"][0]).float().cpu())
        labels.append(batch["label"].cpu())
        index.append(batch["index"].cpu())
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if loader.skipped:  # a replacement repeats the sample after it: keep each sample once
        _, first = np.unique(torch.cat(index).numpy(), return_index=True)
        keep = torch.from_numpy(np.sort(first))
        feats, labels = feats[keep], labels[keep]
    return feats, labels


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024, vote: str = "weighted") -> float:
    """kNN top-1 on cosine similarity; `vote="weighted"` (InstDisc's, lightly's benchmarks': weights
    exp(sim / T)) or `"majority"` (one vote per neighbour, ties to the lowest class)."""
    return knn_votes(train_x, train_y, test_x, test_y, k, temperature, chunk, votes=(vote,))[vote]


def knn_votes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              k: int = 20, temperature: float = 0.07, chunk: int = 1024,
              votes: tuple[str, ...] = ("weighted", "majority")) -> dict[str, float]:
    """kNN top-1 under each vote in `votes` from one neighbour search (see knn_accuracy)."""
    if bad := [v for v in votes if v not in ("weighted", "majority")]:
        raise RelaError(f"unknown kNN vote {bad[0]!r}: use weighted or majority")
    train_x = nn.functional.normalize(train_x.float(), dim=1)
    test_x = nn.functional.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = dict.fromkeys(votes, 0)
    for s in range(0, len(test_x), chunk):
        top, idx = (test_x[s:s + chunk] @ train_x.T).topk(k, dim=1)
        for vote in votes:
            weight = (top / temperature).exp() if vote == "weighted" else torch.ones_like(top)
            tally = torch.zeros(len(top), classes).scatter_add_(1, train_y[idx], weight)
            correct[vote] += int((tally.argmax(1) == test_y[s:s + chunk]).sum())
    return {vote: n / len(test_x) for vote, n in correct.items()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 probe: str = "lbfgs", **options) -> dict:
    """Fit a linear classifier on frozen features with the `lbfgs` (default) or `adam` protocol;
    returns the test top-1 as "top1" and the protocol's settings as "protocol"."""
    probes = {"lbfgs": lbfgs_probe, "adam": adam_probe}
    if probe not in probes:
        raise RelaError(f"unknown probe {probe!r}: use lbfgs (converged logistic regression) or adam (the reference's)")
    return probes[probe](train_x, train_y, test_x, test_y, **options)


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor, dtype=torch.float32):
    train_x, test_x = train_x.to(dtype), test_x.to(dtype)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mu) / sd, (test_x - mu) / sd


MAX_LBFGS_BYTES = 16 << 30  # full-batch float64: fine up to ~1M × 1024; ImageNet × 2048 is 21 GB


def lbfgs_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6, standardize: bool = True) -> dict:
    """Multinomial logistic regression, L2 penalty ½‖W‖²/C on the summed loss (scikit-learn's
    default `LogisticRegression`), full-batch L-BFGS with a strong-Wolfe line search, float64.
    Stops when the gradient's largest entry is below `tol` (converged) or after `max_iter`."""
    if C <= 0:
        raise RelaError(f"the probe's C must be positive, got {C}")
    need = 2 * train_x.shape[0] * train_x.shape[1] * 8  # float64 features + their standardised copy
    if need > MAX_LBFGS_BYTES:
        raise RelaError(f"the L-BFGS probe would hold {need / 2**30:.1f} GiB of float64 features "
                        f"({train_x.shape[0]} x {train_x.shape[1]}); use --probe adam (mini-batches) at this size")
    if standardize:
        train_x, test_x = _standardize(train_x, test_x, torch.float64)
    x, y = train_x.double(), train_y.long()
    n = len(x)
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:  # (C·Σ loss + ½‖W‖²) / (C·n): the same minimiser, O(1) values
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + (w * w).sum() / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
        loss = objective()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    with torch.no_grad():
        top1 = float(((test_x.double() @ w + b).argmax(1) == test_y).double().mean())
        train_top1 = float(((x @ w + b).argmax(1) == y).double().mean())
    iterations = int(opt.state[w]["n_iter"])  # LBFGS keeps its state under the first parameter
    return {
        "top1": top1,
        "final": top1,
        "train_top1": train_top1,
        "loss": float(loss.detach()),
        "iterations": iterations,
        "max_grad": grad,
        "converged": grad <= tol,
        "protocol": {"probe": "lbfgs", "C": C, "max_iter": max_iter, "tol": tol, "standardize": standardize},
    }


def adam_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               epochs: int = 100, lr: float = 3e-4, batch_size: int = 64, seed: int = 0,
               last: int = 3, standardize: bool = True) -> dict:
    """The reference code's probe: a linear layer trained with Adam on frozen features; returns
    the mean test top-1 of the last `last` epochs, the final one, and the per-epoch curve."""
    if standardize:
        train_x, test_x = _standardize(train_x, test_x)
    g = torch.Generator().manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(train_x.shape[1], classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    curve = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for s in range(0, len(order), batch_size):
            i = order[s:s + batch_size]
            loss = nn.functional.cross_entropy(head(train_x[i]), train_y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            curve.append(float((head(test_x).argmax(1) == test_y).float().mean()))
    return {"top1": float(np.mean(curve[-last:])), "final": curve[-1], "curve": curve,
            "protocol": {"probe": "adam", "epochs": epochs, "lr": lr, "batch_size": batch_size, "last": last,
                         "standardize": standardize}}


def evaluate_run(run: str | Path, *, probe: str = EvalOptions.probe, probe_epochs: int = EvalOptions.probe_epochs,
                 C: float = EvalOptions.C, k: int = EvalOptions.k, test_data=EvalOptions.test_data,
                 progress: bool = True, train_data=None, skip_corrupt: bool | None = EvalOptions.skip_corrupt) -> dict:
    """Linear probe (`probe`: lbfgs or adam) and kNN of a run's final backbone; written to RUN/eval.json.
    `skip_corrupt` (default: the run's own setting) leaves undecodable images out of both splits."""
    run = Path(run)
    cfg = config_from_run(run)
    if not (run / CHECKPOINT).exists():
        raise RelaError(f"{run} has no {CHECKPOINT} yet: its first epoch has not finished. Evaluate it once "
                        f"rela train has written one (or resume it: rela train --resume --out {run} ...)")
    state = load_checkpoint(run / CHECKPOINT)
    on_error = "skip" if (cfg.skip_corrupt if skip_corrupt is None else skip_corrupt) else "raise"
    device = resolve_device(cfg.device)
    backbone = build_backbone(cfg.arch, cfg.width)  # the run's heads are not needed
    backbone.load_state_dict(state["backbone"])
    backbone.to(device)
    test_name = test_data or cfg.test_data or default_test_data(cfg.data)
    if test_name is None:
        raise RelaError(f"no test split known for {cfg.data!r}: pass --test-data")
    t0 = time.perf_counter()
    train_x, train_y = extract_features(
        backbone,
        open_dataset(cfg.data if train_data is None else train_data, cfg.limit, cfg.exif_transpose),
        cfg.image_size,
        progress=progress,
        desc="train features",
        device=device,
        on_error=on_error,
    )
    test_x, test_y = extract_features(
        backbone,
        open_dataset(test_name, exif_transpose=cfg.exif_transpose),
        cfg.image_size,
        progress=progress,
        desc="test features",
        device=device,
        on_error=on_error,
    )
    options = {"C": C} if probe == "lbfgs" else {"epochs": probe_epochs, "seed": cfg.seed}
    result = linear_probe(train_x, train_y, test_x, test_y, probe=probe, **options)
    knn = knn_votes(train_x, train_y, test_x, test_y, k=k)
    out = {
        "run": str(run),
        "epochs_trained": state["epoch"] + 1,
        "linear_top1": result["top1"],
        "linear_final": result["final"],
        "knn_top1": knn["weighted"],
        "knn_majority_top1": knn["majority"],
        "k": k,
        "probe": result["protocol"],
        "linear_curve": result.get("curve"),
        "probe_converged": result.get("converged"),
        "probe_iterations": result.get("iterations"),
        "test_data": test_name if isinstance(test_name, str) else open_dataset(test_name).kind,
        "train_samples": len(train_x),
        "test_samples": len(test_x),
        "eval_seconds": time.perf_counter() - t0,
    }
    (run / "eval.json").write_text(json.dumps(out, indent=1))
    return out
