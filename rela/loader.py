"""`rela.Loader`: a DataLoader-shaped loader for RELA training.

    loader = rela.Loader(dataset, batch_size=256, targets=store, views="rela", subset=0.5)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:        # {"views": [B×3×S×S, ...], "target": B×d, "label": B, "index": B}
            ...
            loader.update_scores(batch["index"], per_sample_loss)   # scored subsets only
        loader.set_views("byol")    # at the RELA → SSL switch: effective from the very next batch

Pieces, kept apart as in torch.utils.data: the dataset (decode), `rela.subset.Subset` (which
samples, in which order, on which rank), the view specs (`rela.views`) and a backend that runs
them. Backends: `torch` (worker processes — or one producer thread with `worker_type="thread"` —
torchvision transforms.v2 on uint8 tensors, JPEG crop-while-decoding in `rela._C`), `dali` and
`ffcv` (`rela.backends`); all return the same batch structure.

Every random choice is a function of (seed, epoch, sample index), so results do not depend on
the number of workers, a resumed run replays the same remaining batches, and every rank agrees.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rela import _ext
from rela import distributed as dist_util
from rela._alloc import keep_freed_memory
from rela.datasets import MAX_PIXELS, RelaDataset, jpeg_size, open_dataset
from rela.errors import CorruptImageError, RelaError
from rela.store import TargetStore
from rela.subset import Subset
from rela.views import (
    ViewSpec,
    augment,
    augment_batch,
    colour,
    geometry,
    normalize_batch,
    resolve_views,
    sample_generator,
)

BACKENDS = ("torch", "dali", "ffcv")
_UNSUPPORTED = {
    "sampler": "rela.Loader draws its own order from seed + epoch; use shuffle=, subset= and seed=",
    "batch_sampler": "rela.Loader forms batches itself; use batch_size= and drop_last=",
    "collate_fn": "batches are dicts of views/target/label/index; post-process them in your loop",
    "worker_init_fn": "workers are set up by rela (one intra-op thread each)",
    "generator": "randomness comes from seed= (and the epoch), never from a global generator",
    "multiprocessing_context": "rela uses the platform's default start method",
    "pin_memory_device": "use device= (and pin_memory=True) instead",
}


@dataclass(frozen=True)
class _Task:
    """One batch to build: sent to a worker, so it carries everything the worker needs."""

    epoch: int
    number: int
    indices: tuple[int, ...]
    views: tuple[ViewSpec, ...]
    version: int


class _BatchBuilder(torch.utils.data.Dataset):
    """Runs in the workers: decode each sample once, cut every view from that decode."""

    def __init__(self, dataset: RelaDataset, targets: TargetStore | None, seed: int, on_error: str,
                 decode_threads: int = 1) -> None:
        self.dataset, self.targets, self.seed, self.on_error = dataset, targets, seed, on_error
        self.decode_threads = decode_threads  # C++ JPEG decode threads per batch (thread workers)
        # Samples skipped at conversion: never drawn, and never used as a replacement either.
        self.skip = set(targets.skipped.tolist()) if targets is not None else set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, task: _Task) -> dict:
        return self.build(task)

    def candidates(self, index: int) -> Iterator[int]:
        """The samples that may stand for `index`, in order: itself, then the next ones (the walk
        on_error='skip' takes past undecodable samples; samples skipped at conversion never
        qualify). Every backend replaces samples by this one rule."""
        n = len(self.dataset)
        for step in range(min(n, 64)):
            i = (index + step) % n
            if i not in self.skip:
                yield i
        raise RelaError(f"no decodable sample found near index {index}; the dataset is mostly broken")

    def _load(self, index: int, skipped: list) -> tuple[int, torch.Tensor]:
        """Decode `index`; with on_error='skip', walk forward to the next decodable sample."""
        for i in self.candidates(index):
            try:
                img = self.dataset.load(i)
            except CorruptImageError as e:
                if self.on_error == "raise":
                    raise
                skipped.append((i, e.source, e.reason))
                continue
            t = torch.from_numpy(img if img.flags.writeable else img.copy())  # strided views are fine
            return i, t.permute(2, 0, 1)
        raise AssertionError("unreachable: candidates() raises when it runs out")

    def jpeg_file(self, i: int) -> tuple[bytes | None, tuple[int, int] | None]:
        """Sample i's JPEG bytes and (width, height) when a fast decoder may take it: a readable
        .jpg whose header is sane and not too large. Anything else → (None, None): general path."""
        if not hasattr(self.dataset, "path") or i in self.skip:
            return None, None
        path = self.dataset.path(i)
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            return None, None
        try:
            raw = path.read_bytes()
        except OSError:
            return None, None
        size = jpeg_size(raw) if raw[:2] == b"\xff\xd8" else None
        if size is None or size[0] * size[1] > MAX_PIXELS:
            return None, None
        return raw, size

    def decode(self, task: _Task) -> tuple:
        """Stage 1: JPEG files through rela._C, reading only what the views' boxes need. Returns
        (task, rows decoded, planar uint8 views per row, per-view generators); rows it could not
        do (CMYK, corrupt, not a JPEG file) are left to `finish`, which takes the general path."""
        sizes = {v.size for v in task.views}
        if not (_ext.has_jpeg_decoder() and hasattr(self.dataset, "path") and len(sizes) == 1):
            return task, [], [], []
        data, boxes, flips, gens, ok = [], [], [], [], []
        for row, i in enumerate(task.indices):
            raw, size = self.jpeg_file(i)
            if raw is None:
                continue
            gs = [sample_generator(self.seed, task.epoch, i, k) for k in range(len(task.views))]
            geo = [geometry(spec, size[1], size[0], g) for spec, g in zip(task.views, gs, strict=True)]
            data.append(raw)
            boxes.append([b[:4] for b in geo])
            flips.append([b[4] for b in geo])
            gens.append(gs)
            ok.append(row)
        if not ok:
            return task, [], [], []
        outs, errors = _ext.decode_resized_crops(data, np.asarray(boxes, np.int32), np.asarray(flips, np.uint8),
                                                 task.views[0].size, self.decode_threads)
        keep = [j for j in range(len(ok)) if not errors[j]]  # failures: the general path decides
        return task, [ok[j] for j in keep], [[o[j] for o in outs] for j in keep], [gens[j] for j in keep]

    def build(self, task: _Task) -> dict:
        return self.finish(self.decode(task))

    def finish(self, decoded: tuple) -> dict:
        """Stage 2: colour operations, the rows the fast path didn't do, normalisation."""
        task, rows, planes, gens = decoded
        skipped: list = []
        n = len(task.indices)
        # Augment in uint8 straight into one batch tensor per view, then normalise whole batches.
        u8 = [torch.empty(n, 3, v.size, v.size, dtype=torch.uint8) for v in task.views]
        index = torch.tensor(task.indices, dtype=torch.int64)
        for row, views, gs in zip(rows, planes, gens, strict=True):
            for k, spec in enumerate(task.views):
                u8[k][row] = colour(spec, torch.from_numpy(views[k]), gs[k])  # planar C×S×S
        done = set(rows)
        rest, images = [r for r in range(n) if r not in done], []
        for row in rest:
            orig = task.indices[row]
            try:
                i, img = self._load(orig, skipped)
            except CorruptImageError as e:
                return {"error": (e.index, e.source, e.reason), "version": task.version}
            index[row] = i
            images.append(img)
        if len(rest) > 1 and len({img.shape for img in images}) == 1:
            # Many same-size images (in-memory data): one vectorised pass per view.
            batch = torch.stack(images)
            for k, spec in enumerate(task.views):
                gens = [sample_generator(self.seed, task.epoch, task.indices[r], k) for r in rest]
                u8[k][rest] = augment_batch(spec, batch, gens)
        else:
            for row, img in zip(rest, images, strict=True):
                for k, spec in enumerate(task.views):
                    u8[k][row] = augment(spec, img, sample_generator(self.seed, task.epoch, task.indices[row], k))
        # In a worker, write the float batches straight into shared memory: handing them to the
        # main process is then a handle, not a 4-byte-per-pixel copy.
        in_worker = torch.utils.data.get_worker_info() is not None
        outs = [torch.empty(x.shape, dtype=torch.float32).share_memory_() if in_worker else None for x in u8]
        views = [normalize_batch(spec, x, o) for spec, x, o in zip(task.views, u8, outs, strict=True)]
        return self.assemble(task, views, index, skipped)

    def assemble(self, task: _Task, views: list[torch.Tensor], index: torch.Tensor, skipped: list) -> dict:
        """The batch dict every backend returns: views plus label, target and bookkeeping."""
        batch = {
            "views": views,
            "label": torch.tensor([self.dataset.label(i) for i in index.tolist()], dtype=torch.int64),
            "index": index,
            "version": task.version,
            "drawn": task.indices,
            "skipped": skipped,
        }
        if self.targets is not None:
            batch["target"] = torch.from_numpy(self.targets[index.numpy()])
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()  # decode buffers and batches: reuse freed heap instead of page-faulting


