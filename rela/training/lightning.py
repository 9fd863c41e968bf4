"""rela inside the user's Lightning code: two callbacks, for either Lightning namespace.

- `LoaderState`: a resumed fit sees exactly the remaining batches (below). Every Trainer gets one
  without asking (`AutoLoaderState`, through Lightning's `callbacks_factory` entry points).
- `RelaCallback`: the whole RELA phase for any LightningModule (it includes LoaderState).

    loader = rela.Loader(train_dir, views=train_transform, targets=store, batch_format="lightly", ...)
    trainer = L.Trainer(..., callbacks=[rela.RelaCallback(store, phase="fixed:0.5"), ModelCheckpoint(...)])

Lightning saves a stateful loader's `state_dict()` in its checkpoints, but hands the state back
only while it sets the training data up, and it sets data up early — before restoring the
checkpoint — whenever something asks for `trainer.estimated_stepping_batches` (every lightly
benchmark module does, in `configure_optimizers`). The loader then started its epoch from batch 0:
the first part of the epoch trained twice, the rest never, without a word. This callback keeps the
loaders' states in the checkpoint itself and restores them in `on_train_start`, which Lightning
calls after the restore and before the first batch, whatever order it set data up in.

The callbacks derive from the `Callback` of both `lightning.pytorch` and `pytorch_lightning`
(lightly's benchmarks use the latter), whichever are installed; `rela-accel[lightning]` brings
`lightning`. Rank and world size need no callback: `rela.Loader` reads them from the process group
when it iterates, so a loader built before `fit()` creates the group shards correctly.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import torch

from rela import distributed as dist_util
from rela.errors import RelaError
from rela.loading.loader import Loader
from rela.training.accelerate import Accelerator

KEY = "rela_loaders"  # the checkpoint entry: one state per rela.Loader among the training loaders
_log = logging.getLogger("rela")


def _callback_bases() -> tuple[type, ...]:
    """Lightning's `Callback` from each namespace installed: `lightning.pytorch` (the `lightning`
    package) and `pytorch_lightning` (what lightly installs). rela's callbacks derive from both, so
    either namespace's Trainer takes them as its own."""
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("rela's Lightning callbacks need Lightning: pip install 'rela-accel[lightning]' "
                          "(lightly's pytorch_lightning works too)")
    return tuple(bases)


class _Callback(*_callback_bases()):
    pass


def rela_loaders(trainer) -> list[Loader]:
    """The rela loaders among the trainer's training dataloaders (a loader, or a list/dict of them)."""
    found, pending = [], [trainer.train_dataloader]
    while pending:
        item = pending.pop(0)
        if isinstance(item, Loader):
            found.append(item)
        elif isinstance(item, dict):
            pending += list(item.values())
        elif isinstance(item, (list, tuple)):
            pending += list(item)
    return found


class LoaderState(_Callback):
    """Saves every training `rela.Loader`'s state in Lightning's checkpoints and restores it before
    the first batch of a resumed fit (see the module doc for why Lightning alone can miss it)."""

    def __init__(self) -> None:
        self._pending: list[dict] | None = None

    def _active(self, trainer) -> bool:
        return True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loaders = rela_loaders(trainer) if self._active(trainer) else []
        if loaders:
            checkpoint[KEY] = [loader.state_dict() for loader in loaders]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY) if self._active(trainer) else None

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._pending:
            return
        loaders = rela_loaders(trainer)
        if len(loaders) != len(self._pending):
            raise RelaError(f"the checkpoint holds the state of {len(self._pending)} rela loaders, this fit trains "
                            f"with {len(loaders)}: resume with the dataloaders the checkpoint was saved with")
        for loader, state in zip(loaders, self._pending, strict=True):
            loader.load_state_dict(state)
        self._pending = None


