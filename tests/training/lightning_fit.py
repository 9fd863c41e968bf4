"""A Lightning fit with rela.Loader, run as its own script by tests/training/test_lightning.py (Lightning's DDP
launcher starts the other ranks by running this file again). Shaped like lightly's benchmark
modules: the loader is built before fit() creates the process group, and configure_optimizers
reads trainer.estimated_stepping_batches for its schedule. Each rank writes what it trained on.

    python tests/training/lightning_fit.py OUT --devices 2 --epochs 2 [--ckpt PATH] [--every 2] [--no-loader-state]
                                           [--data SPEC]   (shards, an s3:// prefix, ...: else 64 arrays)
"""

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the checkout's rela

import rela  # noqa: E402
from rela.data.datasets import ArrayDataset  # noqa: E402


class Model(L.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.net = torch.nn.Linear(3 * 8 * 8, 4)
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        (x0, _x1), y = batch[0], batch[1]  # lightly's loop body, unchanged
        self.seen.append({"epoch": self.current_epoch, "batch": batch_idx, "labels": y.tolist(),
                          "pixels": zlib.crc32(x0.numpy().tobytes()),
                          **({"index": batch[2]["index"].tolist()} if len(batch) == 3 else {})})
        return torch.nn.functional.cross_entropy(self.net(x0.flatten(1)), y % 4)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = self.trainer.estimated_stepping_batches  # sets the data up before a checkpoint is restored
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (steps + 1))]

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(
            {"seen": self.seen, "world": self.trainer.world_size, "len": len(self.trainer.train_dataloader)}))


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("out")
    a.add_argument("--devices", type=int, default=1)
    a.add_argument("--epochs", type=int, default=2)
    a.add_argument("--ckpt")
    a.add_argument("--every", type=int, default=0, help="checkpoint every N steps, all kept")
    a.add_argument("--data", help="a dataset spec rela opens (batches then carry their indices)")
    a.add_argument(
        "--no-loader-state",
        action="store_true",
        help="a bare swap: no rela.LoaderState in the callbacks (the one every Trainer gets acts)",
    )
    args = a.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(7)
    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.integers(0, 255, (64, 10, 10, 3), dtype=np.uint8), np.arange(64))
    loader = rela.Loader(args.data or dataset, 4, views="byol", image_size=8, num_workers=0,
                         batch_format="lightly" if args.data else "tuple")
    callbacks = [] if args.no_loader_state else [rela.LoaderState()]
    if args.every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, logger=False,
                        strategy="ddp" if args.devices > 1 else "auto", callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(args.every),
                        default_root_dir=str(out))
    trainer.fit(Model(out), train_dataloaders=loader, ckpt_path=args.ckpt)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
