"""The `ffcv` backend: FFCV's `.beton` storage and JIT-compiled decoders under rela's loop.

The dataset is written to a `.beton` once, cached under `$RELA_CACHE` (default
`~/.cache/rela/ffcv`) by its fingerprint, and FFCV's Loader reads it in the exact order rela's
subset and sharding chose (a fixed traversal order per pass). FFCV runs the geometry
(RandomResizedCrop or centre crop while decoding, flip); FFCV 1.0.2 has no hue, grayscale, blur or
solarise operators, so the colour operations run afterwards in rela (torchvision on the uint8
batch, per-sample seeded) and normalisation is rela's.

Honest limits, all from FFCV 1.0.2 itself: its crop/flip RNG is not seedable, so a resumed or
repeated run sees the same samples in the same order but not the same crops; a pipeline reads one
field, so each view decodes the image again (one FFCV loader per view, in lockstep); changing the
views mid-epoch builds new FFCV loaders from the next batch on (Numba compiles them: seconds).
Images that fail to decode when the `.beton` is written are stored as placeholders and treated by
`on_error` when drawn.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from rela.datasets import as_rgb
from rela.errors import CorruptImageError
from rela.views import ViewSpec, colour, normalize_batch, sample_generator


def cache_dir() -> Path:
    return Path(os.environ.get("RELA_CACHE", Path.home() / ".cache" / "rela")) / "ffcv"


class _Source:
    """What FFCV's DatasetWriter reads: (HWC uint8 RGB image, index, decoded-ok flag)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return as_rgb(self.dataset.load(i)), i, 1
        except CorruptImageError:
            return np.zeros((8, 8, 3), np.uint8), i, 0


def write_beton(dataset, threads: int = 1) -> Path:
    """The dataset's `.beton` (written once; the write is atomic, so a killed one is redone)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fp = dataset.fingerprint()
    key = hashlib.sha256(repr(sorted(fp.items())).encode()).hexdigest()[:24]
    # Small in-memory images are stored raw (exact pixels); files as JPEG q95 (FFCV re-encodes).
    raw = getattr(dataset, "in_memory", False)
    path = cache_dir() / f"{key}-{'raw' if raw else 'jpg95'}.beton"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    image = RGBImageField(write_mode="raw") if raw else RGBImageField(write_mode="jpg", jpeg_quality=95)
    DatasetWriter(str(tmp), {"image": image, "index": IntField(), "ok": IntField()},
                  num_workers=max(1, threads)).from_indexed_dataset(_Source(dataset))
    os.replace(tmp, path)
    return path


def _pipeline(spec: ViewSpec) -> list:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    size = (spec.size, spec.size)
    ops = [RandomResizedCropRGBImageDecoder(size, scale=spec.scale, ratio=spec.ratio) if spec.crop == "random"
           else CenterCropRGBImageDecoder(size, ratio=1.0)]  # rela's eval view: centre square → S×S
    if spec.flip:
        ops.append(RandomHorizontalFlip(flip_prob=spec.flip))
    return ops + [ToTensor(), ToTorchImage(channels_last=False)]


class _Fixed:
    """A TraversalOrder (duck-typed) that yields exactly the order rela chose for this pass."""

    def __init__(self) -> None:
        self.order = np.zeros(0, np.int64)

    def sample_order(self, epoch: int):
        return self.order


class FfcvBatches:
    """Runs rela's tasks with FFCV loaders (one per view) reading the same fixed order. The FFCV
    loaders are kept per view spec across passes: FFCV compiles a pipeline on its first pass."""

    def __init__(self, base, beton: Path, threads: int, batch_size: int, drop_last: bool) -> None:
        from ffcv.reader import Reader

        self.base, self.beton = base, beton
        self.threads, self.batch_size, self.drop_last = max(1, threads), batch_size, drop_last
        self.bad = set(np.flatnonzero(Reader(str(beton)).metadata["f2"] == 0).tolist())
        self.loaders: dict[ViewSpec, object] = {}
        self.views: tuple[ViewSpec, ...] | None = None
        self.iters: list = []
        self.skipped: dict[int, list] = {}

    def _replace(self, i: int, skipped: list) -> int:
        """A drawn sample the .beton holds no image for: raise, or take the loader's walk to the
        next good one."""
        for j in self.base.candidates(i):
            if j not in self.bad:
                return j
            source = self.base.dataset.describe(j)
            if self.base.on_error == "raise":
                raise CorruptImageError(j, source, "could not be decoded when the .beton was written")
            skipped.append((j, source, "undecodable when the .beton was written"))
        raise AssertionError("unreachable: candidates() raises when it runs out")

    def _loader(self, spec: ViewSpec):
        if spec not in self.loaders:
            from ffcv.fields.decoders import IntDecoder
            from ffcv.loader import Loader
            from ffcv.transforms import ToTensor

            loader = Loader(str(self.beton), batch_size=self.batch_size, num_workers=self.threads,
                            pipelines={"image": _pipeline(spec), "index": [IntDecoder(), ToTensor()], "ok": None},
                            drop_last=self.drop_last, os_cache=True, batches_ahead=2)
            loader.traversal_order = _Fixed()
            self.loaders[spec] = loader
        return self.loaders[spec]

    def _start(self, batches: list[np.ndarray], number: int, views: tuple[ViewSpec, ...]) -> None:
        """FFCV iterators over the remaining batches from `number` on, each batch with replacements."""
        self.close()
        self.skipped = {}
        order = []
        for b in range(number, len(batches)):
            skipped: list = []
            order.extend(i if i not in self.bad and i not in self.base.skip else self._replace(i, skipped)
                         for i in batches[b].tolist())
            self.skipped[b] = skipped
        order = np.asarray(order, dtype=np.int64)
        self.views = views
        for spec in views:
            loader = self._loader(spec)
            loader.traversal_order.order = order
            loader.first_traversal_order = order  # FFCV's len() reads it
            self.iters.append(iter(loader))

    def iterate(self, batches: list[np.ndarray], tasks):
        try:
            self.views = None
            for task in tasks:
                if task.views != self.views:
                    self._start(batches, task.number, task.views)
                yield self._batch(task, [next(it) for it in self.iters])
        finally:
            self.close()

    def _batch(self, task, outs) -> dict:
        index = outs[0][1].reshape(-1).to(torch.int64).clone()
        views = []
        for k, (spec, (images, _)) in enumerate(zip(task.views, outs, strict=True)):
            x = images
            if spec.jitter_p or spec.gray_p or spec.blur_p or spec.solarize_p:
                x = images.clone()
                for row, i in enumerate(task.indices):
                    x[row] = colour(spec, x[row], sample_generator(self.base.seed, task.epoch, i, k))
            views.append(normalize_batch(spec, x))
        return self.base.assemble(task, views, index, self.skipped.get(task.number, []))

    def close(self) -> None:
        """Stop FFCV's iterator threads (FFCV leaks one per unfinished iter() otherwise)."""
        import queue
        import time

        for it in self.iters:
            it.close()
            # Its thread ends with a blocking put into a full queue: drain until it has gone.
            deadline = time.monotonic() + 10
            while it.is_alive() and time.monotonic() < deadline:
                try:
                    it.output_queue.get_nowait()
                except queue.Empty:
                    it.join(0.05)
        self.iters = []
