"""The backends `rela.Loader` runs its batches on, behind one small contract.

The loader keeps ordering, subsets, sharding, `set_views`, resume and error policy in one place
and hands a backend a stream of `Task`s (one per batch); the backend turns them into pixels:

- `torch`: rela's own decode (JPEG crop-while-decoding in `rela._C`) and the torchvision views
  (`augment`), in the loop's process, worker processes or worker threads,
- `dali`: an NVIDIA DALI pipeline (CPU, or mixed GPU decode with `device="cuda"`); rela draws
  every random number and feeds it in, so views are as deterministic as the torch backend's,
- `ffcv`: FFCV's `.beton` storage and JIT-compiled decoders, crops from FFCV's own RNG.

Every backend follows the same rules for a sample (`SampleRules`: the replacement walk for
`on_error="skip"`, the JPEG probe) and returns the same typed batch (`Built`); each finishes its
own batches on the device (`finish_on_device`), so the loader has no backend-specific branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from rela import choices, registry
from rela.data.datasets import RelaDataset, jpeg_header
from rela.data.store import TargetStore
from rela.errors import CorruptImageError, RelaError
from rela.loading.options import Options  # noqa: F401 (backends read it from here)
from rela.loading.views import ViewSpec, sample_generator

NAMES = choices.BACKENDS


@dataclass(frozen=True)
class Task:
    """One batch to build: sent to a worker, so it carries everything the worker needs."""

    epoch: int
    number: int
    indices: tuple[int, ...]
    views: tuple[ViewSpec, ...]
    version: int


class Tasks:
    """One pass's remaining batches, handed out lazily as `Task`s: a task reads the loader's
    views when it is taken, so tasks taken after `set_views` use the new ones."""

    def __init__(self, epoch: int, batches: list[np.ndarray], start: int,
                 views: Callable[[], tuple[tuple[ViewSpec, ...], int]]) -> None:
        self.epoch, self.batches, self.next, self._views = epoch, batches, start, views

    def __iter__(self) -> Iterator[Task]:
        return self

    def __next__(self) -> Task:
        if self.next >= len(self.batches):
            raise StopIteration
        views, version = self._views()
        task = Task(self.epoch, self.next, tuple(int(i) for i in self.batches[self.next]), views, version)
        self.next += 1
        return task

    def __len__(self) -> int:
        return len(self.batches) - self.next

    def planned(self, number: int) -> list[np.ndarray]:
        """The sample indices of batches `number`, `number + 1`, ... of this pass, for backends that
        must know the order ahead (FFCV reads a whole pass's order at once)."""
        return self.batches[number:]


@dataclass
class Built:
    """One batch as a backend hands it to the loader: what the user receives (`user_batch`:
    views, label, index, target) and the loader's bookkeeping. It crosses from worker processes
    (pickled; tensors by shared memory) and through torch's pin-memory thread (`pin_memory`)."""

    views: list[torch.Tensor]
    label: torch.Tensor | None
    index: torch.Tensor | None
    target: torch.Tensor | None = None
    version: int = 0  # the views' version it was built with: the loader rebuilds a stale one
    drawn: tuple[int, ...] = ()  # the indices drawn, before undecodable ones were replaced
    skipped: list = field(default_factory=list)  # (index, source, reason) of each replaced sample
    colour: list | None = None  # handoff "device-colour": each view's rows' colour choices
    leases: list = field(default_factory=list)  # worker processes: shared segments to free (shm_ring)
    # rela's errors travel as values, from worker processes and threads alike: raised in a worker,
    # torch would wrap them in its worker-traceback text; returned, the loader raises rela's own
    # one-line error. (Anything else — a bug — is raised where it happens, with its traceback.)
    error: RelaError | None = None

    @classmethod
    def failed(cls, error: RelaError, version: int) -> Built:
        return cls([], None, None, version=version, error=error)

    def pin_memory(self) -> Built:
        """torch's pin-memory thread calls this: the tensors the user gets, in page-locked memory."""
        if self.error is not None:
            return self
        pin = [v.pin_memory() for v in self.views]
        return replace(self, views=pin, label=self.label.pin_memory(), index=self.index.pin_memory(),
                       target=None if self.target is None else self.target.pin_memory())

    def user_batch(self, views: list[torch.Tensor]) -> dict:
        batch = {"views": views, "label": self.label, "index": self.index}
        if self.target is not None:
            batch["target"] = self.target
        return batch


class Backend(Protocol):
    """The contract: build batches from a stream of tasks, or one batch now; finish a batch on
    the device; release resources."""

    def batches(self, tasks: Tasks) -> Iterator[Built]:
        """One batch per task, in order; closing the iterator ends the pass's threads/workers."""

    def build(self, task: Task) -> Built:
        """One batch now, on the caller's thread, possibly while `batches` is still producing (the
        loader rebuilds a batch that was built ahead before `set_views`)."""

    def finish_on_device(self, built: Built, views: list[torch.Tensor],
                         specs: tuple[ViewSpec, ...]) -> list[torch.Tensor]:
        """The views once they are on the device: what this backend left for the device to do
        (the torch backend's uint8 / device-colour hand-offs), else the views as they are."""

    def close(self) -> None:
        """Release what outlives a pass (compiled loaders, pipelines)."""


def nothing_left(built: Built, views: list[torch.Tensor], specs: tuple[ViewSpec, ...]) -> list[torch.Tensor]:
    """`finish_on_device` of a backend whose views arrive finished (DALI, FFCV)."""
    return views


class SampleRules:
    """What every backend does the same way for a sample: which samples may stand for a drawn one
    (`candidates`, the walk `on_error="skip"` takes), decoding with that walk (`load`), which
    samples a JPEG decoder may read itself (`jpeg_file`), and the batch dict (`assemble`)."""

    def __init__(self, dataset: RelaDataset, targets: TargetStore | None, seed: int, on_error: str) -> None:
        self.dataset, self.targets, self.seed, self.on_error = dataset, targets, seed, on_error
        # Samples skipped at conversion: never drawn, and never used as a replacement either.
        self.skip = set(targets.skipped.tolist()) if targets is not None else set()

    def generator(self, task: Task, index: int, view: int) -> torch.Generator:
        """The random stream of one view of one drawn sample in the task's epoch."""
        return sample_generator(self.seed, task.epoch, index, view)

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

    def load(self, index: int, skipped: list) -> tuple[int, torch.Tensor]:
        """Decode `index` to uint8 C×H×W; with on_error='skip', walk forward to the next decodable
        sample, recording each one passed over in `skipped` as (index, source, reason)."""
        i, img = self.read(index, skipped, self.dataset.load)
        t = torch.from_numpy(img if img.flags.writeable else img.copy())  # strided views are fine
        return i, t.permute(2, 0, 1)

    def read(self, index: int, skipped: list, read: Callable[[int], object]) -> tuple[int, object]:
        """`read(i)` for the first of `candidates(index)` it succeeds on (the skip walk of `load`)."""
        for i in self.candidates(index):
            try:
                return i, read(i)
            except CorruptImageError as e:
                if self.on_error == "raise":
                    raise
                skipped.append((i, e.source, e.reason))
        raise AssertionError("unreachable: candidates() raises when it runs out")

    def jpeg_file(self, i: int) -> tuple[bytes | None, tuple[int, int] | None]:
        """Sample i's JPEG bytes and (width, height) when a fast decoder may take it: a readable
        .jpg whose header is sane and not too large. Anything else → (None, None): general path."""
        if i in self.skip:
            return None, None
        try:
            enc = self.dataset.encoded(i, (".jpg", ".jpeg"))
        except OSError:
            return None, None
        if enc is None:
            return None, None
        raw = enc[0]
        if raw[:2] != b"\xff\xd8":
            return None, None
        try:  # the decoder's own header read: the boxes are drawn in the size it will decode
            return raw, jpeg_header(raw)
        except ValueError:  # empty, over the limit, unreadable: the general path says why
            return None, None

    def assemble(self, task: Task, views: list[torch.Tensor], index: torch.Tensor, skipped: list,
                 labels: list[int] | None = None, colour: list | None = None) -> Built:
        """The batch every backend returns: views plus label, target and bookkeeping."""
        if labels is None:
            labels = [self.dataset.label(i) for i in index.tolist()]
        target = torch.from_numpy(self.targets[index.numpy()]) if self.targets is not None else None
        return Built(views, torch.tensor(labels, dtype=torch.int64), index, target, task.version, task.indices,
                     skipped, colour)


def available() -> dict[str, bool]:
    """Which registered backends can run here (without importing the heavy libraries)."""
    return {name: entry.available() for name, entry in registry.BACKENDS.items()}


def check(name: str) -> None:
    """Refuse a backend that does not exist or is not installed here, saying how to get it."""
    if name not in NAMES:
        raise RelaError(f"unknown backend {name!r}; choose one of {('auto', *NAMES)} or pass a Backend class")
    if not registry.BACKENDS[name].available():
        raise RelaError(f"backend {name!r} is not installed here: {registry.BACKENDS[name].install}")


def create(name: str | type[Backend], rules: SampleRules, options: Options) -> Backend:
    """The backend called `name` (its module is imported only now: DALI and FFCV are heavy), or
    `name` itself when it is a `Backend` class of your own."""
    if isinstance(name, type):
        return name(rules, options)
    check(name)
    return registry.BACKENDS[name].load()(rules, options)
