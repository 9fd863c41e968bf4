"""Scaled JPEG decode: how far its pixels are from the full-resolution decode, and what it saves.

rela's JPEG path (`rela._C.decode_resized_crops`) may decode at 1/2 or 1/4 scale in the DCT domain
(libjpeg-turbo's SIMD scales) when every view's crop box, scaled, still covers `fit` times its
output size. This measures, on real photographs (scikit-image's bundled photos, saved as quality-90
JPEGs at their own size and at 500 px on the shorter side, as ImageNet's), for RandomResizedCrop
boxes (scale 0.08–1, ratio 3/4–4/3) at several output sizes:

- the pixels against `fit=0` (always full resolution, the baseline): the share of crops the scaled
  path took and, over those crops only, the mean, 99th percentile and max of |difference| in grey
  levels (crops it did not take are the baseline's own pixels);
- decode + resample throughput, interleaved with the baseline in one run (medians of --repeats).

    python bench/scaled_decode.py                 # fits 1, 1.5, 2 at 96/128/160/224 px
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench._common import device_line  # noqa: E402
from rela import _ext  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "camera", "coins", "grass", "gravel", "brick")


def photo_jpegs() -> list[bytes]:
    """Each photo at its own size and at 500 px on the shorter side, as quality-90 JPEG bytes."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        pil = Image.fromarray(img.astype(np.uint8))
        short = min(pil.size)
        for im in (pil, pil.resize((round(pil.size[0] * 500 / short), round(pil.size[1] * 500 / short)),
                                   Image.BICUBIC)):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def random_boxes(rng: np.random.Generator, w: int, h: int, views: int) -> np.ndarray:
    """RandomResizedCrop boxes (top, left, height, width): scale 0.08–1, ratio 3/4–4/3."""
    boxes = []
    while len(boxes) < views:
        area = w * h * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        bw, bh = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if 0 < bw <= w and 0 < bh <= h:
            boxes.append((int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw))
    return np.asarray(boxes, np.int32)


def decode(jpegs, boxes, size: int, fit: float) -> np.ndarray:
    """Each crop k of `boxes` [N, crops, 4] as the one view of its own decode: [N, crops, 3, S, S]."""
    flips = np.zeros((len(jpegs), 1), np.uint8)
    out = []
    for k in range(boxes.shape[1]):
        views, errors = _ext.decode_resized_crops(jpegs, np.ascontiguousarray(boxes[:, k:k + 1]), flips, size, 1,
                                                  fit=fit)
        assert not any(errors), errors
        out.append(views[0])
    return np.stack(out, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    p.add_argument("--fits", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--crops", type=int, default=16, help="random crops per photo")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not _ext.has_jpeg_decoder():
        raise SystemExit("rela._C was built without libjpeg")
    print(f"device: {device_line()}; rela._C decode, 1 thread")
    jpegs = photo_jpegs()
    dims = [Image.open(io.BytesIO(j)).size for j in jpegs]
    rng = np.random.default_rng(0)
    boxes = np.stack([random_boxes(rng, w, h, args.crops) for w, h in dims])
    print(f"{len(jpegs)} photos ({len(PHOTOS)} scikit-image photos, own size and 500-px short side), {args.crops} "
          f"RandomResizedCrop boxes each; baseline: fit=0 (full-resolution decode)\n")
    print("| output px | fit | crops scaled | scaled crops: mean abs diff (levels) | p99 | max | img/s scaled | "
          "img/s full | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        full = decode(jpegs, boxes, size, 0.0).astype(np.int16)
        for fit in args.fits:
            got = decode(jpegs, boxes, size, fit).astype(np.int16)
            side = np.minimum(boxes[..., 2], boxes[..., 3])
            taken = side / 2 >= fit * size  # [photos, crops]: what scale_denominator decides (one view)
            diff = np.abs(got - full)[taken] if taken.any() else np.zeros(1, np.int16)
            scaled = float(taken.mean())
            times = {0.0: [], fit: []}
            for _ in range(args.repeats):  # alternating, one crop per photo per call
                for f in (0.0, fit):
                    t = time.perf_counter()
                    decode(jpegs, boxes, size, f)
                    times[f].append(len(jpegs) * args.crops / (time.perf_counter() - t))
            rate, base = statistics.median(times[fit]), statistics.median(times[0.0])
            print(f"| {size} | {fit:g} | {100 * scaled:.0f}% | {diff.mean():.2f} | {np.percentile(diff, 99):.0f} | "
                  f"{diff.max()} | {rate:.0f} | {base:.0f} | {rate / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
