"""BYOL on ImageNet as lightly's benchmark trains it (benchmarks/imagenet/resnet50: a LightningModule,
BYOLTransform, LARS with a cosine warm-up schedule, a cosine momentum schedule), with rela's loader
and the RELA phase. What changes against lightly's script (see the README, "In your Lightning code"):

    - dataloader = DataLoader(LightlyDataset(train_dir, transform=transform), ...)
    + store = rela.convert(train_dir, "efficientnet-lite0", store_dir, dim=256)       # once, < 1% of a run
    + dataloader = rela.Loader(train_dir, batch_size, views=transform, targets=store, batch_format="lightly", ...)
    - callbacks=[...]
    + callbacks=[..., rela.RelaCallback(store, phase="fixed:0.5")]
      get_weight_decay_parameters([self.backbone, self.projection_head, self.prediction_head,
    +                              self.rela])   # the transfer head trains with the rest

On GPUs with lightly's published settings (ResNet-50, 100 epochs, 128 images per device, LARS lr
0.45 x global batch / 256, 10 warm-up epochs, 16-bit mixed precision):

    python examples/lightly_imagenet_byol.py --data /data/imagenet/train --store runs/in1k-lite0 \\
        --devices 8 --epochs 50 --phase fixed:0.5

On a CPU, a tiny run (tests/test_lightning.py runs one):

    python examples/lightly_imagenet_byol.py --data FOLDER --store STORE --arch resnet18 --image-size 32 \\
        --batch-size-per-device 8 --epochs 2 --accelerator cpu --precision 32 --num-workers 0
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import lightning as L
import torch
import torchvision
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import get_weight_decay_parameters, update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

import rela


class BYOL(L.LightningModule):
    """lightly's BYOL benchmark module (its online linear classifier left out)."""

    def __init__(self, arch: str, batch_size_per_device: int, warmup_epochs: int, base_lr: float = 0.45) -> None:
        super().__init__()
        self.batch_size_per_device, self.warmup_epochs, self.base_lr = batch_size_per_device, warmup_epochs, base_lr
        resnet = getattr(torchvision.models, arch)()
        dim = resnet.fc.in_features
        resnet.fc = torch.nn.Identity()
        self.backbone = resnet
        self.projection_head = BYOLProjectionHead(dim, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_projection_head = copy.deepcopy(self.projection_head)
        self.teacher_backbone.requires_grad_(False)
        self.teacher_projection_head.requires_grad_(False)
        self.criterion = NegativeCosineSimilarity()

    def forward_student(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(1)))

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_projection_head(self.teacher_backbone(x).flatten(1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        momentum = cosine_schedule(self.global_step, self.trainer.estimated_stepping_batches, 0.99, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.projection_head, self.teacher_projection_head, m=momentum)
        views, targets = batch[0], batch[1]  # rela's "lightly" batches: (views, labels, {index, target})
        teacher = self.forward_teacher(torch.cat(views)).chunk(len(views))
        student = self.forward_student(torch.cat(views)).chunk(len(views))
        loss = 0.5 * (self.criterion(student[0], teacher[1]) + self.criterion(student[1], teacher[0]))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def configure_optimizers(self):
        params, no_decay = get_weight_decay_parameters(
            [self.backbone, self.projection_head, self.prediction_head, self.rela])  # + the RELA transfer head
        optimizer = LARS([{"name": "byol", "params": params},
                          {"name": "byol_no_weight_decay", "params": no_decay, "weight_decay": 0.0}],
                         lr=self.base_lr * self.batch_size_per_device * self.trainer.world_size / 256,
                         momentum=0.9, weight_decay=1e-6)
        steps = self.trainer.estimated_stepping_batches
        scheduler = {"scheduler": CosineWarmupScheduler(
            optimizer, warmup_epochs=int(steps / self.trainer.max_epochs * self.warmup_epochs), max_epochs=int(steps)),
            "interval": "step"}
        return [optimizer], [scheduler]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training image folder (class sub-folders)")
    p.add_argument("--store", required=True, help="target store; converted here from --prior when missing")
    p.add_argument("--prior", default="efficientnet-lite0", help="prior for a missing store (default efficientnet-lite0)")
    p.add_argument("--dim", type=int, default=256, help="target dim for a missing store")
    p.add_argument("--phase", default="fixed:0.5", help="RELA phase: fixed:<fraction> | adaptive | blend | off")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet (lightly's benchmark: resnet50)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=int, default=10, help="LARS warm-up epochs (lightly's: 10)")
    p.add_argument("--base-lr", type=float, default=0.45,
                   help="LARS lr x global batch / 256 (lightly's: 0.45). LARS moves a weight by lr x 0.001 x its "
                        "norm per step, so tiny CPU batches need a far larger base to train at all")
    p.add_argument("--batch-size-per-device", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="16-mixed")
    p.add_argument("--log-every-n-steps", type=int, default=50)
    p.add_argument("--checkpoint-every-n-steps", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--ckpt-path", help="resume from this checkpoint")
    p.add_argument("--out", default="runs/lightly-byol", help="logs and checkpoints")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    L.seed_everything(args.seed)  # rela.Loader's seed follows it
    store = Path(args.store)
    if not (store / "manifest.json").exists():
        rela.convert(args.data, args.prior, store, dim=args.dim)
    normalize = IMAGENET_NORMALIZE
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=args.image_size, normalize=normalize),
                              view_2_transform=BYOLView2Transform(input_size=args.image_size, normalize=normalize))
    loader = rela.Loader(args.data, args.batch_size_per_device, views=transform, targets=store,
                         batch_format="lightly", num_workers=args.num_workers, drop_last=True)
    callbacks = [rela.RelaCallback(store, phase=args.phase, probe_size=args.image_size),
                 L.pytorch.callbacks.ModelCheckpoint(dirpath=Path(args.out) / "checkpoints", save_last=True,
                                                     every_n_train_steps=args.checkpoint_every_n_steps or None,
                                                     save_top_k=-1 if args.checkpoint_every_n_steps else 1,
                                                     filename="{epoch}-{step}")]
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices,
                        strategy="ddp_find_unused_parameters_true" if args.devices > 1 else "auto",
                        precision=args.precision, callbacks=callbacks, log_every_n_steps=args.log_every_n_steps,
                        logger=L.pytorch.loggers.CSVLogger(args.out, name="logs", version=""),
                        sync_batchnorm=args.devices > 1 and args.accelerator != "cpu", default_root_dir=args.out,
                        enable_progress_bar=False)
    model = BYOL(args.arch, args.batch_size_per_device, args.warmup_epochs, args.base_lr)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
