"""rela inside the user's Lightning code: `LoaderState`, a callback that makes a resumed fit see
exactly the remaining batches.

    trainer = L.Trainer(..., callbacks=[rela.LoaderState(), ModelCheckpoint(every_n_train_steps=...)])

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

from rela.errors import RelaError
from rela.loading.loader import Loader

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
