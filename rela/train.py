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
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from rela.distributed import resolve_device
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
    device: str = "auto"  # auto: cuda when available (this rank's GPU under torchrun), else cpu
    sync_bn: bool = False  # SyncBatchNorm over ranks (CUDA only, as PyTorch's SyncBatchNorm)
    switch_threshold: float = 0.995  # adaptive/blend: switch once ρ reaches this (the reference's)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise RelaError(f"--budget must be in (0, 1], got {self.budget}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RelaError("--epochs and --batch-size must be positive")
        from rela.accelerate import parse_phase
        from rela.ssl import METHODS

        parse_phase(self.phase)
        if not 0 < self.switch_threshold <= 1:
            raise RelaError(f"--switch-threshold must be in (0, 1], got {self.switch_threshold}")
        if self.method not in METHODS:
            raise RelaError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")

    @property
    def uses_rela(self) -> bool:
        return self.prior is not None and not self.phase.startswith("off")


def per_rank_batch(batch_size: int, world: int) -> int:
    """--batch-size is the global batch; every rank takes an equal share of each one.

    The loader deals each epoch's order to the ranks by stride, so global batch j is the same
    samples under any world size that divides it: a run resumes under another number of ranks
    on the same sample sequence. A world size that does not divide it is refused."""
    if batch_size % world:
        raise RelaError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                        f"{world} ranks (a run resumes under a different number of ranks only where it does): "
                        f"use a number of ranks that divides {batch_size}, or start a new run with another "
                        "--batch-size")
    return batch_size // world


def default_test_data(data: str) -> str | None:
    return "fashion-mnist:test" if str(data).split(":")[0] == "fashion-mnist" else None


def _open_store(cfg: TrainConfig, dataset, feature_dim: int, progress: bool, device: torch.device):
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
        store = convert(dataset, prior, Path(cfg.out) / "store", dim=dim, progress=progress, device=device)
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

    def flush(self) -> None:
        """Before each checkpoint: a resumed run keeps exactly the rows up to the checkpoint."""
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            self.tb.flush()

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


class _Student(nn.Module):
    """Everything that trains, in one module, so DistributedDataParallel sees every gradient:
    the backbone, the SSL method's heads (its target networks ride along without gradients) and
    the accelerator's transfer head. forward() returns the step's loss and its two parts."""

    def __init__(self, backbone: nn.Module, method: nn.Module, acc: nn.Module | None) -> None:
        super().__init__()
        self.backbone, self.method, self.acc = backbone, method, acc

    def forward(self, views: list[torch.Tensor], target, index, lam: float, step: int, total_steps: int):
        feats = self.backbone(torch.cat(views)).view(len(views), len(index), -1)
        nan = torch.full((), math.nan, device=feats.device)
        loss, rela_l, ssl_l = feats.new_zeros(()), nan, nan
        if lam > 0:
            rela_l = self.acc.loss(feats, target, index)
            loss = loss + lam * rela_l
        if lam < 1:
            ssl_l = self.method.loss(feats, views, step, total_steps)
            loss = loss + (1 - lam) * ssl_l
        return loss, rela_l.detach(), ssl_l.detach()


def _wrap(student: _Student, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """DDP over the process group (gloo on CPU, NCCL on GPU); unused parameters are expected
    (the SSL heads during the RELA phase, the transfer head after it)."""
    from rela import distributed as dist_util

    if cfg.sync_bn:
        if dist_util.active() and device.type != "cuda":
            raise RelaError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only. On CPU ranks "
                            "BatchNorm statistics stay per-rank (drop --sync-bn)")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # in place below the top module
    if not dist_util.active():
        return student
    from torch.nn.parallel import DistributedDataParallel

    switching = student.acc is not None and student.acc.mode != "blend"  # blend uses every head each step
    return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=switching)


def _parameter_checksum(module: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()).item())


def _check_in_sync(student: _Student, acc, epoch: int) -> list[dict]:
    """Every rank's parameters and phase state after an epoch; raises if ranks diverged (they
    never should under DDP: a divergence means a rank trained on something the others did not)."""
    from rela import distributed as dist_util

    rank = dist_util.rank_world()[0]
    mine = {"rank": rank, "params": _parameter_checksum(student),
            "switch_step": int(acc.switch_step) if acc is not None else -1,
            "lam": acc.lam if acc is not None else 0.0, "rho": acc.rho if acc is not None else math.nan}
    states = dist_util.all_gather_object(mine)
    keys = ("params", "switch_step", "lam")
    if any(tuple(st[k] for k in keys) != tuple(states[0][k] for k in keys) for st in states):
        raise RelaError(f"ranks diverged by the end of epoch {epoch}: {states}. Every rank must run the "
                        "same steps on the same configuration; rerun with --resume from the last checkpoint")
    return states


