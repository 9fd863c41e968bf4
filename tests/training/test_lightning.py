"""rela.Loader as the train_dataloader() of a LightningDataModule under a real Lightning Trainer:
set_epoch reaches the loader each epoch, and a run resumed from Lightning's own checkpoint
(which stores the loader's state_dict) sees the same batches as an uninterrupted one. Under
Lightning DDP (2 CPU processes, gloo; tests/training/lightning_fit.py), a loader built before fit() shards,
and with rela.LoaderState a mid-epoch resume replays exactly the remaining batches, also when
configure_optimizers reads estimated_stepping_batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rela import Loader
from rela.data.datasets import ArrayDataset
from tests.conftest import run_cli

L = __import__("lightning") if os.environ.get("CI") else pytest.importorskip("lightning")  # a dev dependency


class _Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3 * 8 * 8, 4)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, _):
        (x0, _x1), y = batch  # the loop body of a lightly/torch SSL example, unchanged
        self.seen.append((self.current_epoch, y.tolist()))
        return torch.nn.functional.cross_entropy(self.net(x0.flatten(1)), y % 4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.dataset = ArrayDataset(rng.integers(0, 255, (64, 10, 10, 3), dtype=np.uint8), np.arange(64))

    def train_dataloader(self):
        return Loader(self.dataset, 8, views="byol", image_size=8, num_workers=0, batch_format="tuple", subset=0.5)


def _fit(root, epochs: int, ckpt=None) -> _Model:
    model = _Model()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(model, _Data(), ckpt_path=ckpt)
    return model


def test_rela_loader_under_a_lightning_trainer(tmp_path):
    first = _fit(tmp_path / "a", 2)
    assert [e for e, _ in first.seen] == [0] * 4 + [1] * 4  # len(loader) = 32 / 8 steps per epoch
    epoch0, epoch1 = (sorted(sum((y for e, y in first.seen if e == k), [])) for k in (0, 1))
    assert epoch0 != epoch1  # set_epoch reached the loader: a fresh 50% subset each epoch
    (ckpt,) = (tmp_path / "a").rglob("*.ckpt")
    resumed = _fit(tmp_path / "b", 3, ckpt=str(ckpt))
    straight = _fit(tmp_path / "c", 3)
    assert [y for e, y in resumed.seen] == [y for e, y in straight.seen if e == 2]


_FIT = Path(__file__).with_name("lightning_fit.py")


def _lightning_fit(out: Path, *args: str) -> dict[int, dict]:
    r = subprocess.run([sys.executable, str(_FIT), str(out), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def _trained(run: dict) -> list[tuple[int, int, int]]:
    return [(s["epoch"], s["batch"], s["pixels"]) for s in run["seen"]]


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory):
    """Two epochs on two ranks, a checkpoint every 3 steps (all kept)."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    return out, _lightning_fit(out, "--devices", "2", "--epochs", "2", "--every", "3")


def test_a_loader_built_before_fit_shards_under_lightning_ddp(ddp_straight):
    _, ranks = ddp_straight
    assert sorted(ranks) == [0, 1] and all(r["world"] == 2 and r["len"] == 8 for r in ranks.values())
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 16  # 64 / 2 ranks / batch 4, two epochs
    for epoch in (0, 1):
        shares = [sorted(sum((s["labels"] for s in ranks[r]["seen"] if s["epoch"] == epoch), [])) for r in (0, 1)]
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(64))


@pytest.mark.parametrize("devices, bare", [(1, False), (2, False), (2, True)])
def test_a_mid_epoch_resume_replays_exactly_the_remaining_batches(ddp_straight, tmp_path, devices, bare):
    """With rela.LoaderState in the callbacks, and (bare) without: a bare swap to rela.Loader gets
    the LoaderState every Trainer has through rela's entry point."""
    if devices == 2:
        straight_dir, straight = ddp_straight
    else:
        straight_dir = tmp_path / "straight"
        straight = _lightning_fit(straight_dir, "--epochs", "2", "--every", "3")
    resumed = _lightning_fit(tmp_path / "resumed", "--devices", str(devices), "--epochs", "2",
                             "--ckpt", str(straight_dir / "ckpt" / "step=3.ckpt"),  # 3 batches into epoch 0
                             *(["--no-loader-state"] if bare else []))
    assert sorted(resumed) == sorted(straight) == list(range(devices))
    for rank in straight:  # the same pixels, batch for batch: not labels alone
        assert _trained(resumed[rank]) == _trained(straight[rank])[3:]


def test_a_loader_refuses_to_iterate_in_a_job_whose_group_it_cannot_see(monkeypatch):
    from rela.errors import RelaError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    loader = Loader(_Data().dataset, 8, image_size=8, num_workers=0)
    with pytest.raises(RelaError, match="rank 1 of a 2-process job .*no process group yet.*rank= and world_size="):
        next(iter(loader))
    assert len(Loader(_Data().dataset, 8, image_size=8, num_workers=0, rank=1, world_size=2)) == 4


def test_the_loader_seed_follows_the_users_seed():
    ds = _Data().dataset
    order = lambda loader: [b["index"].tolist() for b in loader]  # noqa: E731
    torch.manual_seed(5)  # what seed_everything(5) sets
    a, b = Loader(ds, 8, image_size=8, num_workers=0), Loader(ds, 8, image_size=8, num_workers=0)
    torch.manual_seed(6)
    c = Loader(ds, 8, image_size=8, num_workers=0)
    assert a.seed == b.seed == 5 and c.seed == 6
    assert order(a) == order(b) != order(c)
    c.load_state_dict(a.state_dict())  # a resumed run continues the saved run's stream (at epoch 1)
    ref = Loader(ds, 8, image_size=8, num_workers=0, seed=5)
    ref.set_epoch(1)
    assert c.seed == 5 and order(c) == order(ref)