class AutoLoaderState(LoaderState):
    """The `LoaderState` every Trainer gets without asking: rela registers it with Lightning's
    `callbacks_factory` entry points (both namespaces), so a bare swap to `rela.Loader` resumes a
    mid-epoch checkpoint exactly too. It stands aside when the user's callbacks hold a
    `LoaderState` (or `RelaCallback`) of their own, and does nothing in a fit without a rela.Loader."""

    def _active(self, trainer) -> bool:
        return not any(isinstance(cb, LoaderState) and not isinstance(cb, AutoLoaderState)
                       for cb in trainer.callbacks)


def backbone_features(module, images: torch.Tensor) -> torch.Tensor:
    """The default `features=`: `module.backbone(images)` flattened, as lightly's modules compute it."""
    return module.backbone(images).flatten(1)


class RelaCallback(LoaderState):
    """The RELA phase (ReLA-F) for a LightningModule whose `training_step` returns its SSL loss.

    - The `Accelerator` becomes `pl_module.rela` in `setup()`: `self.parameters()` includes its
      transfer head, and its phase state is saved and restored with the model's weights. A
      `configure_optimizers` that lists modules (lightly's `get_weight_decay_parameters([...])`)
      must list `self.rela` too: a transfer head in no optimizer is refused when training starts.
    - `training_step` is wrapped: while λ = 1 (the RELA phase) the step is λ·RELA loss and the
      user's step is not run (its loss would get weight 0); the module's `on_rela_step(batch,
      batch_idx, features)`, when it defines one, runs instead, for the step's side effects (a
      momentum teacher, an online classifier: `features` are the backbone's, [views, B, D], and a
      loss it returns is added as is). From the switch, λ falls over the hand-over to the floor
      (0.5 by default: the user's loss beside half the RELA loss; `floor=0`: the user's alone).
      The loader must yield targets: `targets=store` and `batch_format="lightly"` (or "dict").
    - The user's monitors (a callback with a `monitor`: EarlyStopping, ModelCheckpoint) skip their
      checks while the metric they watch is missing because the user's step has not run this epoch
      (the RELA phase): no crash, no act on a metric the phase made up; from the first epoch the
      user's step runs in, they check as before.
    - The RELA phase runs on `rela_views`; at the switch the loader takes the views it was made with
      (the user's transform): `loader.set_views`, effective from the next batch.
    - Logs (straight to the trainer's loggers, and to `callback_metrics`): `rela/lambda` and
      `rela/phase` (1 before the switch, 0 from it) at every step where they change; `rela/loss`
      at the first RELA step and then every `log_every_n_steps` steps (one device→host read and,
      under DDP, one all-reduce per interval); `rela/rho` where the rule runs on ρ (blend, and
      adaptive under the scaled or reference rule), `rela/projected_fall` where the evidence rule
      has read the trend. `adaptive`/`blend` decide at those reads; `fixed:c` switches at epoch
      ⌊c·max_epochs⌋.
    - Under DDP the transfer head is unused after the switch and the SSL heads before it: use a
      strategy that finds unused parameters (`ddp_find_unused_parameters_true`, as lightly's
      benchmarks do).
    """

    def __init__(self, targets, phase: str = "adaptive", rela_views="rela", features=backbone_features,
                 feature_dim: int | None = None, probe_size: int = 224, **accelerator_options) -> None:
        super().__init__()
        from rela.data.store import TargetStore

        self.store = targets if isinstance(targets, TargetStore) else TargetStore.open(targets)
        self.phase, self.rela_views, self.features = phase, rela_views, features
        self.feature_dim, self.probe_size, self.options = feature_dim, probe_size, accelerator_options
        self.acc: Accelerator | None = None
        self._losses: list[torch.Tensor] = []  # RELA losses since the last read
        self._logged: tuple[float, float] | None = None  # (λ, phase) last written to the loggers
        self._read_once = False  # the first RELA step is read at once (a short first epoch shows it)
        self._user_steps = 0  # steps of this epoch the user's training_step ran in
        self._step_at = 0  # the optimizer step of the batch in flight

    # --- set-up: the accelerator joins the module before the optimizers are made ------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.acc is not None or stage != "fit":
            return
        dim = self.feature_dim or _feature_dim(self.features, pl_module, self.probe_size)
        self.acc = Accelerator(dim, self.store.dim, self.phase, loader=None, ssl_views=None, **self.options)
        pl_module.add_module("rela", self.acc)
        user_step = pl_module.training_step
        pl_module.training_step = lambda batch, batch_idx, *a, **k: self._step(pl_module, user_step, batch,
                                                                               batch_idx, *a, **k)
        for callback in trainer.callbacks:
            if callback is not self and isinstance(getattr(callback, "monitor", None), str):
                _guard_monitor(callback, self._hides)

    def _hides(self, monitor: str, trainer) -> bool:
        """Whether `monitor` is missing because the RELA phase kept the user's step from running."""
        return monitor not in trainer.callback_metrics and self._user_steps == 0

    def on_train_start(self, trainer, pl_module) -> None:
        loader = self._loader(trainer)
        ssl_views = loader.views  # as the user made it, before a saved state restores other views
        super().on_train_start(trainer, pl_module)  # the loader's state (a resumed fit)
        self.acc.loader, self.acc.ssl_views = loader, ssl_views
        total = trainer.estimated_stepping_batches  # the switch window and the scaled rule need the run's length
        if math.isfinite(total):
            self.acc.plan(int(total))
        if self.acc.lam == 1 and not self.acc.switched:  # the RELA phase runs on its own views
            loader.set_views(self.rela_views)
        owned = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if not all(id(p) in owned for p in self.acc.transfer.parameters() if p.requires_grad):
            raise RelaError("the RELA transfer head (pl_module.rela) is in no optimizer, so it would never train: "
                            "add self.rela's parameters in configure_optimizers (e.g. list self.rela beside the "
                            "backbone and heads)")

    def _loader(self, trainer) -> Loader:
        loaders = rela_loaders(trainer)
        if len(loaders) != 1:
            raise RelaError(
                f"RelaCallback trains with one rela.Loader as the training dataloader, found {len(loaders)}"
            )
        loader = loaders[0]
        if loader.batch_format == "tuple":
            raise RelaError("batch_format='tuple' carries no targets: use batch_format='lightly' (lightly's "
                            "(views, labels, extra) shape) or 'dict' with RelaCallback")
        if loader.targets is None or Path(loader.targets.path).resolve() != Path(self.store.path).resolve():
            raise RelaError(f"the training loader must yield this callback's targets: rela.Loader(..., "
                            f"targets={str(self.store.path)!r})")
        return loader

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._user_steps = 0
        self.acc.begin_epoch(trainer.current_epoch, trainer.max_epochs, trainer.global_step)  # fixed:c

    # --- the step -----------------------------------------------------------------------------------
    def _step(self, pl_module, user_step, batch, batch_idx, *args, **kwargs):
        step = self._step_at = pl_module.trainer.global_step
        lam = self.acc.lam_at(step)  # falls over the hand-over window
        phase = 0.0 if self.acc.switched and step >= self.acc.switched_at else 1.0
        if (lam, phase) != self._logged:
            self._logged = (lam, phase)
            self._write(pl_module, step, {"rela/lambda": lam, "rela/phase": phase})
        if lam == 1:
            ssl = None
        else:
            self._user_steps += 1
            ssl = user_step(batch, batch_idx, *args, **kwargs)
        if lam == 0:
            return ssl
        views, extra = _views_and_extra(batch)
        feats = self.features(pl_module, torch.cat(list(views))).view(len(views), len(views[0]), -1)
        rela = self.acc.loss(feats.float(), extra["target"], extra["index"])
        self._losses.append(self.acc.last_loss)
        if ssl is None:
            hook = getattr(pl_module, "on_rela_step", None)
            more = hook(batch, batch_idx, feats) if hook is not None else None
            return lam * rela if more is None else lam * rela + more
        ssl_loss = ssl["loss"] if isinstance(ssl, dict) else ssl
        total = lam * rela + (1 - lam) * ssl_loss
        return {**ssl, "loss": total} if isinstance(ssl, dict) else total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self._step_at  # the optimizer step this batch trained in
        due = (step + 1) % trainer.log_every_n_steps == 0 or not self._read_once
        if self._losses and (due or self.acc.lam_at(step + 1) == 0):  # λ = 0 next: nothing more to read
            self._read_once = True
            self._decide(pl_module, step)

    def _decide(self, pl_module, step: int) -> None:
        """The accumulated steps' RELA losses: one read (and one all-reduce), then the phase rule
        (adaptive/blend) and the log."""
        values = torch.stack(self._losses).double()
        self._losses = []
        if dist_util.active():
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= dist.get_world_size()
        values = values.tolist()
        reading = self.acc.evidence
        if self.acc.mode in ("adaptive", "blend"):
            self.acc.observe(values)  # also hands the per-sample scores to the loader
        else:
            self.acc.flush_scores()  # scored subsets: this interval's losses reach the loader here
        logs = {"rela/loss": sum(values) / len(values)}
        if self.acc.mode == "blend" or (self.acc.mode == "adaptive" and self.acc.rule != "evidence"):
            logs["rela/rho"] = self.acc.rho  # the rules that decide on ρ
        elif self.acc.evidence is not reading and "fall_upper" in self.acc.evidence:  # read now (the switch's too)
            logs["rela/projected_fall"] = self.acc.evidence["fall_upper"]  # what the evidence rule decides on
        self._write(pl_module, step, logs)

    def _write(self, pl_module, step: int, metrics: dict[str, float]) -> None:
        """To the trainer's loggers at `step`, whatever `log_every_n_steps` says (values change
        rarely; each is written once), and to `callback_metrics` for callbacks that read them."""
        trainer = pl_module.trainer
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        pl_module.log_dict(metrics, logger=False, on_step=True, on_epoch=False)

    # --- the callback's own state: what a resumed fit needs to log and decide as the straight one --
    def state_dict(self) -> dict:
        return {"losses": [float(x) for x in self._losses], "logged": self._logged, "read_once": self._read_once}

    def load_state_dict(self, state: dict) -> None:
        self._losses = [torch.tensor(x) for x in state.get("losses", [])]
        self._logged = tuple(state["logged"]) if state.get("logged") else None
        self._read_once = bool(state.get("read_once", False))


