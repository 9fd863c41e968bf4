"""The `torch` backend: rela's own decode and the torchvision views.

Each sample is decoded once and every view is cut from that decode. JPEG files go through
`rela._C`'s crop-while-decoding path, which reads only the rows and columns the views' boxes
need; everything else (other formats, CMYK, in-memory arrays, failures) takes the general path
(`SampleRules.load` + `crop`, or `crop_batch` for many same-size images). Either way the colour
operations then run over the whole batch in rela._C's kernel (`colour_rows`). Batches are built
in the loop's process (`num_workers=0`), in worker processes through a torch DataLoader (the
default), or ahead in `num_workers` threads of the loop's process (`worker_type="thread"`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from rela import _ext, _workers
from rela._alloc import keep_freed_memory
from rela.errors import RelaError
from rela.loading.backends import Built, Options, SampleRules, Task, Tasks, batch_pool, shm_ring
from rela.loading.backends.augment import (
    colour_batch_tensor,
    colour_rows,
    crop,
    crop_batch,
    normalisation,
    normalize_batch,
)
from rela.loading.backends.threads import ThreadedBatches
from rela.loading.views import ColourParams, ViewSpec, colour_params, geometry, geometry_batch

# Scaled JPEG decode: 1/2 or 1/4 DCT scale where every view's box, scaled, still covers 1.5 times
# its output. Measured on real photos (bench/scaled_decode.py, docs): over the crops it takes, mean
# |difference| from the full-resolution decode 0.5-0.7 grey levels, 99th percentile 3-7 levels;
# fit 1 (covers its output only) gave 1-1.3 and 7-11. 224-px views of crops under 672 px, and so
# every view of 256-px stores, keep the full-resolution pixels.
SCALED_FIT = 1.5


class TorchBuilder(torch.utils.data.Dataset):
    """Builds one task's batch; a Dataset of tasks, so DataLoader workers can run it."""

    def __init__(self, rules: SampleRules, decode_threads: int = 1, handoff: str = "float32",
                 ring_slots: int = 3, scaled_decode: bool = True) -> None:
        self.rules = rules
        self.scaled_decode = scaled_decode  # JPEG: decode at 1/2 or 1/4 where every view still fits
        self.decode_threads = decode_threads  # C++ JPEG (and colour) threads per batch (thread workers)
        self.ring_slots = ring_slots  # batch buffers kept per shape (shm_ring in worker processes, else `pool`)
        self.pool = batch_pool.BatchPool(ring_slots)
        # "float32": finished views; "uint8": coloured crops, normalised by the loader on the device;
        # "device-colour": plain crops + each row's colour choices, coloured there too.
        self.handoff = handoff

    def __len__(self) -> int:
        return len(self.rules.dataset)

    def __getitem__(self, task: Task) -> Built:
        return self.build(task)

    def build(self, task: Task) -> Built:
        try:
            if getattr(self.rules.dataset, "as_is", False):
                built = self.stack_items(task)
            else:
                with self.rules.dataset.fetched(task.indices):  # remote members: read concurrently
                    built = self.finish(self.decode(task))
        except RelaError as e:  # a value, not raised: see Built.error
            built = Built.failed(e, task.version)
        return shm_ring.attach(built)  # in a worker process: the shared buffers it leased

    def stack_items(self, task: Task) -> Built:
        """A dataset used as-is (`views="as-is"`): its items' own views, stacked per view."""
        skipped: list = []
        index, labels, rows = [], [], []
        for i in task.indices:
            j, (views, label) = self.rules.read(i, skipped, self.rules.dataset.item_views)
            index.append(j), labels.append(label), rows.append(views)
        shapes = {tuple((tuple(v.shape), v.dtype) for v in r) for r in rows}
        if len(shapes) != 1:
            raise RelaError(f"{self.rules.dataset.name}: as-is items of one batch differ in view count, shape or "
                            f"dtype ({sorted(map(str, shapes))[:2]}); its transform must make same-size views")
        views = [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]
        return self.rules.assemble(task, views, torch.tensor(index, dtype=torch.int64), skipped, labels)

    def fused(self, task: Task) -> bool:
        """Plain crops handed over as float32: the C++ resampler writes the normalised batch itself
        (no uint8 batch, no separate normalise pass; the same numbers as `normalize_batch`)."""
        return self.handoff == "float32" and not any(v.has_colour for v in task.views)

    def decode(self, task: Task) -> tuple:
        """Stage 1: JPEG files through rela._C, reading only what the views' boxes need, written
        straight into the batch (uint8, or normalised float32 when `fused`). Returns (task, rows
        decoded, the batch per view, per-view generators per row); rows it could not do (CMYK,
        corrupt, not a JPEG file) are left to `finish`, which takes the general path."""
        n, fused = len(task.indices), self.fused(task)
        batch = [self._batch_tensor((n, 3, v.size, v.size), torch.float32 if fused else torch.uint8)
                 for v in task.views]
        if not _ext.has_jpeg_decoder():
            return task, [], batch, []
        data, sizes, ok = [], [], []
        for row, i in enumerate(task.indices):
            raw, size = self.rules.jpeg_file(i)
            if raw is not None:
                data.append(raw), sizes.append(size), ok.append(row)
        if not ok:
            return task, [], batch, []
        boxes, flips, gens = self._geometry(task, [task.indices[r] for r in ok], sizes)
        scale, bias = _normalisation(task.views) if fused else (None, None)
        _, errors = _ext.decode_resized_crops(data, boxes, flips, [v.size for v in task.views], self.decode_threads,
                                              outs=[b.numpy() for b in batch], rows=np.asarray(ok, np.int64),
                                              scale=scale, bias=bias, fit=SCALED_FIT if self.scaled_decode else 0.0)
        keep = [j for j in range(len(ok)) if not errors[j]]  # failures: the general path decides
        return task, [ok[j] for j in keep], batch, [gens[j] for j in keep]

    def _geometry(self, task: Task, indices: list[int], sizes: list[tuple[int, int]]) -> tuple:
        """Every view's boxes [N, views, 4] and flips [N, views] for these samples ((width, height)
        each), and per sample the views' generators where colours are still to be drawn from them
        (after the box, on the same stream); views without colour ops are drawn in one C++ call."""
        n, views = len(indices), len(task.views)
        boxes, flips = np.empty((n, views, 4), np.int32), np.empty((n, views), np.uint8)
        gens: list[list] = [[None] * views for _ in range(n)]
        heights, widths = [s[1] for s in sizes], [s[0] for s in sizes]
        for k, spec in enumerate(task.views):
            if not spec.has_colour:
                boxes[:, k], flips[:, k] = geometry_batch(spec, self.rules.seed, task.epoch, indices, k, heights,
                                                          widths)
                continue
            for j, (i, h, w) in enumerate(zip(indices, heights, widths, strict=True)):
                gens[j][k] = self.rules.generator(task, i, k)
                top, left, bh, bw, flip = geometry(spec, h, w, gens[j][k])
                boxes[j, k], flips[j, k] = (top, left, bh, bw), flip
        return boxes, flips, gens

    def finish(self, decoded: tuple) -> Built:
        """Stage 2: the rows the fast path didn't do, colour operations, normalisation."""
        task, rows, batch, gens = decoded
        skipped: list = []
        n = len(task.indices)
        index = torch.tensor(task.indices, dtype=torch.int64)
        params: list[list[dict | None]] = [[None] * n for _ in task.views]  # each row's colour choices
        for row, gs in zip(rows, gens, strict=True):
            for k, spec in enumerate(task.views):  # after geometry, on the same stream (no draws: no ops)
                params[k][row] = colour_params(spec, gs[k]) if gs[k] is not None else ColourParams()
        done = set(rows)
        rest, images = [r for r in range(n) if r not in done], []
        for row in rest:
            i, img = self.rules.load(task.indices[row], skipped)
            index[row] = i
            images.append(img)
        if self.fused(task):  # the fast path's rows are final; the others are cropped, then normalised
            if rest:
                u8 = [torch.empty(x.shape, dtype=torch.uint8) for x in batch]
                self._crop_rest(task, rest, images, u8, params)
                for spec, x, out in zip(task.views, u8, batch, strict=True):
                    out[rest] = normalize_batch(spec, x[rest])
            return self.rules.assemble(task, batch, index, skipped)
        self._crop_rest(task, rest, images, batch, params)
        if self.handoff == "device-colour":  # colour and normalisation on the device (the loader)
            return self.rules.assemble(task, batch, index, skipped, colour=params)
        for k in range(len(task.views)):  # C++ over the rows, threads, GIL released
            colour_rows(params[k], batch[k], list(range(n)), self.decode_threads)
        if self.handoff == "uint8":
            return self.rules.assemble(task, batch, index, skipped)
        # In a worker, write the float batches straight into shared memory: handing them to the
        # main process is then a handle, not a 4-byte-per-pixel copy.
        views = [normalize_batch(spec, x, self._batch_tensor(x.shape, torch.float32))
                 for spec, x in zip(task.views, batch, strict=True)]
        return self.rules.assemble(task, views, index, skipped)

    def _batch_tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An empty batch; in a worker process, in shared memory that the worker reuses (shm_ring),
        so handing it over is a handle, not a copy through a pipe; in this process, a buffer the
        pool lends until the user drops the batch (batch_pool: no fresh pages per batch)."""
        if torch.utils.data.get_worker_info() is None:
            return self.pool.take(shape, dtype)
        return shm_ring.take(shape, dtype, self.ring_slots)

    def _crop_rest(self, task: Task, rest: list[int], images: list[torch.Tensor], u8: list[torch.Tensor],
                   params: list[list[dict | None]]) -> None:
        """The general path's crops, written into rows `rest` of the uint8 batches, and their
        colour choices into `params`. The random streams are the drawn samples' (a replacement
        keeps the drawn sample's views)."""
        batched = len(rest) > 1 and len({img.shape for img in images}) == 1
        stack = torch.stack(images) if batched else None  # in-memory data: one vectorised pass per view
        for k, spec in enumerate(task.views):
            gens = [self.rules.generator(task, task.indices[r], k) for r in rest]
            if batched:
                u8[k][rest] = crop_batch(spec, stack, gens)
            else:
                for row, img, g in zip(rest, images, gens, strict=True):
                    u8[k][row] = crop(spec, img, g)
            for row, g in zip(rest, gens, strict=True):
                params[k][row] = colour_params(spec, g)


