"""Held-out image folders for validating RELA's defaults on data no one tuned them on.

The defaults are chosen on Fashion-MNIST (28×28 grayscale garments). These folders differ from it
in what the pixels are, and are built only from what installs on these machines:

- `digits`: OpenCV's 5,000 handwritten digits (Debian `opencv-doc`, samples/data/digits.png, a
  100×50 grid of 20×20 cells, 500 per digit). Strokes, not garments; 20 px, not 28.
  4,000 train / 1,000 test, stratified, seed 0.
- `photo-crops`: 32×32 crops of ten of scikit-image's photographs (astronaut, coffee, cat, rocket,
  grass, Hubble deep field, retina, IHC stain, coins, camera man); the label is the photograph.
  Colour natural images and textures at 32 px. Train crops come from the left 70% of each photo, test
  crops from the right 30%, so no test pixel was seen in training. 400 / 100 per class.

    python bench/heldout_data.py --out bench/data      # writes bench/data/{digits,photo-crops}/{train,test}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_PNG = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "grass", "hubble_deep_field", "retina",
          "immunohistochemistry", "coins", "camera")


def _write(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = folder / f"{int(label):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{k:05d}.png")


def digits(out: Path) -> None:
    """OpenCV's digits.png cut into its 5,000 cells; a stratified 4,000 / 1,000 split."""
    if not DIGITS_PNG.exists():
        raise SystemExit(f"{DIGITS_PNG} is missing: apt-get install opencv-doc (it is gzipped in some releases: "
                         "gunzip it)")
    sheet = np.asarray(Image.open(DIGITS_PNG).convert("L"))
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    labels = np.repeat(np.arange(10), 500)  # five rows of 100 per digit
    rng = np.random.default_rng(0)
    test = np.zeros(len(cells), bool)
    for c in range(10):
        test[rng.choice(np.flatnonzero(labels == c), 100, replace=False)] = True
    _write(cells[~test], labels[~test], out / "train")
    _write(cells[test], labels[test], out / "test")


def photo_crops(out: Path, train_per_class: int = 400, test_per_class: int = 100) -> None:
    """Random 32×32 crops (from 32–96 px boxes, resized) of each photograph; train from the left
    70% of its width, test from the right 30%."""
    import skimage.data

    rng = np.random.default_rng(0)
    for split, n, (lo, hi) in (("train", train_per_class, (0.0, 0.7)), ("test", test_per_class, (0.7, 1.0))):
        images, labels = [], []
        for label, name in enumerate(PHOTOS):
            photo = getattr(skimage.data, name)()
            photo = (photo * 255).astype(np.uint8) if photo.dtype != np.uint8 else photo
            photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
            h, w = photo.shape[:2]
            x0, x1 = int(lo * w), int(hi * w)
            for _ in range(n):
                side = int(rng.integers(32, min(97, h, x1 - x0)))
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(x0, x1 - side + 1))
                crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((32, 32), Image.BICUBIC)
                images.append(np.asarray(crop))
                labels.append(label)
        _write(np.stack(images), np.array(labels), out / split)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/data"))
    args = p.parse_args()
    for name, build in (("digits", digits), ("photo-crops", photo_crops)):
        folder = args.out / name
        if (folder / "test").exists():
            print(f"{folder}: exists")
            continue
        build(folder)
        print(f"{folder}: train {sum(1 for _ in (folder / 'train').rglob('*.png'))}, "
              f"test {sum(1 for _ in (folder / 'test').rglob('*.png'))}")


if __name__ == "__main__":
    main()
