"""rela inside the user's Lightning code: two callbacks.

- `LoaderState`: a resumed fit sees exactly the remaining batches (below).
- `RelaCallback`: the whole RELA phase for any LightningModule (it includes LoaderState).

    loader = rela.Loader(train_dir, views=train_transform, targets=store, batch_format="lightly", ...)
    trainer = L.Trainer(..., callbacks=[rela.RelaCallback(phase="fixed:0.5"), ModelCheckpoint(...)])

Lightning saves a stateful loader's `state_dict()` in its checkpoints, but hands the state back
only while it sets the training data up, and it sets data up early — before restoring the
checkpoint — whenever something asks for `trainer.estimated_stepping_batches` (every lightly
benchmark module does, in `configure_optimizers`). The loader then started its epoch from batch 0:
the first part of the epoch trained twice, the rest never, without a word. This callback keeps the
loaders' states in the checkpoint itself and restores them in `on_train_start`, which Lightning
calls after the restore and before the first batch, whatever order it set data up in.

Rank and world size need no callback: `rela.Loader` reads them from the process group when it
iterates, so a loader built before `fit()` creates the group shards correctly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rela import distributed as dist_util
from rela.errors import RelaError
from rela.loading.loader import Loader
from rela.training.accelerate import Accelerator

try:
    from lightning.pytorch import Callback
except ImportError as e:  # Lightning is the user's dependency, not rela's
    raise ImportError("rela's Lightning callbacks need Lightning: pip install lightning") from e

KEY = "rela_loaders"  # the checkpoint entry: one state per rela.Loader among the training loaders


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


class LoaderState(Callback):
    """Saves every training `rela.Loader`'s state in Lightning's checkpoints and restores it before
    the first batch of a resumed fit (see the module doc for why Lightning alone can miss it)."""

    def __init__(self) -> None:
        self._pending: list[dict] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loaders = rela_loaders(trainer)
        if loaders:
            checkpoint[KEY] = [loader.state_dict() for loader in loaders]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY)

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


def backbone_features(module, images: torch.Tensor) -> torch.Tensor:
    """The default `features=`: `module.backbone(images)` flattened, as lightly's modules compute it."""
    return module.backbone(images).flatten(1)


class RelaCallback(LoaderState):
    """The RELA phase (ReLA-F) for a LightningModule whose `training_step` returns its SSL loss.

    - The `Accelerator` becomes `pl_module.rela` in `setup()`: `self.parameters()` includes its
      transfer head, and its phase state is saved and restored with the model's weights. A
      `configure_optimizers` that lists modules (lightly's `get_weight_decay_parameters([...])`)
      must list `self.rela` too: a transfer head in no optimizer is refused when training starts.
    - `training_step` is wrapped: while λ = 1 (the RELA phase) it is λ·RELA loss and the user's
      step is not run (its loss would get weight 0); then the user's loss, alone; in `blend`, both.
      The loader must yield targets: `targets=store` and `batch_format="lightly"` (or "dict").
    - The RELA phase runs on `rela_views`; at the switch the loader takes the views it was made with
      (the user's transform): `loader.set_views`, effective from the next batch.
    - `adaptive`/`blend` decide every `trainer.log_every_n_steps` steps from those steps' RELA
      losses (one device→host read and, under DDP, one all-reduce per decision, none per step);
      `fixed:c` switches at epoch ⌊c·max_epochs⌋. λ, ρ and the phase are logged as rela/lambda,
      rela/rho, rela/phase.
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
        self._losses: list[torch.Tensor] = []
        self._lam: float | None = None  # λ of the last step

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
            raise RelaError(f"RelaCallback trains with one rela.Loader as the training dataloader, found {len(loaders)}")
        loader = loaders[0]
        if loader.batch_format == "tuple":
            raise RelaError("batch_format='tuple' carries no targets: use batch_format='lightly' (lightly's "
                            "(views, labels, extra) shape) or 'dict' with RelaCallback")
        if loader.targets is None or Path(loader.targets.path).resolve() != Path(self.store.path).resolve():
            raise RelaError(f"the training loader must yield this callback's targets: rela.Loader(..., "
                            f"targets={str(self.store.path)!r})")
        return loader

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.acc.begin_epoch(trainer.current_epoch, trainer.max_epochs, trainer.global_step)  # fixed:c

    # --- the step -----------------------------------------------------------------------------------
    def _step(self, pl_module, user_step, batch, batch_idx, *args, **kwargs):
        lam = self.acc.lam_at(pl_module.trainer.global_step)  # falls over the hand-over window
        self._lam = lam  # what this step used, for the log
        ssl = user_step(batch, batch_idx, *args, **kwargs) if lam < 1 else None
        if lam == 0:
            return ssl
        views, extra = _views_and_extra(batch)
        feats = self.features(pl_module, torch.cat(list(views))).view(len(views), len(views[0]), -1)
        rela = self.acc.loss(feats.float(), extra["target"], extra["index"])
        self._losses.append(self.acc.last_loss)
        ssl_loss = ssl["loss"] if isinstance(ssl, dict) else ssl
        total = lam * rela if ssl is None else lam * rela + (1 - lam) * ssl_loss
        return {**ssl, "loss": total} if isinstance(ssl, dict) else total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self._losses) >= trainer.log_every_n_steps:
            self._decide(pl_module)

    def _decide(self, pl_module) -> None:
        """The accumulated steps' RELA losses: one read (and one all-reduce), then the phase rule
        (adaptive/blend) and the log."""
        values = torch.stack(self._losses).double()
        self._losses = []
        if dist_util.active():
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= dist.get_world_size()
        values = values.tolist()
        if self.acc.mode in ("adaptive", "blend"):
            self.acc.observe(values)  # also hands the per-sample scores to the loader
        else:
            self.acc.flush_scores()  # scored subsets: this interval's losses reach the loader here
        self._log(pl_module, sum(values) / len(values))

    def _log(self, pl_module, loss: float | None = None) -> None:
        lam = self._lam if self._lam is not None else self.acc.lam
        logs = {"rela/lambda": lam, "rela/rho": self.acc.rho, "rela/phase": float(lam > 0)}
        if loss is not None:
            logs["rela/loss"] = loss
        pl_module.log_dict(logs, on_step=True, on_epoch=False)


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
