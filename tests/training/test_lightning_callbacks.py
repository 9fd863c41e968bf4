"""RelaCallback inside a user's Lightning code, in-process, under both Lightning namespaces: the
user's monitors survive the RELA phase, the module's on_rela_step runs in it, the logs say what
each step did, and every Trainer resumes a rela.Loader exactly without being asked."""

import copy
import csv
import importlib
import os

import numpy as np
import pytest
import torch

from rela import Loader, convert
from rela.data.datasets import ArrayDataset

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
if not os.environ.get("CI"):  # dev dependencies: CI has both (lightly brings pytorch_lightning)
    NAMESPACES = [n for n in NAMESPACES if importlib.util.find_spec(n.split(".")[0])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (64, 10, 10, 3), dtype=np.uint8), np.arange(64) % 4)
    store = convert(ds, "random:resnet18", tmp_path_factory.mktemp("store") / "s", dim=4, input_size=32,
                    progress=False)
    return ds, store


def _module(pl):
    class Model(pl.LightningModule):
        """A user's module: a momentum teacher updated in training_step, train_loss logged there."""

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
            self.initial = copy.deepcopy(self.teacher)
            self.rela_steps = 0

        def update_teacher(self):
            for t, s in zip(self.teacher.parameters(), self.backbone.parameters(), strict=True):
                t.data.mul_(0.9).add_(0.1 * s.data)

        def training_step(self, batch, batch_idx):
            self.update_teacher()
            loss = (self.backbone(batch[0][0]) - self.teacher(batch[0][1])).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def on_rela_step(self, batch, batch_idx, features):
            assert features.shape == (2, len(batch[1]), 6)  # [views, B, D]: the backbone's features
            self.rela_steps += 1
            self.update_teacher()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.backbone(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def teacher_moved(self) -> float:
            return float(sum((a - b).norm() for a, b in zip(self.teacher.parameters(), self.initial.parameters(),
                                                             strict=True)))

    return Model


def _fit(pl, ds, store, root, callbacks, epochs=4, every=50, **rela_options):
    import rela

    model = _module(pl)()
    loader = Loader(ds, 8, image_size=8, num_workers=0, targets=store, batch_format="lightly")
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8)), batch_size=8)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root), log_every_n_steps=every,
                         logger=pl.loggers.CSVLogger(str(root), name="logs", version=""),
                         callbacks=[*callbacks, rela.RelaCallback(store, probe_size=8, **rela_options)])
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val)
    with open(root / "logs" / "metrics.csv") as f:
        return model, trainer, list(csv.DictReader(f))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_users_monitors_and_side_effects_through_the_rela_phase(data, tmp_path, namespace):
    """lightly's main.py shape: EarlyStopping(monitor="train_loss", check_finite=True), a
    ModelCheckpoint on it, LearningRateMonitor and a callback reading callback_metrics, beside a
    validation loader. train_loss is not computed in the RELA epochs (0-1): the monitors wait, then
    act on the user's own metric; the module's on_rela_step keeps its teacher moving."""
    pl = importlib.import_module(namespace)
    ds, store = data

    class Reader(pl.Callback):  # lightly's MetricCallback reads callback_metrics at each epoch's end
        def __init__(self):
            self.seen = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.seen.append(("train_loss" in trainer.callback_metrics, pl_module.teacher_moved()))

    reader = Reader()
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", patience=int(1e12), check_finite=True)
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", save_last=True,
                                        filename="{epoch}")
    model, trainer, rows = _fit(pl, ds, store, tmp_path, [pl.callbacks.LearningRateMonitor(), stop, best, reader],
                                phase="fixed:0.5", floor=0.0)
    assert trainer.current_epoch == 4 and not trainer.should_stop
    assert [has for has, _ in reader.seen] == [False, False, True, True]  # nothing made up in the RELA epochs
    assert model.rela_steps == 16  # 2 RELA epochs x 8 steps: the module's hook, not its training_step
    assert reader.seen[0][1] > 0 and reader.seen[1][1] > reader.seen[0][1]  # the teacher followed the backbone
    assert "epoch=2" in best.best_model_path or "epoch=3" in best.best_model_path  # best by the real metric only
    assert (tmp_path / "ckpt" / "last.ckpt").exists() and torch.isfinite(stop.best_score)
    # λ and the phase where they change (the switch at step 16, a 3-step hand-over to floor 0), the
    # first RELA loss at once though the epoch (8 steps) is shorter than log_every_n_steps (50), the
    # rest read before λ reaches 0; no ρ under fixed (no rule computes it)
    changes = [(int(r["step"]), float(r["rela/lambda"]), float(r["rela/phase"])) for r in rows if r["rela/lambda"]]
    assert changes == [(0, 1.0, 1.0), (16, pytest.approx(2 / 3), 0.0), (17, pytest.approx(1 / 3), 0.0), (18, 0.0, 0.0)]
    assert [int(r["step"]) for r in rows if r["rela/loss"]] == [0, 17]
    assert "rela/rho" not in rows[0] and "rela/projected_fall" not in rows[0]


@pytest.mark.parametrize("phase, options, logged", [("blend", {}, "rela/rho"),
                                                     ("adaptive", {"rule": "scaled"}, "rela/rho"),
                                                     ("adaptive", {"evidence_steps": 3}, "rela/projected_fall")])
def test_the_quantity_each_rule_decides_on_is_logged(data, tmp_path, phase, options, logged):
    pl = importlib.import_module(NAMESPACES[0])
    ds, store = data
    _, _, rows = _fit(pl, ds, store, tmp_path, [], epochs=2, every=4, phase=phase, **options)
    assert [k for k in rows[0] if k in ("rela/rho", "rela/projected_fall")] == [logged]
    assert [r for r in rows if r[logged]]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_trainer_gets_a_loader_state_that_stands_aside_for_the_users(namespace):
    import rela
    from rela.training.lightning import AutoLoaderState

    pl = importlib.import_module(namespace)
    bare = pl.Trainer(logger=False, enable_progress_bar=False)
    (auto,) = [cb for cb in bare.callbacks if isinstance(cb, AutoLoaderState)]  # the entry point (pyproject.toml)
    assert auto._active(bare)
    own = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[rela.LoaderState()])
    (auto,) = [cb for cb in own.callbacks if isinstance(cb, AutoLoaderState)]
    assert not auto._active(own)


def test_without_lightning_the_error_names_the_extra(monkeypatch):
    from rela.training import lightning as module

    def missing(name, *a, **k):
        raise ImportError(name)

    monkeypatch.setattr(module.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"pip install 'rela-accel\[lightning\]'"):
        module._callback_bases()