# The methods that act on a monitored metric, where Lightning's callbacks have them: skipping one
# leaves the callback's other work (ModelCheckpoint's last and every-n-steps saves) as it was.
_METRIC_CHECKS = ("_run_early_stopping_check", "_save_topk_checkpoint")
_MONITOR_HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_validation_epoch_end", "on_validation_end")


def _guard_monitor(callback, hides) -> None:
    """Make `callback` skip its metric check while `hides(callback.monitor, trainer)`: Lightning's
    own monitors at their check method, any other monitoring callback at its hooks."""
    names = [n for n in _METRIC_CHECKS if hasattr(callback, n)] or [n for n in _MONITOR_HOOKS if hasattr(callback, n)]
    for name in names:
        original = getattr(callback, name)

        def guarded(trainer, *args, _original=original, **kwargs):
            if hides(callback.monitor, trainer):
                return None
            return _original(trainer, *args, **kwargs)

        setattr(callback, name, guarded)
    _log.info("rela: %s(monitor=%r) skips its checks in epochs the RELA phase keeps your training_step from "
              "running (the metric is not computed there)", type(callback).__name__, callback.monitor)


def _views_and_extra(batch) -> tuple[list, dict]:
    if isinstance(batch, dict):
        return batch["views"], batch
    return batch[0], batch[2]


def _feature_dim(features, pl_module, size: int) -> int:
    """The backbone's feature width, from one forward pass of two blank images (eval mode, no grad)."""
    device = next(pl_module.parameters()).device
    was = pl_module.training
    pl_module.eval()
    with torch.no_grad():
        dim = features(pl_module, torch.zeros(2, 3, size, size, device=device)).shape[-1]
    pl_module.train(was)
    return int(dim)
