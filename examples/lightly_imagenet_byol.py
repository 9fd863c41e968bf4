"""BYOL on ImageNet as lightly's benchmark trains it (benchmarks/imagenet/resnet50: `main.py` +
`byol.py` at lightly e8d317f — its LightningModule with the online linear classifier and validation
step, BYOLTransform, LARS with a cosine warm-up schedule, a cosine momentum schedule, and main.py's
callbacks: LearningRateMonitor, EarlyStopping on `train_loss`, DeviceStatsMonitor, MetricCallback),
on `pytorch_lightning` as lightly runs it, with rela's loader and the RELA phase. What changes
against lightly's scripts is the README's Lightning quickstart diff, and only that:

    - train_dataloader = DataLoader(LightlyDataset(train_dir, transform=transform), ...)
    + store = rela.convert(train_dir, "efficientnet-lite0", store_dir, dim=256)       # once, < 1% of a run
    + train_dataloader = rela.Loader(train_dir, batch_size, views=transform, targets=store,
    +                                batch_format="lightly", ...)
      callbacks=[..., metric_callback,
    +            rela.RelaCallback(store, phase="fixed:0.5")]
      get_weight_decay_parameters([self.backbone, self.projection_head, self.prediction_head,
    +                              self.rela])   # the transfer head trains with the rest
    + def on_rela_step(self, batch, batch_idx, features):  # the RELA phase runs this, not training_step

The example adds, beyond lightly's scripts, a CSV logger (TensorBoard is not installed here) and a
ModelCheckpoint every N steps for its resume test.

On GPUs with lightly's published settings (ResNet-50, 100 epochs, 128 images per device, LARS lr
0.45 x global batch / 256, 10 warm-up epochs, 16-bit mixed precision):

    python examples/lightly_imagenet_byol.py --data /data/imagenet/train --val-data /data/imagenet/val \\
        --store runs/in1k-lite0 --devices 8 --epochs 50 --phase fixed:0.5

On a CPU, a tiny run (tests/training/test_lightning.py runs one on two ranks):

    python examples/lightly_imagenet_byol.py --data FOLDER --store STORE --arch resnet18 --image-size 32 \\
        --batch-size-per-device 8 --epochs 2 --accelerator cpu --precision 32 --num-workers 0 --num-classes 2
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from lightly.data import LightlyDataset
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import get_weight_decay_parameters, update_momentum
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.benchmarking import MetricCallback, OnlineLinearClassifier
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from pytorch_lightning.callbacks import (
    DeviceStatsMonitor,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from torch.utils.data import DataLoader

import rela


class BYOL(pl.LightningModule):
    """lightly's BYOL benchmark module (byol.py), the backbone's architecture and LARS base lr made options."""

    def __init__(self, batch_size_per_device: int, num_classes: int, arch: str = "resnet50", warmup_epochs: int = 10,
                 base_lr: float = 0.45) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size_per_device, self.warmup_epochs, self.base_lr = batch_size_per_device, warmup_epochs, base_lr
        resnet = getattr(torchvision.models, arch)()
        dim = resnet.fc.in_features
        resnet.fc = torch.nn.Identity()  # Ignore classification head
        self.backbone = resnet
        self.projection_head = BYOLProjectionHead(dim, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_projection_head = BYOLProjectionHead(dim, 4096, 256)
        self.criterion = NegativeCosineSimilarity()
        self.online_classifier = OnlineLinearClassifier(feature_dim=dim, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_student(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self(x).flatten(start_dim=1)
        projections = self.projection_head(features)
        predictions = self.prediction_head(projections)
        return features, predictions

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        features = self.teacher_backbone(x).flatten(start_dim=1)
        return self.teacher_projection_head(features)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Momentum update teacher (lightly: the original code's settings for 100 epochs).
        momentum = cosine_schedule(step=self.trainer.global_step, max_steps=self.trainer.estimated_stepping_batches,
                                   start_value=0.99, end_value=1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.projection_head, self.teacher_projection_head, m=momentum)

        views, targets = batch[0], batch[1]
        teacher_projections_0 = self.forward_teacher(views[0])
        teacher_projections_1 = self.forward_teacher(views[1])
        student_features_0, student_predictions_0 = self.forward_student(views[0])
        _, student_predictions_1 = self.forward_student(views[1])
        # NOTE: Factor 2 because: L2(norm(x), norm(y)) = 2 - 2 * cossim(x, y)
        loss_0 = 2 * self.criterion(teacher_projections_0, student_predictions_1)
        loss_1 = 2 * self.criterion(teacher_projections_1, student_predictions_0)
        loss = loss_0 + loss_1
        self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(targets))

        # Online linear evaluation.
        cls_loss, cls_log = self.online_classifier.training_step((student_features_0.detach(), targets), batch_idx)
        self.log_dict(cls_log, sync_dist=True, batch_size=len(targets))
        return loss + cls_loss

    def on_rela_step(self, batch, batch_idx: int, features: torch.Tensor) -> torch.Tensor:
        """rela's RELA phase runs this instead of training_step: what the step does besides its
        loss — the momentum teacher follows the backbone, the online classifier trains on the
        backbone's features (of the RELA views, [views, B, D]); the loss returned is added."""
        momentum = cosine_schedule(step=self.trainer.global_step, max_steps=self.trainer.estimated_stepping_batches,
                                   start_value=0.99, end_value=1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.projection_head, self.teacher_projection_head, m=momentum)
        targets = batch[1]
        cls_loss, cls_log = self.online_classifier.training_step((features[0].detach(), targets), batch_idx)
        self.log_dict(cls_log, sync_dist=True, batch_size=len(targets))
        return cls_loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        features = self.forward(images).flatten(start_dim=1)
        cls_loss, cls_log = self.online_classifier.validation_step((features.detach(), targets), batch_idx)
        self.log_dict(cls_log, prog_bar=True, sync_dist=True, batch_size=len(targets))
        return cls_loss

    def configure_optimizers(self):
        # Don't use weight decay for batch norm, bias parameters, and classification head.
        params, params_no_weight_decay = get_weight_decay_parameters(
            [self.backbone, self.projection_head, self.prediction_head, self.rela])  # + the RELA transfer head
        optimizer = LARS(
            [{"name": "byol", "params": params},
             {"name": "byol_no_weight_decay", "params": params_no_weight_decay, "weight_decay": 0.0},
             {"name": "online_classifier", "params": self.online_classifier.parameters(), "weight_decay": 0.0}],
            lr=self.base_lr * self.batch_size_per_device * self.trainer.world_size / 256,
            momentum=0.9, weight_decay=1e-6)
        steps = self.trainer.estimated_stepping_batches
        scheduler = {"scheduler": CosineWarmupScheduler(
            optimizer=optimizer, warmup_epochs=int(steps / self.trainer.max_epochs * self.warmup_epochs),
            max_epochs=int(steps)), "interval": "step"}
        return [optimizer], [scheduler]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="training image folder (class sub-folders)")
    p.add_argument("--val-data", help="validation image folder for the online classifier (default: --data)")
    p.add_argument("--store", required=True, help="target store; converted here from --prior when missing")
    p.add_argument(
        "--prior", default="efficientnet-lite0", help="prior for a missing store (default efficientnet-lite0)"
    )
    p.add_argument("--dim", type=int, default=256, help="target dim for a missing store")
    p.add_argument("--phase", default="fixed:0.5", help="RELA phase: fixed:<fraction> | adaptive | blend | off")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet (lightly's benchmark: resnet50)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the online classifier (lightly's: 1000)")
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
    pl.seed_everything(args.seed, workers=True)  # rela.Loader's seed follows it
    store = Path(args.store)
    if not (store / "manifest.json").exists():
        rela.convert(args.data, args.prior, store, dim=args.dim)
    normalize = IMAGENET_NORMALIZE
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=args.image_size, normalize=normalize),
                              view_2_transform=BYOLView2Transform(input_size=args.image_size, normalize=normalize))
    train_dataloader = rela.Loader(args.data, args.batch_size_per_device, views=transform, targets=store,
                                   batch_format="lightly", num_workers=args.num_workers, drop_last=True)
    # lightly's validation data, unchanged (Resize(256) + CenterCrop(224), scaled to --image-size)
    val_transform = T.Compose([T.Resize(args.image_size * 256 // 224), T.CenterCrop(args.image_size), T.ToTensor(),
                               T.Normalize(mean=normalize["mean"], std=normalize["std"])])
    val_dataloader = DataLoader(LightlyDataset(input_dir=str(args.val_data or args.data), transform=val_transform),
                                batch_size=args.batch_size_per_device, shuffle=False, num_workers=args.num_workers,
                                persistent_workers=args.num_workers > 0)
    metric_callback = MetricCallback()
    callbacks = [LearningRateMonitor(),
                 EarlyStopping(monitor="train_loss", patience=int(1e12), check_finite=True),  # stop if it diverges
                 DeviceStatsMonitor(), metric_callback,
                 rela.RelaCallback(store, phase=args.phase),
                 ModelCheckpoint(dirpath=Path(args.out) / "checkpoints", save_last=True,
                                 every_n_train_steps=args.checkpoint_every_n_steps or None,
                                 save_top_k=-1 if args.checkpoint_every_n_steps else 1, filename="{epoch}-{step}")]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices,
                         callbacks=callbacks, logger=pl.loggers.CSVLogger(args.out, name="logs", version=""),
                         precision=args.precision,
                         strategy="ddp_find_unused_parameters_true" if args.devices > 1 else "auto",
                         sync_batchnorm=args.accelerator != "cpu" and args.devices > 1,
                         log_every_n_steps=args.log_every_n_steps, default_root_dir=args.out, enable_progress_bar=False)
    model = BYOL(args.batch_size_per_device, args.num_classes, args.arch, args.warmup_epochs, args.base_lr)
    trainer.fit(model, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader, ckpt_path=args.ckpt_path)
    for metric in ["val_online_cls_top1", "val_online_cls_top5"]:
        if trainer.is_global_zero:
            print(f"max {metric}: {max(metric_callback.val_metrics.get(metric, [-1]))}")


if __name__ == "__main__":
    main()
