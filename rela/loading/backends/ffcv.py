"""The `ffcv` backend: FFCV's `.beton` storage and JIT-compiled decoders under rela's loop.

The dataset is written to a `.beton` once, cached under `$RELA_CACHE` (default
`~/.cache/rela/ffcv`) by its fingerprint, and FFCV's Loader reads it in the exact order rela's
subset and sharding chose (a fixed traversal order per pass). FFCV runs the geometry
(RandomResizedCrop or centre crop while decoding, flip); FFCV 1.0.2 has no hue, grayscale, blur or
solarise operators, so for views with colour operations those run afterwards in rela
(rela._C's colour kernel on the uint8 batch, as the torch backend runs them, per-sample seeded;
torchvision's ops without the extension) and normalisation is rela's; plain views
(crop, flip) are normalised on FFCV's threads by its `NormalizeImage` lookup table, written in the
loader's memory format. Each batch is handed over in a buffer of its own (FFCV reuses a few
buffers in turn; rela's batches are the user's to keep), without a copy.

Honest limits, all from FFCV 1.0.2 itself: its crop/flip RNG is not seedable, so a resumed or
repeated run sees the same samples in the same order but not the same crops; a pipeline reads one
field, so each view decodes the image again (one FFCV loader per view, in lockstep); changing the
views mid-epoch builds new FFCV loaders from the next batch on (Numba compiles them: seconds).
Images that fail to decode when the `.beton` is written are stored as placeholders and treated by
`on_error` when drawn.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rela.data import folder_scan
from rela.data.datasets import RelaDataset, as_rgb
from rela.data.store import atomic_write_bytes
from rela.errors import CorruptImageError
from rela.loading.backends import Built, Options, SampleRules, Task, Tasks, nothing_left
from rela.loading.backends.augment import colour_rows, normalize_batch
from rela.loading.backends.torch_backend import TorchBuilder
from rela.loading.views import ViewSpec, colour_params


def cache_dir() -> Path:
    """$RELA_CACHE/ffcv when that is private (folder_scan.cache_dir), else a private folder of
    this process's own (the .beton is then written again by each process)."""
    folder = folder_scan.cache_dir("ffcv", "FFCV .beton files")
    if folder is None:
        global _PRIVATE
        if _PRIVATE is None:
            import tempfile

            _PRIVATE = Path(tempfile.mkdtemp(prefix="rela-ffcv-"))
        folder = _PRIVATE
    return folder


_PRIVATE: Path | None = None


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


def write_beton(dataset: RelaDataset, threads: int = 1) -> Path:
    """The dataset's `.beton` (written once; the write is atomic, so a killed one is redone)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    # Small in-memory images are stored raw (exact pixels); files as JPEG q95 (FFCV re-encodes).
    raw = dataset.in_memory
    written_by = {"fingerprint": dataset.fingerprint(), "write_mode": "raw" if raw else "jpg",
                  "jpeg_quality": None if raw else 95, "fields": ["image", "index", "ok"], "n": len(dataset),
                  "ffcv": _ffcv_version()}
    key = hashlib.sha256(json.dumps(written_by, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}-{'raw' if raw else 'jpg95'}.beton"
    if _cached_beton_is_ours(path, written_by):
        return path
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))  # ours, not a planted link
    image = RGBImageField(write_mode="raw") if raw else RGBImageField(write_mode="jpg", jpeg_quality=95)
    DatasetWriter(str(tmp), {"image": image, "index": IntField(), "ok": IntField()},
                  num_workers=max(1, threads)).from_indexed_dataset(_Source(dataset))
    os.replace(tmp, path)
    st = path.stat()
    atomic_write_bytes(_sidecar(path), json.dumps({**written_by, "file": [st.st_size, st.st_mtime_ns, st.st_ino]},
                                                 sort_keys=True, default=str).encode(), durable=False)
    return path


def _ffcv_version() -> str:
    from importlib.metadata import version

    return version("ffcv")


def _sidecar(beton: Path) -> Path:
    return beton.with_suffix(".json")


def _cached_beton_is_ours(path: Path, written_by: dict) -> bool:
    """A cached .beton is reused only with the record this process's writer left beside it: the same
    data fingerprint and write options, and the very file (size, mtime, inode) that was written."""
    try:
        record = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    expected = json.loads(json.dumps({**written_by, "file": [st.st_size, st.st_mtime_ns, st.st_ino]},
                                     sort_keys=True, default=str))
    return record == expected


def _pipeline(spec: ViewSpec, memory_format: torch.memory_format) -> tuple[list, object]:
    """FFCV's ops for one view, and the op whose output buffer is handed over. A view without
    colour ops is normalised inside FFCV (a compiled lookup table, on its threads) and comes out
    float32 N×C×H×W in the loader's memory format:
    channels_last from FFCV's own `NormalizeImage`, contiguous from `_planar_normalise` (the
    same table writing C×H×W planes: no transposing copy afterwards). A view with colour ops comes
    out uint8 C×H×W for rela's colour step."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    size = (spec.size, spec.size)
    ops = [RandomResizedCropRGBImageDecoder(size, scale=spec.scale, ratio=spec.ratio) if spec.crop == "random"
           else CenterCropRGBImageDecoder(size, ratio=1.0)]  # rela's eval view: centre square → S×S
    if spec.flip:
        ops.append(RandomHorizontalFlip(flip_prob=spec.flip))
    if spec.has_colour:
        planar = ToTorchImage(channels_last=False)  # copies into a buffer of its own
        return ops + [ToTensor(), planar], planar
    mean, std = np.asarray(spec.mean) * 255, np.asarray(spec.std) * 255
    if memory_format is torch.channels_last:
        norm = NormalizeImage(mean, std, np.float32)
        return ops + [norm, ToTensor(), ToTorchImage(channels_last=True)], norm  # the last two are views
    norm = _planar_normalise(mean, std)
    return ops + [norm, ToTensor()], norm


