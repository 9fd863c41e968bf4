"""`rela train`: self-supervised training with the RELA phase (ReLA-F), resumable and logged.

`train(cfg)` runs a `Trainer` through its named steps: open the run directory (and decide whether
to resume), build the student, store, loader, accelerator and optimizer, restore the checkpoint,
then epochs of steps, each epoch ending in a checkpoint. What the run directory holds is
described in `rela.training.run`.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from rela import _workers, faults
from rela import distributed as dist_util
from rela.distributed import resolve_device
from rela.errors import RelaError
from rela.training.memory_format import compile_options, student_memory_format
from rela.training.run import (
    CHECKPOINT,
    EpochLog,
    StepLog,
    TrainConfig,
    build_student,
    check_out,
    check_resumable,
    default_test_data,
    load_checkpoint,
    per_rank_batch,
    phase_name,
    save_checkpoint,
)


def open_store(cfg: TrainConfig, dataset, feature_dim: int, progress: bool, device: torch.device,
               path: Path | None = None):
    """The target store and its conversion's wall-clock and CPU seconds: a given store directory (checked against the
    dataset), or cfg.prior converted into `path` (default RUN/store; reused when complete, resumed
    when interrupted) as `rela train` does, at the prior input size that fits the data."""
    from rela.data.convert import convert
    from rela.data.store import MANIFEST, TargetStore

    if (Path(cfg.prior) / MANIFEST).exists():
        store = TargetStore.open(Path(cfg.prior), dataset)
    else:
        from rela.data.priors import input_size_for, load_prior

        prior = load_prior(cfg.prior, input_size=cfg.prior_input_size, seed=cfg.seed)
        if cfg.prior_input_size is None:  # fit the prior's resolution to the data's
            size = input_size_for(prior.input_size, dataset.typical_side())
            if size != prior.input_size:
                prior = load_prior(cfg.prior, input_size=size, seed=cfg.seed)
        dim = min(cfg.dim or feature_dim, prior.dim)
        store = convert(dataset, prior, path or Path(cfg.out) / "store", dim=dim, progress=progress, device=device,
                        skip_corrupt=cfg.skip_corrupt)
    cost = store.manifest.get("cost", {})
    return store, float(cost.get("seconds", 0.0)), float(cost.get("cpu_seconds", math.nan))


class _Student(nn.Module):
    """Everything that trains, in one module, so DistributedDataParallel sees every gradient:
    the backbone, the SSL method's heads (its target networks ride along without gradients) and
    the accelerator's transfer head. forward() returns the step's loss and its two parts."""

    def __init__(self, backbone: nn.Module, method: nn.Module, acc: nn.Module | None, warm_heads: bool = False) -> None:
        super().__init__()
        self.backbone, self.method, self.acc, self.warm_heads = backbone, method, acc, warm_heads

    def forward(self, views: list[torch.Tensor], target, index, lam: float, step: int, total_steps: int,
                labels: torch.Tensor | None = None):
        feats = backbone_features(self.backbone, views, len(index))
        feats = feats.float()  # heads run under autocast as they like; the losses see fp32 (precision.py)
        nan = torch.full((), math.nan, device=feats.device)
        loss, rela_l, ssl_l = feats.new_zeros(()), nan, nan
        if lam > 0:  # on the full-size views (multi-crop's local views are the method's)
            full = sum(1 for v in views if v.shape[-2:] == views[0].shape[-2:])
            rela_l = self.acc.loss(feats[:full], target, index)
            loss = loss + lam * rela_l
        if lam < 1:
            ssl_l = self.method.loss(feats, views, step, total_steps, labels)
            loss = loss + (1 - lam) * ssl_l
        elif self.warm_heads:  # warm the heads for the switch; no gradient reaches the backbone
            ssl_l = self.method.loss(feats.detach(), views, step, total_steps, labels)
            loss = loss + ssl_l
        return loss, rela_l.detach(), ssl_l.detach()


def backbone_features(backbone: nn.Module, views: list[torch.Tensor], batch: int) -> torch.Tensor:
    """[V, B, F] features of every view: one backbone pass per run of same-size views (multi-crop
    views come in two sizes: the global ones, then the local ones)."""
    out, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out.append(backbone(torch.cat(views[start:end])).view(end - start, batch, -1))
        start = end
    return out[0] if len(out) == 1 else torch.cat(out)


def _wrap(student: _Student, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """DDP over the process group (gloo on CPU, NCCL on GPU); unused parameters are expected
    (the SSL heads during the RELA phase, the transfer head after it)."""
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


class Trainer:
    """One run of `train`, in named steps (see the module doc). Under torch.distributed every rank
    builds one; rank 0 alone writes the run directory."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False, overwrite: bool = False,
                 progress: bool = True, dataset=None, test_dataset=None) -> None:
        self.cfg = cfg
        self.data = cfg.data if dataset is None else dataset  # a spec string, or the user's dataset object
        self.rank, self.world = dist_util.rank_world()
        self.main = self.rank == 0
        self.progress = progress and self.main
        self.batch_size = per_rank_batch(cfg.batch_size, self.world)
        self.out = Path(cfg.out)
        state = self._open_run(resume, overwrite)
        self._build()
        self.epoch, self.step, self.train_s, self.images, self.step_times, self.switch = 0, 0, 0.0, 0, [], None
        self.train_cpu_s = 0.0  # CPU seconds of the epochs: this process, its threads, its ended workers
        self.pending: list[tuple] = []  # steps whose losses are still on the device (see _flush)
        self.bar = None  # the epoch's progress bar (run_epoch)
        if state is not None:
            self._restore(state)
        self.log = StepLog(self.out / "steps.csv", self.step) if self.main else None
        self.epochs_log = EpochLog(self.out / "epochs.csv", self.epoch, state is not None) if self.main else None
        self.test_name = test_dataset if test_dataset is not None else cfg.test_data or default_test_data(cfg.data)
        self.ranks: list[dict] = []

    # --- 1. the run directory ------------------------------------------------------------------
    def _open_run(self, resume: bool | str, overwrite: bool) -> dict | None:
        """Decide (on rank 0, for all) whether to resume; check the checkpoint fits this config."""
        from rela._alloc import keep_freed_memory

        cfg = self.cfg
        dist_util.check_same("the training configuration", asdict(cfg))
        resume = dist_util.main_decides(check_out, self.out, resume, overwrite)
        state = load_checkpoint(self.out / CHECKPOINT) if resume else None
        dist_util.check_same("the checkpoint's step (is --out on a filesystem every node shares?)",
                             state["step"] if state else None)
        if state is not None:
            check_resumable(state, cfg)
            was = state.get("world_size", 1)
            if was != self.world and self.main and not cfg.sync_bn:
                print(f"resuming a {was}-rank run on {self.world} ranks: the same samples per global batch of "
                      f"{cfg.batch_size}; BatchNorm statistics are now per {self.batch_size} samples instead of "
                      f"{cfg.batch_size // was}", file=sys.stderr)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        keep_freed_memory()
        return state

    # --- 2. what trains --------------------------------------------------------------------------
    def _build(self) -> None:
        """Dataset, student, target store, loader, accelerator, DDP wrapper and optimizer."""
        from rela.data.datasets import open_dataset
        from rela.loading.loader import Loader
        from rela.training.accelerate import Accelerator
        from rela.training.methods import METHODS

        cfg = self.cfg
        self.device = device = resolve_device(cfg.device)
        self.dataset = open_dataset(self.data, cfg.limit, cfg.exif_transpose)
        classes = 0
        if METHODS[cfg.method].needs_labels:  # reads every label
            labels = self.dataset.labels()
            if labels.min() < 0:
                raise RelaError(f"method {cfg.method!r} needs a labelled dataset (class sub-folders, an .npz with "
                                f"labels, fashion-mnist); {int((labels < 0).sum())} samples have no label")
            classes = int(labels.max()) + 1
        self.backbone, self.method = build_student(cfg, classes=classes)
        self.backbone.to(device), self.method.to(device)
        store, self.conversion_s, self.conversion_cpu_s = (
            open_store(cfg, self.dataset, self.backbone.feature_dim, self.progress, device)
            if cfg.uses_rela else (None, 0.0, 0.0))
        ssl_views = cfg.ssl_views or self.method.views
        # channels_last unless oneDNN #6035 would break the backbone on a CPU (then with a warning;
        # the heads are linear and the teachers run forward only, which the bug doesn't touch)
        self.memory_format = student_memory_format(self.backbone, device, cfg.channels_last)
        self.loader = Loader(self.dataset, self.batch_size, targets=store,
                             views=cfg.rela_views if cfg.uses_rela else ssl_views, image_size=cfg.image_size,
                             subset=cfg.budget, policy=cfg.policy, seed=cfg.seed, num_workers=cfg.num_workers,
                             backend=cfg.backend, device=device, pin_memory=device.type == "cuda",
                             memory_format=self.memory_format,
                             handoff=cfg.handoff, on_error="skip" if cfg.skip_corrupt else "raise",
                             scaled_decode=cfg.scaled_decode)
        self.acc = None
        if cfg.uses_rela:
            self.acc = Accelerator(self.backbone.feature_dim, store.dim, cfg.phase,
                                   freeze_transfer=cfg.freeze_transfer, loader=self.loader,
                                   ssl_views=ssl_views, threshold=cfg.switch_threshold, rule=cfg.switch_rule,
                                   window=cfg.window(), handover=cfg.handover, floor=cfg.handover_floor,
                                   evidence_steps=cfg.switch_evidence, min_gain=cfg.switch_min_gain).to(device)
        self.student = _Student(self.backbone, self.method, self.acc, cfg.warm_heads)
        if self.memory_format is torch.channels_last:
            self.student.to(memory_format=torch.channels_last)
        if cfg.compile:
            # in place: state_dict keys stay; the heads and losses run eagerly
            self.backbone.compile(options=compile_options(self.backbone, device))
        self.model = _wrap(self.student, cfg, device)
        self.total_steps = len(self.loader) * cfg.epochs
        if self.total_steps == 0:
            raise RelaError(f"--budget {cfg.budget} of {len(self.dataset)} samples is {self.loader.subset.size} per "
                            f"epoch, fewer than one batch of {cfg.batch_size}: nothing would train. Raise --budget "
                            "or --limit, or lower --batch-size")
        if self.acc is not None:
            self.acc.plan(self.total_steps)
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        """Optimizer, per-step learning-rate schedule and precision (rela.training.optim / .precision)."""
        from rela.training.optim import build_optimizer, build_schedule, scaled_lr
        from rela.training.precision import Precision

        cfg = self.cfg
        params = list(self.backbone.parameters()) + self.method.online_parameters()
        if self.acc is not None and not cfg.freeze_transfer:
            params += list(self.acc.transfer.parameters())
        lr = scaled_lr(cfg.lr, cfg.lr_scale, cfg.batch_size)
        self.opt = build_optimizer(cfg.optimizer, params, lr, cfg.weight_decay, self.device)
        warmup = round(cfg.warmup_epochs * len(self.loader))
        self.schedule = build_schedule(self.opt, cfg.lr_schedule, self.total_steps, warmup)
        self.precision = Precision(cfg.precision, self.device)

    # --- 3. checkpoints: what is saved, and restored from it -----------------------------------
    def _checkpoint_state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "step": self.step,
            "config": asdict(self.cfg),
            "train_seconds": self.train_s,
            "train_cpu_seconds": self.train_cpu_s,
            "images": self.images,
            "step_seconds": self.step_times,
            "switch": self.switch,
            "world_size": self.world,
            "backbone": self.backbone.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.precision.state_dict(),
            "accelerator": self.acc.state_dict() if self.acc is not None else {},
        }

    def _restore(self, state: dict) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["optimizer"])
        if "schedule" in state:  # checkpoints before schedules existed ran at a constant rate
            self.schedule.load_state_dict(state["schedule"])
            self.precision.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        if self.acc is not None:
            self.acc.load_state_dict(state["accelerator"])
        self.epoch, self.step, self.train_s = state["epoch"] + 1, state["step"], state["train_seconds"]
        self.images, self.step_times, self.switch = state["images"], list(state["step_seconds"]), state.get("switch")
        self.train_cpu_s = state.get("train_cpu_seconds", math.nan)  # NaN: saved before CPU seconds were kept

    # --- 4. training -----------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Every remaining epoch; the summary (also RUN/summary.json). `stop_after_steps` ends the
        run early without finishing the epoch (tests simulate a crash)."""
        self.model.train()
        try:
            for epoch in range(self.epoch, self.cfg.epochs):
                if not self.run_epoch(epoch, stop_after_steps):
                    return {"stopped_at_step": self.step}
        finally:
            if self.log is not None:
                self.log.close()
        return self._summary()

    def run_epoch(self, epoch: int, stop_after_steps: int | None = None) -> bool:
        """One epoch, then its checkpoint; False when stopped early."""
        from tqdm.auto import tqdm

        self.loader.set_epoch(epoch)
        if self.acc is not None and self.acc.begin_epoch(epoch, self.cfg.epochs, self.step):
            self.switch = self._on_switch(epoch)
        t_epoch, n_epoch, cpu_epoch = time.perf_counter(), 0, _workers.cpu_seconds()
        self.bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.progress,
                        leave=False)
        t0 = time.perf_counter()
        for batch in self.bar:
            self.train_step(batch, epoch, t0)
            n_epoch += len(batch["index"]) * self.world
            if self.step % self.cfg.log_every == 0:
                t_epoch += self._flush(epoch)  # the time of a switch probe is monitoring, not training
            if stop_after_steps is not None and self.step >= stop_after_steps:
                self._flush(epoch)
                return False
            t0 = time.perf_counter()
        t_epoch += self._flush(epoch)
        self.train_cpu_s += _workers.cpu_seconds() - cpu_epoch  # the probe's CPU included: it is the run's
        self._end_epoch(epoch, time.perf_counter() - t_epoch, n_epoch)
        return True

    def train_step(self, batch: dict, epoch: int, t0: float) -> None:
        """Forward (under autocast), backward, optimizer, schedule and target updates. Nothing
        here waits for the device: the step's losses stay there until `_flush` reads them."""
        lam = self.acc.lam_at(self.step) if self.acc is not None else 0.0
        views = batch["views"]
        step, total = self._method_clock()
        with self.precision.autocast():
            loss, rela_l, ssl_l = self.model(views, batch.get("target"), batch["index"], lam, step, total,
                                             batch["label"])
        self.opt.zero_grad(set_to_none=True)
        self.precision.backward_step(loss, self.opt)
        self.schedule.step()
        self._rewarm_lr(self.step + 1)
        self.method.update_target(step, total, self.backbone)
        self.pending.append((torch.stack([loss.detach(), rela_l, ssl_l]).double(), lam, epoch,
                             time.perf_counter() - t0))
        self.step += 1

    def _method_clock(self) -> tuple[int, int]:
        """(step, total steps) as the method's schedules count them: from the switch under
        --method-clock switch (a method handed half a run warms DINO's teacher temperature and
        freezes its prototypes at its own start), else from the run's first step."""
        if self.acc is None or not self.acc.switched or self.cfg.method_clock == "run":
            return self.step, self.total_steps
        start = self.acc.switched_at
        return self.step - start, max(1, self.total_steps - start)

    def _rewarm_lr(self, step: int) -> None:
        """--handover-lr f: over the hand-over window the next step's learning rate is scaled from
        f back to 1 (after the schedule set it, so nothing compounds)."""
        f = self.cfg.handover_lr
        if f >= 1 or self.acc is None or not self.acc.switched:
            return
        progress = (step - self.acc.switched_at + 1) / self.acc.handover_steps
        if progress < 1:
            for group in self.opt.param_groups:
                group["lr"] *= f + (1 - f) * max(0.0, progress)

    def _flush(self, epoch: int) -> float:
        """Every --log-every steps: the pending steps' losses, averaged over ranks in one
        collective and read on the host once; the NaN check, the adaptive decision, the log rows.
        Returns the seconds a switch probe took (not training time)."""
        if not self.pending:
            return 0.0
        values = torch.stack([v for v, *_ in self.pending])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= self.world
        rows, pending, self.pending = values.tolist(), self.pending, []
        first = self.step - len(rows)
        bad = next((k for k, r in enumerate(rows) if not math.isfinite(r[0])), None)
        if bad is not None:
            raise RelaError(f"the loss became {rows[bad][0]} at step {first + bad} (epoch {pending[bad][2]}); lower "
                            "--lr or check the targets (rela info STORE); no checkpoint holds the weights it produced")
        switched, rhos = False, [math.nan] * len(rows)
        if self.acc is not None:  # every step counts; steps without a RELA loss pass NaN
            switched, rhos = self.acc.observe([r[1] if lam > 0 else math.nan
                                               for r, (_, lam, *_) in zip(rows, pending, strict=True)])
        for k, (row, (_, lam, ep, dt)) in enumerate(zip(rows, pending, strict=True)):
            if self.log is not None:
                self.log.write({"step": first + k, "epoch": ep, "lam": round(lam, 6), "rho": round(rhos[k], 6),
                                "phase": phase_name(lam), "loss": row[0], "rela_loss": row[1],
                                "ssl_loss": row[2], "seconds": round(dt, 5)})
            self.step_times.append(dt)
        faults.crashpoint("steps-logged")  # a kill between checkpoints (tests: steps.csv keeps its rows)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rows[-1][0]:.4f}", lam=f"{pending[-1][1]:.2f}")
        if not switched:
            return 0.0
        t_probe = time.perf_counter()
        self.switch = self._on_switch(epoch)
        return time.perf_counter() - t_probe

    def _end_epoch(self, epoch: int, epoch_s: float, n_epoch: int) -> None:
        """Costs, the ranks' sync check, the epoch's log row and the checkpoint."""
        from rela.faults import crashpoint

        self.train_s += epoch_s
        self.images += n_epoch
        self.ranks = _check_in_sync(self.student, self.acc, epoch)
        if self.main:
            self.epochs_log.write(epoch, epoch_s, len(self.loader), n_epoch,
                                  phase_name(self.acc.lam if self.acc is not None else 0.0))
            self.log.flush()
            save_checkpoint(self.out / CHECKPOINT, self._checkpoint_state(epoch))
            crashpoint("checkpoint-written")
        dist_util.barrier()  # no rank runs ahead of a checkpoint it might be resumed from

    def _on_switch(self, epoch: int) -> dict:
        """ρ, the RELA loss and (rank 0, with a test split) a kNN probe at the switch → switch.json."""
        acc = self.acc
        info = {"step": acc.switched_at, "epoch": epoch, "share": acc.switched_at / self.total_steps, "rho": acc.rho,
                "rela_loss": float(acc.last_loss), "why": acc.why(), "rule": acc.rule, "window": list(acc.window),
                "evidence": dict(acc.evidence) if acc.mode == "adaptive" and acc.rule == "evidence" else None,
                "handover_steps": acc.handover_steps if acc.handover > 0 else 0}
        if not self.main:
            return info
        if self.cfg.probe_at_switch and self.test_name:
            from rela.data.datasets import open_dataset
            from rela.training.evaluate import extract_features, knn_accuracy

            size, device = self.cfg.image_size, self.device
            on_error = self.loader.on_error  # --skip-corrupt covers the probe's reads too
            tr = extract_features(self.backbone, self.dataset.head(min(len(self.dataset), 5000)), size, device=device,
                                  on_error=on_error)
            te = extract_features(
                self.backbone,
                open_dataset(self.test_name, 2000, self.cfg.exif_transpose),
                size,
                device=device,
                on_error=on_error,
            )
            info["knn_top1"] = knn_accuracy(*tr, *te)
        (self.out / "switch.json").write_text(json.dumps(info, indent=1))
        return info

    def _summary(self) -> dict:
        summary = {
            "config": asdict(self.cfg), "steps": self.step, "images_seen": self.images, "train_seconds": self.train_s,
            "conversion_seconds": self.conversion_s, "total_seconds": self.train_s + self.conversion_s,
            "train_cpu_seconds": self.train_cpu_s, "conversion_cpu_seconds": self.conversion_cpu_s,
            "total_cpu_seconds": self.train_cpu_s + self.conversion_cpu_s,
            "median_step_seconds": statistics.median(self.step_times) if self.step_times else math.nan,
            "switch": self.switch, "phase": self.acc.decision() if self.acc is not None else "off: no RELA",
            "device": str(self.device), "threads": torch.get_num_threads(),
            "world_size": self.world, "per_rank_batch_size": self.batch_size, "ranks": self.ranks,
        }
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: TrainConfig, *, resume: bool | str = False, overwrite: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, dataset=None, test_dataset=None) -> dict:
    """Train as configured; returns the summary (also written to RUN/summary.json).

    resume: True continues the run in cfg.out (refused without a checkpoint); "auto" continues it
    when there is a checkpoint and starts otherwise — for launchers that rerun the same command
    after a failure (`torchrun --max-restarts`, job schedulers).

    Under torch.distributed (`torchrun -m rela train`) every rank calls this with the same
    configuration; the run directory must be on a filesystem all ranks share. Rank 0 alone
    writes checkpoints, logs and summaries. `stop_after_steps` ends the run early without
    finishing the epoch (tests simulate a crash).

    dataset / test_dataset: train (and probe) on dataset objects instead of cfg.data / cfg.test_data
    — any map-style dataset, e.g. torchvision's (`rela.data.datasets.MapDataset`). The run's
    config records cfg.data as given; the target store still checks the data by fingerprint."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, dataset=dataset,
                   test_dataset=test_dataset).fit(stop_after_steps)
