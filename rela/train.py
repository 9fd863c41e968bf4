"""`rela train`: self-supervised training with the RELA phase (ReLA-F), resumable and logged.

One run directory holds everything: `config.json`, `store/` (when the prior had to be converted),
`checkpoint.pt` (every epoch; written atomically; loaded with `weights_only=True`), `steps.csv`
(per step: loss, RELA and SSL losses, phase, λ, ρ, seconds), `epochs.csv`, `switch.json` (ρ and a
kNN probe at the switch) and `summary.json` (costs: conversion seconds, training seconds,
optimizer steps, images seen, median step time).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from rela.errors import RelaError


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"
    out: str = "runs/train"
    prior: str | None = "efficientnet-lite0"  # a prior spec, or a store directory; None = no RELA
    budget: float = 1.0
    method: str = "byol"
    arch: str = "resnet18-cifar"
    width: float = 0.125
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    phase: str = "adaptive"  # bench/end_to_end.py: the best arm at 50%; see the README
    image_size: int = 32
    dim: int | None = None  # target dim; default min(student feature dim, prior dim)
    prior_input_size: int | None = None
    limit: int | None = None
    test_data: str | None = None
    seed: int = 0
    num_workers: int | None = None
    backend: str = "auto"
    policy: str = "uniform"
    freeze_transfer: bool = False
    momentum: float = 0.99
    cosine_momentum: bool = False
    probe_at_switch: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise RelaError(f"--budget must be in (0, 1], got {self.budget}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RelaError("--epochs and --batch-size must be positive")
        from rela.accelerate import parse_phase
        from rela.ssl import METHODS

        parse_phase(self.phase)
        if self.method not in METHODS:
            raise RelaError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")

    @property
    def uses_rela(self) -> bool:
        return self.prior is not None and not self.phase.startswith("off")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RelaError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def default_test_data(data: str) -> str | None:
    return "fashion-mnist:test" if str(data).split(":")[0] == "fashion-mnist" else None


def _open_store(cfg: TrainConfig, dataset, feature_dim: int, progress: bool):
    """The target store: a given store directory (checked against the dataset), or a conversion
    into RUN/store (reused when complete, resumed when interrupted)."""
    from rela.convert import convert
    from rela.store import TargetStore

    path = Path(cfg.prior)
    if (path / "manifest.json").exists():
        store = TargetStore.open(path, dataset)
    else:
        from rela.priors import load_prior

        prior = load_prior(cfg.prior, input_size=cfg.prior_input_size, seed=cfg.seed)
        dim = min(cfg.dim or feature_dim, prior.dim)
        store = convert(dataset, prior, Path(cfg.out) / "store", dim=dim, progress=progress)
    return store, float(store.manifest.get("cost", {}).get("seconds", 0.0))


class _Log:
    """CSV per step (and TensorBoard when installed); on resume, rows after the checkpoint go."""

    COLUMNS = ("step", "epoch", "phase", "lam", "rho", "loss", "rela_loss", "ssl_loss", "seconds")

    def __init__(self, path: Path, keep_steps: int) -> None:
        rows = []
        if keep_steps and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < keep_steps]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=keep_steps)
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        if self.tb is not None:
            for key in ("loss", "rela_loss", "ssl_loss", "lam", "rho"):
                if isinstance(row[key], float) and not math.isnan(row[key]):
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _phase_name(lam: float) -> str:
    """What a step with RELA weight λ is, for the logs."""
    return "rela" if lam == 1 else "ssl" if lam == 0 else "blend"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold tensors, numbers, strings and view specs only: loaded with weights_only."""
    from rela.views import ViewSpec

    with torch.serialization.safe_globals([ViewSpec]):
        return torch.load(path, map_location="cpu", weights_only=True)