def _planar_normalise(mean: np.ndarray, std: np.ndarray):
    """FFCV's `NormalizeImage` (CPU) writing C×H×W: its own lookup table (so the same values), the
    planes written in order. FFCV's op writes H×W×C, so a contiguous batch cost a transposing
    copy of every batch on the loop's thread (38 MB per 64 images of 224 px)."""
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.transforms import NormalizeImage

    class PlanarNormalize(Operation):
        def __init__(self) -> None:
            super().__init__()
            self.table = NormalizeImage(mean, std, np.float32).lookup_table  # [256, 3] float32

        def generate_code(self):
            table, my_range = self.table, Compiler.get_iterator()

            def normalise(images, result, indices):
                h, w = images.shape[1], images.shape[2]
                for i in my_range(len(indices)):
                    for c in range(3):
                        for y in range(h):
                            for x in range(w):
                                result[i, c, y, x] = table[images[i, y, x, c], c]
                return result

            normalise.is_parallel = True
            normalise.with_indices = True
            return normalise

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            return (replace(previous_state, shape=(c, h, w), dtype=np.dtype(np.float32), jit_mode=True),
                    AllocationQuery((c, h, w), np.dtype(np.float32)))

    return PlanarNormalize()


@functools.cache
def _fresh_output_loader():
    """FFCV's Loader, except that the operations named by `fresh=` write every batch into a new
    buffer.

    FFCV rotates `batches_ahead + 2` preallocated buffers per operation, so a batch is overwritten
    a few batches later while a training loop (or a user's list of batches) may still hold it.
    Copying each batch out of FFCV's buffer cost rela's loop ~8 ms per 64 float32 224-px images
    on the consuming thread (`bench/loader.py`: the ffcv backend at ×0.80–0.90 of FFCV's Loader);
    a new buffer per batch for the op whose output is handed over costs an allocation from the
    heap (reused, see `rela._alloc`: ~50 page faults per batch) and no copy. The rest is FFCV's
    code: `__iter__` is FFCV 1.0.2's, returning the iterator below."""
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class FreshIterator(EpochIterator):
        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            banks = self.memory_allocations["operation"]
            for node in self.loader.fresh_nodes:
                bank = banks[node]
                if not isinstance(bank, list):  # FFCV's (slots, batch, ...) array → one array per slot
                    bank = banks[node] = list(bank)
                old = bank[batch_slot]  # a numpy array, or a torch tensor for ops past ToTensor
                bank[batch_slot] = torch.empty_like(old) if isinstance(old, torch.Tensor) else np.empty_like(old)
            return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    class FreshLoader(Loader):
        def __init__(self, path: str, fresh: tuple = (), **kwargs) -> None:
            super().__init__(path, **kwargs)
            nodes = [*self.graph.root_nodes, *(n for ns in self.graph.adjacency_list.values() for n in ns)]
            self.fresh_nodes = sorted({n.id for n in nodes if getattr(n, "operation", None) in fresh})

        def __iter__(self):
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return FreshIterator(self, selected_order)

    return FreshLoader


class _Fixed:
    """A TraversalOrder (duck-typed) that yields exactly the order rela chose for this pass."""

    def __init__(self) -> None:
        self.order = np.zeros(0, np.int64)

    def sample_order(self, epoch: int):
        return self.order