def _normalisation(specs: tuple[ViewSpec, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each view's (x / 255 − mean) / std as x · scale + bias, [views, 3] float32: the numbers
    `normalize_batch` multiplies and adds, so the fused path rounds exactly as it does."""
    scale, bias = zip(*(normalisation(v) for v in specs), strict=True)
    return np.asarray(scale, np.float32), np.asarray(bias, np.float32)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    _workers.in_worker()  # dies with the loop's process, even when that is SIGKILLed
    keep_freed_memory()  # decode buffers and batches: reuse freed heap instead of page-faulting


class _TaskSampler(torch.utils.data.Sampler):
    """Hands the DataLoader our lazily created tasks (so set_views reaches tasks not yet queued)."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks, self.length = tasks, len(tasks)

    def __iter__(self) -> Iterator[Task]:
        return self.tasks

    def __len__(self) -> int:
        return self.length


class TorchBackend:
    """Runs `TorchBuilder` inline, in worker processes, or in worker threads."""

    def __init__(self, rules: SampleRules, options: Options) -> None:
        self.options = options
        # Thread workers each build whole batches (see threads.py), so each batch's C++ runs on one thread.
        # A batch's buffers are lent until the user drops the batch: one per batch queued
        # (prefetch_factor per worker process; threads share one pool), one being built, and two
        # the loop holds (this one, the last).
        lent = options.depth * (options.num_workers if options.worker_type == "thread" else 1)
        self.builder = TorchBuilder(rules, 1, options.handoff, ring_slots=lent + 3,
                                    scaled_decode=options.scaled_decode)

    def build(self, task: Task) -> Built:
        return self.builder.build(task)

    def batches(self, tasks: Tasks) -> Iterator[Built]:
        o, claim = self.options, None
        if o.num_workers == 0:
            source = map(self.builder.build, tasks)
        elif o.worker_type == "thread":
            # the batches are this process's allocations: reuse their pages (RELA_TUNE_MALLOC=0: don't)
            keep_freed_memory()
            source = ThreadedBatches(self.builder.build, tasks, o.depth * o.num_workers, threads=o.num_workers)
        else:
            source = _workers.start(torch.utils.data.DataLoader(  # a Ctrl-C while forking is not lost
                self.builder, batch_size=None, sampler=_TaskSampler(tasks), num_workers=o.num_workers,
                worker_init_fn=_worker_init, prefetch_factor=o.prefetch_factor, persistent_workers=False,
                pin_memory=o.pin_memory, timeout=o.timeout,
            ))
            claim = shm_ring.claim  # a batch's buffers go back to its worker when the user drops it
        try:
            yield from (map(claim, source) if claim else source)
        finally:
            if hasattr(source, "close"):
                source.close()  # the threads stop, even on break or error
            self.builder.pool.clear()  # no batch memory kept between passes

    def finish_on_device(self, built: Built, views: list[torch.Tensor],
                         specs: tuple[ViewSpec, ...]) -> list[torch.Tensor]:
        """The hand-offs that ship less over the bus finish where the views landed: device-colour
        applies each row's drawn colour choices as batched tensor ops; uint8 and device-colour
        then normalise there."""
        if built.colour is not None:
            views = [colour_batch_tensor(v.float(), p) for v, p in zip(views, built.colour, strict=True)]
        if self.options.handoff != "float32":
            views = [normalize_batch(spec, v) for spec, v in zip(specs, views, strict=True)]
        return views

    def close(self) -> None:
        pass  # nothing outlives a pass: workers and threads end with it
