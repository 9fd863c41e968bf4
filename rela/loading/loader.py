"""`rela.Loader`: a DataLoader-shaped loader for RELA training.

    loader = rela.Loader(dataset, batch_size=256, targets=store, views="rela", subset=0.5)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:        # {"views": [B×3×S×S, ...], "target": B×d, "label": B, "index": B}
            ...
            loader.update_scores(batch["index"], per_sample_loss)   # scored subsets only
        loader.set_views("byol")    # at the RELA → SSL switch: effective from the very next batch

Pieces, kept apart as in torch.utils.data: the dataset (decode), `rela.loading.subset.Subset` (which
samples, in which order, on which rank), the view specs (`rela.loading.views`) and a backend that runs
them. Backends (`rela.loading.backends`, one contract): `torch` (worker processes — or worker
threads with `worker_type="thread"` — torchvision transforms.v2 on uint8 tensors, JPEG
crop-while-decoding in `rela._C`), `dali` and `ffcv`; all return the same batch structure.

`batch_format="tuple"` yields `((view1, view2, ...), label)` instead, the shape lightly's and
torchvision's SSL loops unpack (`(x0, x1), y = batch`), so such a loop runs unchanged (targets and
indices are then not handed over: the RELA phase needs the dict).

`views="as-is"` takes a dataset object's items as its own transform made them (lightly's
`BYOLTransform` in a torchvision dataset, say): rela stacks them and still owns order, subsets,
resume, targets and `on_error`, but the views' randomness is then the transform's, not rela's.

Every random choice is a function of (seed, epoch, sample index), so results do not depend on
the number of workers, a resumed run replays the same remaining batches, and every rank agrees.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rela import choices
from rela import distributed as dist_util
from rela._alloc import keep_freed_memory
from rela.data.datasets import MapDataset, RelaDataset, open_dataset
from rela.data.store import TargetStore
from rela.errors import CorruptImageError, RelaError, RelaWarning
from rela.loading import backends
from rela.loading.options import Options, check_choice, check_count
from rela.loading.subset import Subset
from rela.loading.translate import as_views
from rela.loading.views import ViewSpec, resolve_views

SKIP_REMEDY = ("Fix or remove the file, or pass on_error='skip' to rela.Loader (rela train / rela eval: "
               "--skip-corrupt) to replace it with the next decodable sample")
# batch_format=: "dict" {views, label, index[, target]}; "tuple" ((v1, v2, ...), label), what
# lightly's and torchvision's loops unpack; "lightly" ((v1, v2, ...), label, {index[, target]}):
# lightly's (views, targets, extra) triplet, so `views, y = batch[0], batch[1]` still works and the
# RELA phase (rela.RelaCallback) still finds the targets and indices.
BATCH_FORMATS = choices.BATCH_FORMATS
AS_IS = "as-is"  # views=: the dataset's own transform makes the views (MapDataset(as_is=True))
# handoff=: what crosses to the device. float32: finished views; uint8: coloured crops, normalised
# there; device-colour: plain crops and each row's colour choices, coloured and normalised there.
HANDOFFS = choices.HANDOFFS

_UNSUPPORTED = {
    "sampler": "rela.Loader draws its own order from seed + epoch; use shuffle=, subset= and seed=",
    "batch_sampler": "rela.Loader forms batches itself; use batch_size= and drop_last=",
    "collate_fn": "batches are dicts of views/target/label/index; post-process them in your loop",
    "worker_init_fn": "workers are set up by rela (one intra-op thread each)",
    "generator": "randomness comes from seed= (and the epoch), never from a global generator",
    "multiprocessing_context": "rela uses the platform's default start method",
    "pin_memory_device": "use device= (and pin_memory=True) instead",
}


def _check_arguments(dataloader_kwargs: dict, on_error: str, batch_format: str, handoff: str, backend,
                     views, rank, world_size) -> None:
    """What the loader itself takes (the backend's settings are checked by `Options`), refused
    before anything is opened."""
    for key in dataloader_kwargs:
        why = _UNSUPPORTED.get(key)
        raise TypeError(f"rela.Loader does not take {key}=: {why}" if why
                        else f"rela.Loader got an unexpected argument {key!r}")
    check_choice("on_error", on_error, ("raise", "skip"))
    check_choice("batch_format", batch_format, BATCH_FORMATS)
    as_is = isinstance(views, str) and views == AS_IS
    if handoff != "float32" and (backend not in ("auto", "torch") or as_is):
        raise RelaError(f"handoff={handoff!r} is the torch backend's (with rela's views): DALI and FFCV "
                        "normalise in their own pipelines")
    check_count("world_size", world_size, 1, optional=True)
    check_count("rank", rank, 0, None if world_size is None else world_size - 1, optional=True)


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
        seed: int | None = None,
        backend: str | type = "auto",
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
        handoff: str = "float32",  # see HANDOFFS
        prefetch_factor: int | None = 2,
        persistent_workers: bool = False,
        on_error: str = "raise",
        exif_transpose: bool = False,
        batch_format: str = "dict",
        worker_type: str = "auto",
        scaled_decode: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float = 0,
        **dataloader_kwargs,
    ) -> None:
        # every backend setting, checked here before anything is opened; `auto` / None resolved below
        options = Options(batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                          worker_type=worker_type, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                          timeout=timeout, device=device, handoff=handoff, memory_format=memory_format,
                          scaled_decode=scaled_decode)
        _check_arguments(dataloader_kwargs, on_error, batch_format, handoff, backend, views, rank, world_size)
        # seed=None follows the user's seed (seed_everything / torch.manual_seed); see _agree_on_seed
        self._seed_given = self._seed_agreed = seed is not None
        seed = int(seed) if seed is not None else torch.initial_seed() % 2**63
        self.shuffle, self.seed, self.batch_format, self.on_error = shuffle, seed, batch_format, on_error
        self._open_data(dataset, targets, views, image_size, mean, std, backend, exif_transpose)
        self._draw_subset(subset, policy, options.device)
        if persistent_workers:
            warnings.warn("rela.Loader: persistent_workers is not supported yet; workers start at each "
                          "epoch (cheap with fork) and views switch without restarting them",
                          RelaWarning, stacklevel=2)
        if num_workers is None:
            num_workers = 0 if self.dataset.in_memory else min(2, dist_util.cpu_share())
        # How the backend runs, decided once: every setting in one frozen object, read from there.
        self.options = options.resolved(self._pick_worker_type(worker_type), num_workers)
        # a uint8 / device-colour hand-off is the torch backend's (checked in _check_arguments)
        self.backend = "torch" if handoff != "float32" else self._pick_backend(backend, self.options.device)
        self._rules = backends.SampleRules(self.dataset, self.targets, self.seed, self.on_error)
        self._backend = backends.create(self.backend, self._rules, self.options)
        self._rank, self._world_size = rank, world_size  # None: the process group's, when it is asked
        self.epoch = self._resume_batch = self._consumed = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.skipped: list = []  # (index, source, reason) of each sample replaced in the last epoch, once
        self._skipped_seen: set[int] = set()

    # --- construction, in steps ------------------------------------------------------------
    def _open_data(self, dataset, targets, views, image_size, mean, std, backend: str, exif_transpose: bool) -> None:
        """The dataset (images upright by their EXIF tag with `exif_transpose`; off, as in
        torchvision), the target store checked against it, and the views."""
        self.as_is = isinstance(views, str) and views == AS_IS
        self.dataset = (self._as_is_dataset(dataset, backend) if self.as_is
                        else open_dataset(dataset, exif_transpose=exif_transpose))
        if getattr(self.dataset, "as_is", False) and not self.as_is:
            raise RelaError(f"{self.dataset.name} was made with as_is=True: its transform makes the views, "
                            "so pass views='as-is'")
        if targets is not None and not isinstance(targets, TargetStore):
            targets = TargetStore.open(targets, self.dataset)
        elif targets is not None:
            targets.check_dataset(self.dataset)
        self.targets = targets
        self.image_size, self.mean, self.std = image_size, mean, std
        self._views = () if self.as_is else resolve_views(as_views(views), image_size, mean, std)
        self._views_version = 0

    def _draw_subset(self, subset, policy: str, device: torch.device) -> None:
        """The per-epoch subset (a given `Subset`, or a share of the data drawn by `policy`)."""
        if isinstance(subset, Subset):
            if subset.n != len(self.dataset):
                raise RelaError(f"subset covers {subset.n} samples, the dataset has {len(self.dataset)}")
            self.subset = subset
        else:
            valid = self.targets.valid_mask() if self.targets is not None else None
            self.subset = Subset(len(self.dataset), 1.0 if subset is None else float(subset), policy,
                                 seed=self.seed, valid=valid)
        if self.subset.policy == "scored" and device.type == "cuda":
            self.subset.to(device)  # scores updated where the losses are; weights to the host per epoch

    # The settings users read back, from the one object that holds them.
    batch_size = property(lambda self: self.options.batch_size)
    drop_last = property(lambda self: self.options.drop_last)
    num_workers = property(lambda self: self.options.num_workers)
    worker_type = property(lambda self: self.options.worker_type)
    scaled_decode = property(lambda self: self.options.scaled_decode)
    device = property(lambda self: self.options.device)
    batching = property(lambda self: self.options.batching)  # the one owner of the batches and their count

    def _pick_worker_type(self, worker_type: str) -> str:
        """`auto`: threads when every per-sample step is rela's own code, which releases the GIL
        (its decoders, views and colour kernels): no pickled hand-off, re-mapping or fork per pass
        (bench/loader.py: ×1.5 FFCV's rate on plain crops, where processes read ×0.95); processes
        when the user's Python runs per sample (a map-style dataset's `__getitem__`, a transform
        taken `views="as-is"`), which holds the GIL and would serialise the threads."""
        if worker_type != "auto":
            return worker_type
        return "process" if self.as_is or self.dataset.runs_user_code else "thread"

    @staticmethod
    def _as_is_dataset(dataset, backend: str) -> MapDataset:
        """`views="as-is"`: a dataset object whose own transform makes the views, items unchanged."""
        if isinstance(dataset, MapDataset):
            dataset = dataset.used_as_is()
        elif isinstance(dataset, (str, Path, RelaDataset)) or not hasattr(dataset, "__getitem__"):
            raise RelaError(f"views='as-is' takes the items of a dataset object (whose transform makes the "
                            f"views); {dataset} has no transform: use views='rela', 'byol', ...")
        else:
            dataset = MapDataset(dataset, as_is=True)
        if backend not in ("auto", "torch"):
            raise RelaError(f"views='as-is' runs the dataset's own transform in the torch backend, not {backend!r}")
        return dataset

    def _pick_backend(self, backend: str, device: torch.device) -> str:
        """`auto`: DALI on a GPU (hardware-assisted decode) when installed; on the CPU rela's own
        torch backend — it needs no conversion step and replays crops exactly on resume. The
        measured trade-off against `ffcv` (faster on plain crops, crops not replayable) is in the
        loader tables of docs/benchmarks.md (`bench/loader.py`); choose `ffcv` explicitly to make it."""
        if isinstance(backend, type):  # a Backend class of your own, as it is
            return backend
        if backend == "auto":
            return "dali" if device.type == "cuda" and backends.available()["dali"] else "torch"
        backends.check(backend)
        return backend

    # --- ranks ---------------------------------------------------------------------------
    # Read when used, not at construction: Lightning (and most code built on it) makes the loader
    # before `trainer.fit()` creates the process group, and only injects a DistributedSampler into
    # a torch DataLoader. Read once, every rank would train the whole dataset, silently.
    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else self._group()[0]

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else self._group()[1]

    def _group(self) -> tuple[int, int]:
        rank, world = dist_util.rank_world()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and launched > 1:
            raise RelaError(f"this process is rank {os.environ.get('RANK', '?')} of a {launched}-process job "
                            "(WORLD_SIZE), but torch.distributed has no process group yet, so every rank would see "
                            "the whole dataset. Iterate once the group exists (in Lightning: inside trainer.fit), "
                            "or pass rank= and world_size= to rela.Loader")
        return rank, world

    # --- order ---------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = self.subset.epoch_indices(epoch, shuffle=self.shuffle)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _rank_batches(self, epoch: int) -> list[np.ndarray]:
        return self.batching.batches(self._epoch_order(epoch), self.rank, self.world_size)

    def __len__(self) -> int:
        return self.batching.count(self.subset.size, self.world_size)

    @property
    def sampler(self) -> Loader:
        """The loader is its own sampler: loops that call `dataloader.sampler.set_epoch(epoch)`
        each epoch (Lightning's, DistributedSampler-style code) reach `set_epoch` here."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (and so the subset and order). Called each epoch, as with DistributedSampler."""
        check_count("epoch", epoch, 0)
        if epoch != self.epoch:
            self._resume_batch = 0
        self.epoch = int(epoch)

    # --- views ---------------------------------------------------------------------------
    @property
    def views(self) -> tuple[ViewSpec, ...]:
        return self._views

    def set_views(self, views: str | ViewSpec | Sequence[ViewSpec]) -> None:
        """Switch the views; the very next batch the loop receives uses them."""
        if self.as_is:
            raise RelaError("this loader takes its views from the dataset (views='as-is'); to switch views at "
                            "the RELA → SSL hand-over, make a second Loader over a dataset with the other transform")
        self._views = resolve_views(as_views(views), self.image_size or self._views[0].size, self.mean, self.std)
        self._views_version += 1

    # --- scores --------------------------------------------------------------------------
    def update_scores(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        """Feed per-sample losses back for the `scored` policy (all ranks' losses when distributed)."""
        import torch.distributed as dist

        device = self.subset.score.device  # the training GPU when the loader has one (see __init__)
        index = torch.as_tensor(index).detach().reshape(-1).to(device)
        loss = torch.as_tensor(loss).detach().reshape(-1).to(device, torch.float32)
        if dist_util.active():
            # On the GPU: NCCL gathers there (no host round trip). CPU tensors: gloo (the default
            # group, or a gloo side group under NCCL).
            group = None if device.type == "cuda" else dist_util.cpu_group()
            w = dist.get_world_size()
            gathered = [torch.empty_like(t) for t in (index, loss) for _ in range(w)]
            dist.all_gather(gathered[:w], index, group=group)
            dist.all_gather(gathered[w:], loss, group=group)
            index, loss = torch.cat(gathered[:w]), torch.cat(gathered[w:])
        self.subset.update(index, loss)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the loader is: resuming from this replays exactly the remaining batches."""
        state = {"epoch": self.epoch, "batch": self._consumed, "seed": self.seed,
                 "subset": self.subset.state_dict(), "views": [asdict(v) for v in self._views]}
        # Views as plain dicts: the state loads with torch.load(weights_only=True) anywhere (Lightning
        # saves it in its own checkpoints) without allow-listing rela's classes.
        if self.subset.policy == "scored":
            state["order"] = torch.from_numpy(self._epoch_order(self.epoch).copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self._seed_given:  # a derived seed: the saved run's is the one to continue
            self._set_seed(state["seed"])
            self._seed_agreed = True
        if state["seed"] != self.seed:
            raise RelaError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self.subset.load_state_dict(state["subset"])
        self.epoch = int(state["epoch"])
        self._resume_batch = self._consumed = int(state["batch"])
        self._views = tuple(ViewSpec(**v) if isinstance(v, dict) else v for v in state["views"])
        self._views_version += 1
        self._order_cache = (self.epoch, state["order"].numpy()) if "order" in state else None

    # --- the seed ------------------------------------------------------------------------
    def _set_seed(self, seed: int) -> None:
        self.seed = self.subset.seed = self._rules.seed = int(seed)
        self._order_cache = None

    def _agree_on_seed(self) -> None:
        """A seed derived from each process's torch seed may differ between ranks (no
        seed_everything): then their shards would overlap. At the first pass inside a process group,
        every rank takes rank 0's (one broadcast, once)."""
        if self._seed_agreed or self._world_size is not None:
            return
        if dist_util.active():
            import torch.distributed as dist

            seed = torch.tensor([self.seed], dtype=torch.int64)
            dist.broadcast(seed, 0, group=dist_util.cpu_group())
            self._set_seed(int(seed))
            self._seed_agreed = True

    # --- iteration -----------------------------------------------------------------------
    def _current_views(self) -> tuple[tuple[ViewSpec, ...], int]:
        return self._views, self._views_version

    def __iter__(self) -> Iterator[dict]:
        self._agree_on_seed()
        epoch, start = self.epoch, self._resume_batch
        batches = self._rank_batches(epoch)
        self._resume_batch = 0
        self._consumed = start
        self.skipped, self._skipped_seen = [], set()
        keep_freed_memory()  # normalised batches are tens of MB: reuse freed heap, don't page-fault
        source = self._backend.batches(backends.Tasks(epoch, batches, start, self._current_views))
        try:
            yield from self._deliver(source, epoch, start)
        finally:
            source.close()  # threads stop, workers end, FFCV iterators close, even on break or error
        if self.skipped:
            warnings.warn(f"rela.Loader: {len(self.skipped)} undecodable samples were replaced this epoch "
                          f"(first: index {self.skipped[0][0]}, {self.skipped[0][1]}); see loader.skipped",
                          RelaWarning, stacklevel=2)
        self._consumed = 0
        if epoch == self.epoch:
            self.epoch += 1  # a finished pass moves on, so forgetting set_epoch still gives fresh subsets

    def _deliver(self, source: Iterator[dict], epoch: int, start: int) -> Iterator[dict]:
        try:
            yield from self._checked(source, epoch, start)
        except CorruptImageError as e:  # from any backend: say what this API offers
            raise e.with_remedy(SKIP_REMEDY) from None

    def _checked(self, source: Iterator[backends.Built], epoch: int, start: int) -> Iterator[dict]:
        for number, built in enumerate(source, start):
            if built.error is None and built.version != self._views_version:
                # Built before set_views: rebuild it with the current views, here, once.
                built = self._backend.build(backends.Task(epoch, number, built.drawn, self._views,
                                                          self._views_version))
            if built.error is not None:  # a worker's error, returned as a value (see Built.error)
                raise built.error
            for rec in built.skipped:  # each sample once per pass, always (index, source, reason)
                if rec[0] not in self._skipped_seen:
                    self._skipped_seen.add(rec[0])
                    self.skipped.append(tuple(rec))
            self._consumed = number + 1
            yield _formatted(self._to_device(built), self.batch_format)

    def close(self) -> None:
        """Release what the backend keeps between passes (FFCV's compiled loaders, DALI's pipelines)."""
        self._backend.close()

    def _to_device(self, built: backends.Built) -> dict:
        """Views to the device (non-blocking from pinned memory), the backend's device stage, then
        the memory format there (a GPU-side copy, off the host)."""
        nb, fmt = self.options.pin_memory, self.options.memory_format
        views = [v.to(self.device, non_blocking=nb) for v in built.views]
        views = self._backend.finish_on_device(built, views, self._views)
        batch = built.user_batch([v.contiguous(memory_format=fmt) for v in views])
        if self.device.type == "cpu":
            return batch
        for key in ("target", "label", "index"):
            if key in batch:
                batch[key] = batch[key].to(self.device, non_blocking=nb)
        return batch


def _formatted(batch: dict, batch_format: str):
    """The batch in the shape the user's loop unpacks (see BATCH_FORMATS)."""
    if batch_format == "dict":
        return batch
    views = tuple(batch["views"])
    if batch_format == "tuple":
        return views, batch["label"]
    return views, batch["label"], {k: batch[k] for k in ("index", "target") if k in batch}
