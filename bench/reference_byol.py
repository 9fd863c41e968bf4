"""A minimal plain-PyTorch BYOL, written the way lightly's `examples/pytorch/byol.py` is, as the
check on rela's own BYOL loop: per-image lightly/torchvision transforms in a torch DataLoader,
lightly's heads, loss and momentum update, nothing of rela's loader, accelerator or trainer.
Only the student (rela.models, the same CIFAR-stem ResNet) and the evaluation (rela's probes, the
shared measuring stick) are rela's. If rela's BYOL ever reads lower than this at the same
settings, the bug is in rela's loop, not in BYOL.

    python bench/reference_byol.py --limit 10000 --epochs 20          # prints linear / kNN top-1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Images(torch.utils.data.Dataset):
    """Fashion-MNIST rows as RGB PIL images through a transform (the example's dataset)."""

    def __init__(self, images, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i][..., 0]).convert("RGB"))


def train_reference(limit: int | None, epochs: int, seed: int = 0, batch_size: int = 128, lr: float = 1e-3,
                    weight_decay: float = 0.01, min_scale: float = 0.08, workers: int = 2,
                    width: float = 0.125) -> tuple[nn.Module, float]:
    """BYOL as in lightly's example at 32 px (blur off, as lightly's CIFAR settings): the trained
    backbone and the training seconds."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )

    from rela.data.datasets import FashionMNIST
    from rela.models import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone("resnet18-cifar", width)
    f = backbone.feature_dim
    projection, prediction = BYOLProjectionHead(f, 2 * f, 256), BYOLPredictionHead(256, 2 * f, 256)
    target_backbone, target_projection = copy.deepcopy(backbone), copy.deepcopy(projection)
    deactivate_requires_grad(target_backbone), deactivate_requires_grad(target_projection)
    transform = BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0, min_scale=min_scale),
                              BYOLView2Transform(input_size=32, gaussian_blur=0.0, min_scale=min_scale))
    images = FashionMNIST("train").images[:limit]
    loader = torch.utils.data.DataLoader(_Images(images, transform), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    criterion = NegativeCosineSimilarity()
    params = [*backbone.parameters(), *projection.parameters(), *prediction.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x0, x1 in loader:
            update_momentum(backbone, target_backbone, m=0.99)
            update_momentum(projection, target_projection, m=0.99)
            p0, p1 = prediction(projection(backbone(x0))), prediction(projection(backbone(x1)))
            with torch.no_grad():
                z0, z1 = target_projection(target_backbone(x0)), target_projection(target_backbone(x1))
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return backbone, time.perf_counter() - t0


def evaluate(backbone: nn.Module, limit: int | None) -> dict:
    """rela's probes on the frozen backbone: the converged L-BFGS linear probe and kNN-20 (weighted
    and majority vote)."""
    from rela.data.datasets import open_dataset
    from rela.training.evaluate import extract_features, knn_accuracy, linear_probe

    tr = extract_features(backbone, open_dataset("fashion-mnist", limit), 32)
    te = extract_features(backbone, open_dataset("fashion-mnist:test"), 32)
    return {"linear": linear_probe(*tr, *te)["top1"], "knn": knn_accuracy(*tr, *te),
            "knn_majority": knn_accuracy(*tr, *te, vote="majority")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-scale", type=float, default=0.08)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    backbone, seconds = train_reference(a.limit, a.epochs, a.seed, min_scale=a.min_scale, lr=a.lr, workers=a.workers)
    print(json.dumps({**evaluate(backbone, a.limit), "train_seconds": round(seconds, 1), **vars(a)}))


if __name__ == "__main__":
    main()