class Loader:
    """Drop-in for `torch.utils.data.DataLoader` in RELA training loops (see module doc)."""

    def __init__(
        self,
        dataset: RelaDataset | str | Path,
        batch_size: int = 1,
        *,
        targets: TargetStore | str | Path | None = None,
        views: str | ViewSpec | Sequence[ViewSpec] = "rela",
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        subset: Subset | float | None = None,
        policy: str = "uniform",
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        persistent_workers: bool = False,
        on_error: str = "raise",
        worker_type: str = "process",
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float = 0,
        **dataloader_kwargs,
    ) -> None:
        for key in dataloader_kwargs:
            why = _UNSUPPORTED.get(key)
            raise TypeError(f"rela.Loader does not take {key}=: {why}" if why
                            else f"rela.Loader got an unexpected argument {key!r}")
        if batch_size < 1:
            raise RelaError(f"batch_size must be positive, got {batch_size}")
        if on_error not in ("raise", "skip"):
            raise RelaError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if worker_type not in ("process", "thread"):
            raise RelaError(f"worker_type must be 'process' or 'thread', not {worker_type!r}")
        self.worker_type = worker_type
        self.dataset = open_dataset(dataset) if not isinstance(dataset, RelaDataset) else dataset
        if targets is not None and not isinstance(targets, TargetStore):
            targets = TargetStore.open(targets, self.dataset)
        elif targets is not None:
            targets.check_dataset(self.dataset)
        self.targets = targets
        self.image_size, self.mean, self.std = image_size, mean, std
        self._views = resolve_views(views, image_size, mean, std)
        self._views_version = 0
        valid = targets.valid_mask() if targets is not None else None
        if isinstance(subset, Subset):
            if subset.n != len(self.dataset):
                raise RelaError(f"subset covers {subset.n} samples, the dataset has {len(self.dataset)}")
            self.subset = subset
        else:
            self.subset = Subset(len(self.dataset), 1.0 if subset is None else float(subset), policy,
                                 seed=seed, valid=valid)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        if num_workers is None:
            num_workers = 0 if getattr(self.dataset, "in_memory", False) else min(2, dist_util.cpu_share())
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.backend = self._pick_backend(backend, self.device)
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        if persistent_workers:
            warnings.warn("rela.Loader: persistent_workers is not supported yet; workers start at each "
                          "epoch (cheap with fork) and views switch without restarting them",
                          UserWarning, stacklevel=2)
        self.on_error = on_error
        dr, dw = dist_util.rank_world()
        self.rank = dr if rank is None else rank
        self.world_size = dw if world_size is None else world_size
        self.timeout = timeout
        self.epoch = 0
        self._resume_batch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        threads = max(1, num_workers) if worker_type == "thread" else 1
        self._builder = _BatchBuilder(self.dataset, self.targets, seed, on_error, decode_threads=threads)
        self._dali = self._ffcv = None
        if self.backend == "dali":
            from rela.backends.dali import DaliBuilder

            self._dali = DaliBuilder(self._builder, batch_size, max(1, num_workers), self.device)
        self.skipped: list = []  # (index, source, reason) of samples replaced in the last epoch
        self._consumed = 0

    def _pick_backend(self, backend: str, device: torch.device) -> str:
        """`auto`: DALI on a GPU (hardware-assisted decode) when installed; on the CPU rela's own
        torch backend — it needs no conversion step and replays crops exactly on resume. In
        bench/loader.py (2 cores) the ffcv backend was faster for one view (1455 vs 1072 img/s)
        and slower for two (705 vs 759), DALI's CPU pipeline slower in both; choose `ffcv`
        explicitly to trade exact replay for that."""
        from rela.backends import available

        have = available()
        if backend == "auto":
            return "dali" if device.type == "cuda" and have["dali"] else "torch"
        if backend not in BACKENDS:
            raise RelaError(f"unknown backend {backend!r}; choose one of {('auto', *BACKENDS)}")
        if not have[backend]:
            extra = {"dali": "pip install nvidia-dali-cuda130 (or rela-accel[dali])",
                     "ffcv": "FFCV's system libraries, then pip install ffcv numba (scripts/setup.sh does both)"}
            raise RelaError(f"backend {backend!r} is not installed here: {extra[backend]}")
        return backend

    # --- order ---------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = self.subset.epoch_indices(epoch, shuffle=self.shuffle)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _rank_batches(self, epoch: int) -> list[np.ndarray]:
        mine = Subset.shard(self._epoch_order(epoch), self.rank, self.world_size, self.batch_size, self.drop_last)
        cut = len(mine) // self.batch_size * self.batch_size if self.drop_last else len(mine)
        return [mine[s:s + self.batch_size] for s in range(0, cut, self.batch_size)]

    def __len__(self) -> int:
        per_rank = self.subset.size // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (and so the subset and order). Called each epoch, as with DistributedSampler."""
        if epoch != self.epoch:
            self._resume_batch = 0
        self.epoch = int(epoch)

    # --- views ---------------------------------------------------------------------------
    @property
    def views(self) -> tuple[ViewSpec, ...]:
        return self._views

    def set_views(self, views: str | ViewSpec | Sequence[ViewSpec]) -> None:
        """Switch the views; the very next batch the loop receives uses them."""
        self._views = resolve_views(views, self.image_size or self._views[0].size, self.mean, self.std)
        self._views_version += 1

    # --- scores --------------------------------------------------------------------------
    def update_scores(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        """Feed per-sample losses back for the `scored` policy (all ranks' losses when distributed)."""
        import torch.distributed as dist

        index = torch.as_tensor(index).detach().reshape(-1).cpu()
        loss = torch.as_tensor(loss).detach().reshape(-1).float().cpu()
        if dist_util.active():  # CPU tensors: gloo (the default group, or a gloo side group under NCCL)
            w = dist.get_world_size()
            gathered = [torch.empty_like(t) for t in (index, loss) for _ in range(w)]
            dist.all_gather(gathered[:w], index, group=dist_util.cpu_group())
            dist.all_gather(gathered[w:], loss, group=dist_util.cpu_group())
            index, loss = torch.cat(gathered[:w]), torch.cat(gathered[w:])
        self.subset.update(index, loss)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the loader is: resuming from this replays exactly the remaining batches."""
        state = {"epoch": self.epoch, "batch": self._consumed, "seed": self.seed,
                 "subset": self.subset.state_dict(), "views": list(self._views)}
        if self.subset.policy == "scored":
            state["order"] = torch.from_numpy(self._epoch_order(self.epoch).copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise RelaError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self.subset.load_state_dict(state["subset"])
        self.epoch = int(state["epoch"])
        self._resume_batch = self._consumed = int(state["batch"])
        self._views = tuple(state["views"])
        self._views_version += 1
        self._order_cache = (self.epoch, state["order"].numpy()) if "order" in state else None

    # --- iteration -----------------------------------------------------------------------
    def _tasks(self, epoch: int, batches: list[np.ndarray], start: int) -> Iterator[_Task]:
        for b in range(start, len(batches)):
            # Read the views when the task is created: tasks queued after set_views use the new ones.
            yield _Task(epoch, b, tuple(int(i) for i in batches[b]), self._views, self._views_version)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self._resume_batch
        batches = self._rank_batches(epoch)
        self._resume_batch = 0
        self._consumed = start
        self.skipped = []
        tasks = self._tasks(epoch, batches, start)
        keep_freed_memory()  # normalised batches are tens of MB: reuse freed heap, don't page-fault
        if self.backend == "dali":  # DALI's threads decode; one producer thread feeds it ahead
            source = _ThreadedBatches(self._dali, tasks, depth=max(2, self.prefetch_factor or 2))
        elif self.backend == "ffcv":
            if self._ffcv is None:
                from rela.backends.ffcv import FfcvBatches, write_beton

                self._ffcv = FfcvBatches(self._builder, write_beton(self.dataset, self.num_workers),
                                         self.num_workers, self.batch_size, self.drop_last)
            source = self._ffcv.iterate(batches, tasks)
        elif self.num_workers == 0:
            source = (self._builder.build(t) for t in tasks)
        elif self.worker_type == "thread":
            source = _ThreadedBatches(self._builder, tasks, depth=max(2, self.prefetch_factor or 2))
        else:
            source = iter(torch.utils.data.DataLoader(
                self._builder, batch_size=None, sampler=_TaskSampler(tasks, len(batches) - start),
                num_workers=self.num_workers, worker_init_fn=_worker_init,
                prefetch_factor=self.prefetch_factor, persistent_workers=False,
                pin_memory=self.pin_memory, timeout=self.timeout,
            ))
        try:
            yield from self._deliver(source, epoch, start)
        finally:
            if hasattr(source, "close"):
                source.close()  # threads stop, FFCV iterators close, even on break or error
        if self.skipped:
            warnings.warn(f"rela.Loader: {len(self.skipped)} undecodable samples were replaced this epoch "
                          f"(first: index {self.skipped[0][0]}, {self.skipped[0][1]}); see loader.skipped",
                          RuntimeWarning, stacklevel=2)
        self._consumed = 0
        if epoch == self.epoch:
            self.epoch += 1  # a finished pass moves on, so forgetting set_epoch still gives fresh subsets

    def _deliver(self, source, epoch: int, start: int) -> Iterator[dict]:
        for number, batch in enumerate(source, start):
            if "error" in batch:
                raise CorruptImageError(*batch["error"])
            if batch["version"] != self._views_version:
                # Built before set_views: rebuild it with the current views, here, once.
                task = _Task(epoch, number, batch["drawn"], self._views, self._views_version)
                batch = self._builder.build(task)
            self.skipped.extend(batch.pop("skipped"))
            batch.pop("version"), batch.pop("drawn")
            self._consumed = number + 1
            yield self._to_device(batch)

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        nb = self.pin_memory
        batch["views"] = [v.to(self.device, non_blocking=nb) for v in batch["views"]]
        for key in ("target", "label", "index"):
            if key in batch:
                batch[key] = batch[key].to(self.device, non_blocking=nb)
        return batch


class _TaskSampler(torch.utils.data.Sampler):
    """Hands the DataLoader our lazily created tasks (so set_views reaches tasks not yet queued)."""

    def __init__(self, tasks: Iterator[_Task], length: int) -> None:
        self.tasks, self.length = tasks, length

    def __iter__(self) -> Iterator[_Task]:
        return self.tasks

    def __len__(self) -> int:
        return self.length


class _ThreadedBatches:
    """Builds batches ahead in one background thread (worker_type="thread"): the JPEG decode in
    rela._C runs `num_workers` threads with the GIL released, so one process does the work
    without shipping every batch through shared memory. Errors re-raise in the consumer."""

    _END = object()

    def __init__(self, builder: _BatchBuilder, tasks: Iterator[_Task], depth: int) -> None:
        import queue
        import threading

        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(builder, tasks), daemon=True,
                                       name="rela-loader")
        self.thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, builder: _BatchBuilder, tasks: Iterator[_Task]) -> None:
        try:
            for task in tasks:
                if not self._put(builder.build(task)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
