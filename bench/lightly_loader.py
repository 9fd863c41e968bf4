"""The loader swap in lightly's ImageNet BYOL benchmark, measured: lightly's own pipeline
(`LightlyDataset(train_dir, transform=BYOLTransform(...))` + `DataLoader(..., shuffle=True,
drop_last=True)`, as its benchmarks/imagenet/resnet50/main.py builds it) against
`rela.Loader(train_dir, views=BYOLTransform(...), batch_format="lightly")` on the same folder of
JPEGs, same batch size, same worker count. Epochs alternate between the two; medians and their
ratio are printed, with the device (CPU here) and the thread counts.

    python bench/lightly_loader.py [--images 512] [--size 224] [--epochs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_folder(root: Path, n: int) -> Path:
    """n JPEGs of 400×350 (quality 90, smooth content like photos) in 10 class folders."""
    from PIL import Image

    from tests.conftest import smooth_image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(rng, 350, 400)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def epoch_rate(loader, images_per_batch: int) -> float:
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[1]) if images_per_batch == 0 else images_per_batch
    return n / (time.perf_counter() - t)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--images", type=int, default=512)
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--workers", type=int, default=2)
    args = a.parse_args()
    torch.set_num_threads(1)
    from lightly.data import LightlyDataset
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    import rela

    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=args.size),
                              view_2_transform=BYOLView2Transform(input_size=args.size))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "train", args.images)
        lightly_loader = torch.utils.data.DataLoader(
            LightlyDataset(input_dir=str(folder), transform=transform), batch_size=args.batch_size, shuffle=True,
            num_workers=args.workers, drop_last=True)
        rela_loader = rela.Loader(str(folder), args.batch_size, views=transform, batch_format="lightly",
                                  num_workers=args.workers, drop_last=True, seed=0)
        rates: dict[str, list[float]] = {"lightly DataLoader": [], "rela.Loader": []}
        for epoch in range(args.epochs + 1):  # the first epoch of each warms caches and is dropped
            for name, loader in (("lightly DataLoader", lightly_loader), ("rela.Loader", rela_loader)):
                r = epoch_rate(loader, 0)
                if epoch:
                    rates[name].append(r)
    base, ours = (statistics.median(rates[k]) for k in ("lightly DataLoader", "rela.Loader"))
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU; "
          f"torch {torch.__version__}, 1 intra-op thread, {args.workers} workers each")
    print(f"BYOL views at {args.size} px, {args.images} JPEGs 400x350, batch {args.batch_size}, "
          f"median of {args.epochs} epochs (alternating)")
    for name, values in rates.items():
        print(
            f"  {name:20s} {statistics.median(values):8.1f} img/s   (epochs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    print(f"  ratio rela / lightly: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
