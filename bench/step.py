"""rela's training step against a bare PyTorch loop: what rela's machinery costs per step.

Baseline: the loop a user writes without rela, on the same student, heads, optimizer and
pre-made tensors (no loader): forward of both views, the loss (RELA phase: a linear head and
1 − cosine against the targets in plain PyTorch; SSL phase: the BYOL heads and lightly's loss,
EMA update with lightly's `update_momentum`), AdamW step; losses read back never. rela: the
`Trainer.train_step` that `rela train` runs (the accelerator, autocast, scaler, schedule, the
deferred log and its `_flush` every `--log-every` steps), fed the same tensors.

Per phase (rela, ssl) and precision (fp32, bf16): median ms/step over repeats, img/s, and the
ratio rela / bare (goal on CPU: overhead ≤ 5%; on a GPU ≥ 0.9× the bare loop's img/s, also with
the loader in the loop: `--with-loader` adds a row where rela's `Loader` feeds the step from
in-memory uint8 images with the real views).

    python bench/step.py                                   # CPU: CIFAR ResNet-18 at width 1/8, 32 px
    python bench/step.py --device cuda --arch resnet50 --width 1 --image-size 224 --batch-size 128 \\
        --channels-last --with-loader --jpegs              # what bench/gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import device_line  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _images(n: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _jpeg_folder(root: Path, n: int, side: int) -> Path:
    """n synthetic JPEGs (smooth colour fields, q90) in one class folder: what the loader decodes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "all").mkdir(parents=True)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((side, side), Image.BICUBIC).save(root / "all" / f"{i:05d}.jpg", quality=90)
    return root


def make_trainer(args, precision: str, phase: str, out: Path, data):
    from rela.training.run import TrainConfig
    from rela.training.train import Trainer

    cfg = TrainConfig(data="bench", out=str(out / f"{phase}-{precision}"), prior=str(out / "store"),
                      epochs=1000, batch_size=args.batch_size, image_size=args.image_size, arch=args.arch,
                      width=args.width, phase="fixed:1" if phase == "rela" else "off", method="byol",
                      precision=precision, channels_last=args.channels_last, device=args.device,
                      num_workers=args.workers, probe_at_switch=False, log_every=args.log_every,
                      handoff=args.handoff)
    if phase == "ssl":
        cfg.prior = None
    return Trainer(cfg, progress=False, overwrite=True, dataset=data)


def batch_for(trainer, device: torch.device, views: int = 2) -> dict:
    """One batch of pre-made tensors in the shapes the loader hands over."""
    g = torch.Generator().manual_seed(0)
    b, s = trainer.batch_size, trainer.cfg.image_size
    fmt = trainer.memory_format  # what the trainer chose (contiguous where oneDNN #6035 would bite)
    batch = {"views": [torch.randn(b, 3, s, s, generator=g).to(device).contiguous(memory_format=fmt)
                       for _ in range(views)],
             "index": torch.arange(b, device=device), "label": torch.zeros(b, dtype=torch.int64, device=device)}
    if trainer.acc is not None:
        batch["target"] = torch.randn(b, trainer.acc.transfer.out_features, generator=g).to(device)
    return batch