_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightly_imagenet_byol.py"


def _metrics(run: Path) -> list[dict]:
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_lightlys_byol_benchmark_with_rela_under_ddp(tmp_path):
    """examples/lightly_imagenet_byol.py: lightly's BYOL module (online classifier, validation step)
    and main.py's callbacks (EarlyStopping on train_loss, LearningRateMonitor, DeviceStatsMonitor,
    MetricCallback) on pytorch_lightning, with the README's diff only; two CPU ranks. 96 images / 2
    ranks / batch 8 = 6 steps an epoch; RELA for epochs 0-1, BYOL for 2-3; a resume from 3 steps into
    epoch 0 logs what the straight run logged. (--base-lr 30: lightly's LARS moves a weight by lr x
    0.001 x its norm per step, so at batch 8 its 0.45 trains nothing in 24 steps.)"""
    from tests.conftest import make_folder

    data = make_folder(tmp_path / "imgs", classes=6, per_class=16)  # 6 classes: the classifier's top-5
    store = tmp_path / "store"
    assert run_cli("convert", "--data", str(data), "--prior", "random:resnet18", "--dim", "16", "--input-size", "32",
                   "--out", str(store), "--quiet").returncode == 0
    args = ["--data", str(data), "--store", str(store), "--arch", "resnet18", "--image-size", "32",
            "--batch-size-per-device", "8", "--epochs", "4", "--accelerator", "cpu", "--precision", "32",
            "--num-workers", "0", "--warmup-epochs", "0", "--base-lr", "30", "--log-every-n-steps", "1",
            "--devices", "2", "--phase", "fixed:0.5", "--num-classes", "6"]

    def example(out: Path, *more: str) -> list[dict]:
        r = subprocess.run([sys.executable, str(_EXAMPLE), *args, "--out", str(out), *more], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "max val_online_cls_top1: " in r.stdout  # main.py's MetricCallback read the validation metrics
        return _metrics(out)

    rows = example(tmp_path / "straight", "--checkpoint-every-n-steps", "3")
    at = lambda key: [(int(r["step"]), float(r[key])) for r in rows if r[key]]  # noqa: E731
    # λ and the phase, logged where they change: the RELA phase, the switch (epoch 2 = step 12), the floor
    assert [(int(r["step"]), float(r["rela/lambda"]), float(r["rela/phase"])) for r in rows if r["rela/lambda"]] \
        == [(0, 1.0, 1.0), (12, 0.75, 0.0), (13, 0.5, 0.0)]
    assert [s for s, _ in at("rela/loss")] == list(range(24))  # every step (log_every_n_steps=1), residual too
    assert {s for s, _ in at("train_loss")} == set(range(12, 24))  # the user's step from the switch
    assert {s for s, _ in at("train_online_cls_loss")} == set(range(24))  # on_rela_step trained it in the phase
    assert "rela/rho" not in rows[0]  # fixed: no rule computes ρ
    losses = [v for s, v in at("rela/loss") if s < 12]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.2, losses  # the RELA phase trains the head and backbone
    ckpt = tmp_path / "straight" / "checkpoints"
    first, mid, last = (torch.load(ckpt / name, weights_only=False) for name in
                        ("epoch=0-step=3.ckpt", "epoch=1-step=9.ckpt", "last.ckpt"))
    # the momentum teacher follows the backbone during the RELA phase (on_rela_step's update_momentum)
    moved = sum((mid["state_dict"][k] - first["state_dict"][k]).float().norm() for k in first["state_dict"]
                if k.startswith("teacher_backbone.") and k.endswith("weight"))
    assert moved > 1e-3, moved
    assert not torch.equal(first["state_dict"]["rela.transfer.weight"], last["state_dict"]["rela.transfer.weight"])
    assert float(last["state_dict"]["rela.weight"]) == 0.0 and int(last["state_dict"]["rela.switch_step"]) == 12
    (stop,) = [v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping")]
    assert stop["wait_count"] == 0 and torch.isfinite(stop["best_score"])  # it watched the real train_loss
    resumed = example(tmp_path / "resumed", "--ckpt-path", str(ckpt / "epoch=0-step=3.ckpt"))
    def key(rs):
        return sorted((r["step"], r["rela/loss"][:6], r["rela/lambda"], r["train_loss"][:6]) for r in rs
                      if int(r["step"]) >= 3 and (r["rela/loss"] or r["rela/lambda"] or r["train_loss"]))

    assert key(resumed) == key(rows)


def test_relacallback_refuses_a_head_no_optimizer_trains_and_a_loader_without_targets(tmp_path):
    from rela import RelaCallback, convert
    from rela.errors import RelaError

    ds = _Data().dataset
    store = convert(ds, "random:resnet18", tmp_path / "s", dim=4, input_size=32, progress=False)

    class Listed(L.LightningModule):  # configure_optimizers names its modules, without self.rela
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))

        def training_step(self, batch, _):
            return self.backbone(batch[0][0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.backbone.parameters(), lr=0.1)

    def fit(batch_format):
        loader = Loader(ds, 8, image_size=8, num_workers=0, targets=store, batch_format=batch_format)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                            callbacks=[RelaCallback(store, phase="fixed:0.5", probe_size=8)])
        trainer.fit(Listed(), train_dataloaders=loader)

    with pytest.raises(RelaError, match="transfer head .* is in no optimizer"):
        fit("lightly")
    with pytest.raises(RelaError, match="batch_format='tuple' carries no targets"):
        fit("tuple")
