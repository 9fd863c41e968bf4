"""rela.Loader as the train_dataloader() of a LightningDataModule under a real Lightning Trainer:
set_epoch reaches the loader each epoch, and a run resumed from Lightning's own checkpoint
(which stores the loader's state_dict) sees the same batches as an uninterrupted one."""

import os

import numpy as np
import pytest
import torch

from rela import Loader
from rela.data.datasets import ArrayDataset

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