def bare_step(trainer, precision: str):
    """The user's own loop on copies of the trainer's student and heads (same init)."""
    from lightly.models.utils import update_momentum

    backbone = copy.deepcopy(trainer.backbone)
    method = copy.deepcopy(trainer.method)
    head = copy.deepcopy(trainer.acc.transfer) if trainer.acc is not None else None
    params = list(backbone.parameters()) + method.online_parameters() + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=trainer.cfg.lr, weight_decay=trainer.cfg.weight_decay)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(trainer.device.type, enabled=precision == "fp16")

    def step(batch: dict) -> None:
        views = batch["views"]
        with torch.autocast(trainer.device.type, dtype=dtype, enabled=dtype is not None):
            feats = backbone(torch.cat(views)).view(len(views), len(views[0]), -1).float()
            if head is not None:
                pred = torch.nn.functional.normalize(head(feats).float(), dim=-1)
                loss = 1 - (pred * torch.nn.functional.normalize(batch["target"], dim=-1)).sum(-1).mean()
            else:
                loss = method.loss(feats, views, 0, 1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        update_momentum(backbone, method.target_backbone, 0.99)
        update_momentum(method.projection, method.target_projection, 0.99)

    return step


def rela_step(trainer):
    def step(batch: dict) -> None:
        trainer.train_step(batch, 0, time.perf_counter())
        if trainer.step % trainer.cfg.log_every == 0:
            trainer._flush(0)

    return step


def time_pair(bare, rela, batch, device: torch.device, steps: int, repeats: int) -> tuple[float, float]:
    """Median per-step seconds of `steps` steps, bare and rela taking turns each repeat (so a
    noisy neighbour hits both alike), after warm-up steps."""
    for step in (bare, rela):
        for _ in range(3):
            step(batch)
    _sync(device)
    times = {bare: [], rela: []}
    for _ in range(repeats):
        for step in (bare, rela):
            t = time.perf_counter()
            for _ in range(steps):
                step(batch)
            _sync(device)
            times[step].append((time.perf_counter() - t) / steps)
    return statistics.median(times[bare]), statistics.median(times[rela])


def time_with_loader(trainer, device: torch.device, steps: int) -> float:
    """Seconds per step with rela's Loader feeding the step (the real views, in-memory uint8)."""
    it = iter(trainer.loader)
    for _ in range(3):
        trainer.train_step(next(it), 0, time.perf_counter())
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(it), 0, time.perf_counter())
        if trainer.step % trainer.cfg.log_every == 0:
            trainer._flush(0)
    _sync(device)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="resnet18-cifar")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--phases", default="rela,ssl")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--with-loader", action="store_true", help="also time rela with its Loader in the loop")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--handoff", default="float32", help="the Loader's hand-off: float32 | uint8 (normalised on "
                    "the device)")
    ap.add_argument("--jpegs", action="store_true", help="the loader decodes synthetic JPEG files (an image "
                    "folder) instead of in-memory uint8 images")
    args = ap.parse_args(argv)
    from rela.distributed import resolve_device

    device = resolve_device(args.device)
    args.device = str(device)
    side = args.image_size + args.image_size // 8
    n = args.batch_size * (args.steps + 4) if args.with_loader else args.batch_size * 2
    tmp_root = Path(tempfile.mkdtemp(prefix="rela-step-"))
    try:
        run_all(args, device, tmp_root, n, side)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def run_all(args, device: torch.device, tmp_root: Path, n: int, side: int) -> None:
    from rela import convert
    from rela.data.datasets import ArrayDataset, ImageFolder

    data = (ImageFolder(_jpeg_folder(tmp_root / "jpegs", n, side)) if args.jpegs
            else ArrayDataset(_images(n, side), np.zeros(n, dtype=np.int64), name="bench-step"))
    print(f"# {device_line()}; measured on {device}; loader data: {'JPEG files' if args.jpegs else 'uint8 arrays'}")
    print(f"# {args.arch} width {args.width}, {args.image_size} px, batch {args.batch_size}, BYOL heads, "
          f"AdamW, channels_last={args.channels_last}, log every {args.log_every}; median of {args.repeats} x "
          f"{args.steps} steps")
    print(f"{'phase':6} {'precision':9} {'bare ms':>9} {'rela ms':>9} {'bare img/s':>11} {'rela img/s':>11} "
          f"{'rela/bare':>10} {'overhead':>9}")
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        out = Path(tmp)
        convert(data, "random:resnet18", out / "store", dim=64, input_size=32, progress=False, device=device)
        for phase in args.phases.split(","):
            for precision in args.precisions.split(","):
                trainer = make_trainer(args, precision, phase, out, data)
                batch = batch_for(trainer, device)
                bare, rela = time_pair(bare_step(trainer, precision), rela_step(trainer), batch, device,
                                       args.steps, args.repeats)
                b = args.batch_size
                print(f"{phase:6} {precision:9} {1e3 * bare:9.1f} {1e3 * rela:9.1f} {b / bare:11.0f} {b / rela:11.0f} "
                      f"{bare / rela:10.3f} {100 * (rela / bare - 1):+8.1f}%", flush=True)
                if args.with_loader:
                    fed = time_with_loader(trainer, device, args.steps)
                    print(
                        f"{phase:6} {precision:9} {'':9} {1e3 * fed:9.1f} {'':11} {b / fed:11.0f} "
                        f"{bare / fed:10.3f}  (rela with its Loader: {args.workers} workers, {args.handoff} hand-off)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