def build_student(cfg: TrainConfig):
    from rela.models import build_backbone
    from rela.ssl import build_method

    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed, whatever ran before
    backbone = build_backbone(cfg.arch, cfg.width)
    method = build_method(cfg.method, backbone, backbone.feature_dim, momentum=cfg.momentum,
                          cosine_momentum=cfg.cosine_momentum)
    return backbone, method


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          stop_after_steps: int | None = None) -> dict:
    """Train as configured; returns the summary (also written to RUN/summary.json).

    `stop_after_steps` ends the run early without finishing the epoch (tests simulate a crash)."""
    from tqdm.auto import tqdm

    from rela._alloc import keep_freed_memory
    from rela.accelerate import Accelerator
    from rela.datasets import open_dataset
    from rela.loader import Loader

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not (resume or overwrite):
        raise RelaError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and not ckpt_path.exists():
        raise RelaError(f"--resume: no checkpoint in {out} (nothing to resume; drop --resume to start)")
    out.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        saved = {k: v for k, v in _with_defaults(state["config"]).items() if k != "out"}
        now = {k: v for k, v in asdict(cfg).items() if k != "out"}
        diff = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if diff:
            raise RelaError(f"--resume with a different configuration: {diff}; resume with the original arguments")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    keep_freed_memory()

    device = resolve_device(cfg.device)
    dataset = open_dataset(cfg.data, cfg.limit)
    backbone, method = build_student(cfg)
    backbone.to(device), method.to(device)
    store, conversion_s = _open_store(cfg, dataset, backbone.feature_dim, progress) if cfg.uses_rela else (None, 0.0)
    loader = Loader(dataset, cfg.batch_size, targets=store, views="rela" if cfg.uses_rela else method.views,
                    image_size=cfg.image_size, subset=cfg.budget, policy=cfg.policy, seed=cfg.seed,
                    num_workers=cfg.num_workers, backend=cfg.backend, device=device, pin_memory=device.type == "cuda")
    acc = None
    if cfg.uses_rela:
        acc = Accelerator(backbone.feature_dim, store.dim, cfg.phase, freeze_transfer=cfg.freeze_transfer,
                          loader=loader, ssl_views=method.views).to(device)
    params = list(backbone.parameters()) + method.online_parameters()
    if acc is not None and not cfg.freeze_transfer:
        params += list(acc.transfer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = len(loader) * cfg.epochs
    if total_steps == 0:
        raise RelaError(f"--budget {cfg.budget} of {len(dataset)} samples is {loader.subset.size} per epoch, "
                        f"fewer than one batch of {cfg.batch_size}: nothing would train. Raise --budget or "
                        "--limit, or lower --batch-size")

    start_epoch, step, train_s, images, step_times, switch = 0, 0, 0.0, 0, [], None
    if state is not None:
        backbone.load_state_dict(state["backbone"])
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        if acc is not None:
            acc.load_state_dict(state["accelerator"])
        start_epoch, step, train_s = state["epoch"] + 1, state["step"], state["train_seconds"]
        images, step_times, switch = state["images"], list(state["step_seconds"]), state.get("switch")
    log = _Log(out / "steps.csv", step)
    epochs_csv = out / "epochs.csv"
    if state is None:
        epochs_csv.write_text("epoch,seconds,steps,images,phase\n")
    test_name = cfg.test_data or default_test_data(cfg.data)

    def on_switch(epoch: int) -> dict:
        info = {"step": step, "epoch": epoch, "rho": acc.rho, "rela_loss": acc.last_loss}
        if cfg.probe_at_switch and test_name:
            from rela.evaluate import extract_features, knn_accuracy

            tr = extract_features(backbone, dataset.head(min(len(dataset), 5000)), cfg.image_size, device=device)
            te = extract_features(backbone, open_dataset(test_name, 2000), cfg.image_size, device=device)
            info["knn_top1"] = knn_accuracy(*tr, *te)
        (out / "switch.json").write_text(json.dumps(info, indent=1))
        return info

    backbone.train(), method.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            loader.set_epoch(epoch)
            if acc is not None and acc.begin_epoch(epoch, cfg.epochs):
                switch = on_switch(epoch)
            t_epoch, n_epoch = time.perf_counter(), 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            t0 = time.perf_counter()
            for batch in bar:
                views = batch["views"]
                feats = backbone(torch.cat(views)).view(len(views), len(batch["index"]), -1)
                lam = acc.lam if acc is not None else 0.0
                loss, rela_l, ssl_l = 0.0, math.nan, math.nan
                if lam > 0:
                    r = acc.loss(feats, batch["target"], batch["index"])
                    loss, rela_l = loss + lam * r, float(r.detach())
                if lam < 1:
                    s = method.loss(feats, views, step, total_steps)
                    loss, ssl_l = loss + (1 - lam) * s, float(s.detach())
                if not torch.isfinite(loss):
                    raise RelaError(f"the loss became {float(loss)} at step {step} (epoch {epoch}); lower --lr "
                                    "or check the targets (rela info STORE)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.update_target(step, total_steps)
                switched = acc.step() if acc is not None and lam > 0 else False
                dt = time.perf_counter() - t0
                row = {"step": step, "epoch": epoch, "lam": round(lam, 6),
                       "rho": round(acc.rho, 6) if acc is not None else math.nan,
                       "phase": _phase_name(lam),
                       "loss": float(loss.detach()), "rela_loss": rela_l, "ssl_loss": ssl_l, "seconds": round(dt, 5)}
                log.write(row)
                step_times.append(dt)
                step += 1
                n_epoch += len(batch["index"])
                bar.set_postfix(loss=f"{row['loss']:.4f}", lam=f"{lam:.2f}")
                if switched:
                    t_probe = time.perf_counter()
                    switch = on_switch(epoch)
                    t_epoch += time.perf_counter() - t_probe  # monitoring, not training
                if stop_after_steps is not None and step >= stop_after_steps:
                    return {"stopped_at_step": step}
                t0 = time.perf_counter()
            epoch_s = time.perf_counter() - t_epoch
            train_s += epoch_s
            images += n_epoch
            phase = _phase_name(acc.lam if acc is not None else 0.0)
            with epochs_csv.open("a") as f:
                f.write(f"{epoch},{epoch_s:.3f},{len(loader)},{n_epoch},{phase}\n")
            _atomic_save({
                "epoch": epoch, "step": step, "config": asdict(cfg), "train_seconds": train_s, "images": images,
                "step_seconds": step_times, "switch": switch,
                "backbone": backbone.state_dict(), "method": method.state_dict(), "optimizer": opt.state_dict(),
                "loader": loader.state_dict(), "accelerator": acc.state_dict() if acc is not None else {},
            }, ckpt_path)
    finally:
        log.close()
    summary = {
        "config": asdict(cfg), "steps": step, "images_seen": images, "train_seconds": train_s,
        "conversion_seconds": conversion_s, "total_seconds": train_s + conversion_s,
        "median_step_seconds": statistics.median(step_times) if step_times else math.nan,
        "switch": switch, "device": str(device), "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _with_defaults(raw: dict) -> dict:
    """A saved configuration with the fields added since it was written at their defaults."""
    known = {f.name for f in fields(TrainConfig)}
    return asdict(TrainConfig(**{k: v for k, v in raw.items() if k in known}))


def config_from_run(run: str | Path) -> TrainConfig:
    return TrainConfig(**_with_defaults(json.loads((Path(run) / "config.json").read_text())))


def evaluate_run(run: str | Path, *, probe_epochs: int = 100, k: int = 20, test_data: str | None = None,
                 progress: bool = True) -> dict:
    """Linear probe and kNN of a run's final backbone; written to RUN/eval.json."""
    from rela.datasets import open_dataset
    from rela.evaluate import extract_features, knn_accuracy, linear_probe

    run = Path(run)
    cfg = config_from_run(run)
    state = load_checkpoint(run / "checkpoint.pt")
    device = resolve_device(cfg.device)
    backbone, _ = build_student(cfg)
    backbone.load_state_dict(state["backbone"])
    backbone.to(device)
    test_name = test_data or cfg.test_data or default_test_data(cfg.data)
    if test_name is None:
        raise RelaError(f"no test split known for {cfg.data!r}: pass --test-data")
    t0 = time.perf_counter()
    train_x, train_y = extract_features(backbone, open_dataset(cfg.data, cfg.limit), cfg.image_size,
                                        progress=progress, desc="train features", device=device)
    test_x, test_y = extract_features(backbone, open_dataset(test_name), cfg.image_size,
                                      progress=progress, desc="test features", device=device)
    probe = linear_probe(train_x, train_y, test_x, test_y, epochs=probe_epochs, seed=cfg.seed)
    result = {"run": str(run), "epochs_trained": state["epoch"] + 1, "linear_top1": probe["top1"],
              "linear_final": probe["final"], "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, k=k),
              "k": k, "probe_epochs": probe_epochs, "probe": "Adam 3e-4, batch 64, standardised features",
              "linear_curve": probe["curve"], "test_data": test_name, "train_samples": len(train_x),
              "test_samples": len(test_x), "eval_seconds": time.perf_counter() - t0}
    (run / "eval.json").write_text(json.dumps(result, indent=1))
    return result