def _check_out(out: Path, resume: bool | str, overwrite: bool) -> bool:
    """Whether to resume (resume="auto": when there is a checkpoint); refuses to clobber a run."""
    ckpt_path = out / "checkpoint.pt"
    if resume == "auto":
        if overwrite:
            raise RelaError("--auto-resume and --overwrite contradict each other: pick one")
        resume = ckpt_path.exists()
    if ckpt_path.exists() and not (resume or overwrite):
        raise RelaError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and not ckpt_path.exists():
        raise RelaError(f"--resume: no checkpoint in {out} (nothing to resume; drop --resume to start)")
    out.mkdir(parents=True, exist_ok=True)
    return bool(resume)


def train(cfg: TrainConfig, *, resume: bool | str = False, overwrite: bool = False, progress: bool = True,
          stop_after_steps: int | None = None) -> dict:
    """Train as configured; returns the summary (also written to RUN/summary.json).

    resume: True continues the run in cfg.out (refused without a checkpoint); "auto" continues it
    when there is a checkpoint and starts otherwise — for launchers that rerun the same command
    after a failure (`torchrun --max-restarts`, job schedulers).

    Under torch.distributed (`torchrun -m rela train`) every rank calls this with the same
    configuration; the run directory must be on a filesystem all ranks share. Rank 0 alone
    writes checkpoints, logs and summaries. `stop_after_steps` ends the run early without
    finishing the epoch (tests simulate a crash)."""
    from tqdm.auto import tqdm

    from rela import distributed as dist_util
    from rela._alloc import keep_freed_memory
    from rela.accelerate import Accelerator
    from rela.datasets import open_dataset
    from rela.faults import crashpoint
    from rela.loader import Loader

    rank, world = dist_util.rank_world()
    main = rank == 0
    progress = progress and main
    batch_size = per_rank_batch(cfg.batch_size, world)
    dist_util.check_same("the training configuration", asdict(cfg))
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    resume = dist_util.main_decides(_check_out, out, resume, overwrite)
    state = load_checkpoint(ckpt_path) if resume else None
    dist_util.check_same("the checkpoint's step (is --out on a filesystem every node shares?)",
                         state["step"] if state else None)
    if state is not None:
        saved = {k: v for k, v in _with_defaults(state["config"]).items() if k != "out"}
        now = {k: v for k, v in asdict(cfg).items() if k != "out"}
        diff = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if diff:
            raise RelaError(f"--resume with a different configuration: {diff}; resume with the original arguments")
        was = state.get("world_size", 1)
        if was != world and main and not cfg.sync_bn:
            print(f"resuming a {was}-rank run on {world} ranks: the same samples per global batch of "
                  f"{cfg.batch_size}; BatchNorm statistics are now per {batch_size} samples instead of "
                  f"{cfg.batch_size // was}", file=sys.stderr)
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    keep_freed_memory()

    device = resolve_device(cfg.device)
    dataset = open_dataset(cfg.data, cfg.limit)
    backbone, method = build_student(cfg)
    backbone.to(device), method.to(device)
    store, conversion_s = _open_store(cfg, dataset, backbone.feature_dim, progress, device) if cfg.uses_rela else (None, 0.0)
    loader = Loader(dataset, batch_size, targets=store, views="rela" if cfg.uses_rela else method.views,
                    image_size=cfg.image_size, subset=cfg.budget, policy=cfg.policy, seed=cfg.seed,
                    num_workers=cfg.num_workers, backend=cfg.backend, device=device, pin_memory=device.type == "cuda")
    acc = None
    if cfg.uses_rela:
        acc = Accelerator(backbone.feature_dim, store.dim, cfg.phase, freeze_transfer=cfg.freeze_transfer,
                          loader=loader, ssl_views=method.views, threshold=cfg.switch_threshold).to(device)
    student = _Student(backbone, method, acc)
    model = _wrap(student, cfg, device)
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
    log = _Log(out / "steps.csv", step) if main else None
    epochs_csv = out / "epochs.csv"
    if main:  # rows of epochs after the checkpoint (a crash between the two writes) go
        kept = epochs_csv.read_text().splitlines()[1:] if state is not None and epochs_csv.exists() else []
        kept = [row for row in kept if int(row.split(",")[0]) < start_epoch]
        epochs_csv.write_text("\n".join(["epoch,seconds,steps,images,phase", *kept]) + "\n")
    test_name = cfg.test_data or default_test_data(cfg.data)

    def on_switch(epoch: int) -> dict:
        info = {"step": step, "epoch": epoch, "rho": acc.rho, "rela_loss": acc.last_loss}
        if not main:
            return info
        if cfg.probe_at_switch and test_name:
            from rela.evaluate import extract_features, knn_accuracy

            tr = extract_features(backbone, dataset.head(min(len(dataset), 5000)), cfg.image_size, device=device)
            te = extract_features(backbone, open_dataset(test_name, 2000), cfg.image_size, device=device)
            info["knn_top1"] = knn_accuracy(*tr, *te)
        (out / "switch.json").write_text(json.dumps(info, indent=1))
        return info

    model.train()
    ranks: list[dict] = []
    try:
        for epoch in range(start_epoch, cfg.epochs):
            loader.set_epoch(epoch)
            if acc is not None and acc.begin_epoch(epoch, cfg.epochs):
                switch = on_switch(epoch)
            t_epoch, n_epoch = time.perf_counter(), 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            t0 = time.perf_counter()
            for batch in bar:
                lam = acc.lam if acc is not None else 0.0
                loss, rela_l, ssl_l = model(batch["views"], batch.get("target"), batch["index"], lam, step,
                                            total_steps)
                # The logged and checked values are the means over ranks: every rank stops together.
                values = torch.stack([loss.detach(), rela_l, ssl_l]).double()
                if world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(values)
                    values /= world
                loss_v, rela_v, ssl_v = values.tolist()
                if not math.isfinite(loss_v):
                    raise RelaError(f"the loss became {loss_v} at step {step} (epoch {epoch}); lower --lr "
                                    "or check the targets (rela info STORE)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.update_target(step, total_steps)
                switched = acc.step() if acc is not None and lam > 0 else False
                dt = time.perf_counter() - t0
                if log is not None:
                    log.write({"step": step, "epoch": epoch, "lam": round(lam, 6),
                               "rho": round(acc.rho, 6) if acc is not None else math.nan,
                               "phase": _phase_name(lam), "loss": loss_v, "rela_loss": rela_v,
                               "ssl_loss": ssl_v, "seconds": round(dt, 5)})
                step_times.append(dt)
                step += 1
                n_epoch += len(batch["index"]) * world
                bar.set_postfix(loss=f"{loss_v:.4f}", lam=f"{lam:.2f}")
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
            ranks = _check_in_sync(student, acc, epoch)
            if main:
                phase = _phase_name(acc.lam if acc is not None else 0.0)
                with epochs_csv.open("a") as f:
                    f.write(f"{epoch},{epoch_s:.3f},{len(loader)},{n_epoch},{phase}\n")
                log.flush()
                _atomic_save({
                    "epoch": epoch, "step": step, "config": asdict(cfg), "train_seconds": train_s,
                    "images": images, "step_seconds": step_times, "switch": switch, "world_size": world,
                    "backbone": backbone.state_dict(), "method": method.state_dict(), "optimizer": opt.state_dict(),
                    "loader": loader.state_dict(), "accelerator": acc.state_dict() if acc is not None else {},
                }, ckpt_path)
                crashpoint("checkpoint-written")
            dist_util.barrier()  # no rank runs ahead of a checkpoint it might be resumed from
    finally:
        if log is not None:
            log.close()
    summary = {
        "config": asdict(cfg), "steps": step, "images_seen": images, "train_seconds": train_s,
        "conversion_seconds": conversion_s, "total_seconds": train_s + conversion_s,
        "median_step_seconds": statistics.median(step_times) if step_times else math.nan,
        "switch": switch, "device": str(device), "threads": torch.get_num_threads(),
        "world_size": world, "per_rank_batch_size": batch_size, "ranks": ranks,
    }
    if main:
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