class FfcvBackend:
    """Runs rela's tasks with FFCV loaders (one per view) reading the same fixed order. The
    `.beton` is written on the first pass; the FFCV loaders are kept per view spec across passes
    (FFCV compiles a pipeline on its first pass). A batch rebuilt on its own (after `set_views`)
    goes through the torch builder: FFCV reads whole passes, not single batches."""

    finish_on_device = staticmethod(nothing_left)  # views arrive finished

    def __init__(self, rules: SampleRules, options: Options) -> None:
        self.rules, self.options = rules, options
        self.fallback = TorchBuilder(rules, options.decode_threads, scaled_decode=options.scaled_decode)
        self.threads, self.batch_size = max(1, options.num_workers), options.batch_size
        self.beton: Path | None = None
        self.bad: set[int] = set()
        self.loaders: dict[tuple[ViewSpec, int], object] = {}
        self.views: tuple[ViewSpec, ...] | None = None
        self.iters: list = []
        self.skipped: dict[int, list] = {}

    def _open(self) -> None:
        """The dataset's .beton (written now if it isn't cached) and its undecodable samples."""
        from ffcv.reader import Reader

        self.beton = write_beton(self.rules.dataset, self.options.num_workers)
        self.bad = set(np.flatnonzero(Reader(str(self.beton)).metadata["f2"] == 0).tolist())

    def build(self, task: Task) -> Built:
        return self.fallback.build(task)

    def _replace(self, i: int, skipped: list) -> int:
        """A drawn sample the .beton holds no image for: raise, or take the loader's walk to the
        next good one."""
        for j in self.rules.candidates(i):
            if j not in self.bad:
                return j
            source = self.rules.dataset.describe(j)
            if self.rules.on_error == "raise":
                raise CorruptImageError(j, source, "could not be decoded when the .beton was written")
            skipped.append((j, source, "undecodable when the .beton was written"))
        raise AssertionError("unreachable: candidates() raises when it runs out")

    def _loader(self, spec: ViewSpec, threads: int):
        if (spec, threads) not in self.loaders:
            from ffcv.fields.decoders import IntDecoder
            from ffcv.transforms import ToTensor

            image, handed = _pipeline(spec, self.options.memory_format)
            loader = _fresh_output_loader()(
                str(self.beton), fresh=(handed,), batch_size=self.batch_size, num_workers=threads,
                pipelines={"image": image, "index": [IntDecoder(), ToTensor()], "ok": None},
                drop_last=self.options.drop_last, os_cache=True)  # batches_ahead: FFCV's default (3)
            loader.traversal_order = _Fixed()
            self.loaders[spec, threads] = loader
        return self.loaders[spec, threads]

    def _start(self, tasks: Tasks, number: int, views: tuple[ViewSpec, ...]) -> None:
        """FFCV iterators over the pass's batches from `number` on, each batch with replacements."""
        self._stop()
        self.skipped = {}
        order = []
        for b, drawn in enumerate(tasks.planned(number), number):
            skipped: list = []
            order.extend(i if i not in self.bad and i not in self.rules.skip else self._replace(i, skipped)
                         for i in drawn.tolist())
            self.skipped[b] = skipped
        order = np.asarray(order, dtype=np.int64)
        self.views = views
        # The workers' threads are shared among the views' loaders, which run at once: one
        # loader per view with all the threads each would put views × threads threads on the cores.
        threads = max(1, self.threads // len(views))
        for spec in views:
            loader = self._loader(spec, threads)
            loader.traversal_order.order = order
            loader.first_traversal_order = order  # FFCV's len() reads it
            self.iters.append(iter(loader))

    def batches(self, tasks: Tasks) -> Iterator[Built]:
        if self.beton is None:
            self._open()
        try:
            self.views = None
            for task in tasks:
                if task.views != self.views:
                    self._start(tasks, task.number, task.views)
                yield self._batch(task, [next(it) for it in self.iters])
        finally:
            self._stop()

    def _batch(self, task: Task, outs) -> Built:
        index = outs[0][1].reshape(-1).to(torch.int64).clone()
        views = []
        for k, (spec, (images, _)) in enumerate(zip(task.views, outs, strict=True)):
            if not spec.has_colour:  # normalised in FFCV's pipeline, in the loader's memory format, into
                views.append(images)  # a buffer of this batch's own: no copy
                continue
            x = images  # this batch's own buffer too: coloured in place, by the C++ kernel the torch backend uses
            params = [colour_params(spec, self.rules.generator(task, i, k)) for i in task.indices]
            colour_rows(params, x, list(range(len(params))), self.threads)
            views.append(normalize_batch(spec, x))
        return self.rules.assemble(task, views, index, self.skipped.get(task.number, []))

    def close(self) -> None:
        self._stop()
        self.loaders.clear()

    def _stop(self) -> None:
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
