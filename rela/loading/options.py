"""How `rela.Loader` runs: one frozen object, built once by keyword and checked where it is built.

Every setting a backend reads lives here, and so does every check on it: a bad count, time or
choice is refused in one line when the object is made (a negative thread count once waited
forever), never as a hang or a traceback from deep inside a backend.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from rela import choices
from rela.errors import RelaError, RelaWarning
from rela.loading.batching import Batching

# worker_type=: "auto" (threads when every per-sample step is rela's own code, processes when the
# user's Python runs per sample: rela.Loader resolves it), "thread" or "process"
WORKER_TYPES = ("auto", "thread", "process")
MAX_WORKERS = 256  # as rela train's and rela convert's --workers


def check_count(name: str, value, low: int, high: int | None = None, optional: bool = False) -> None:
    """An integer argument (not a bool, not a float) in [low, high]; None passes when optional."""
    if value is None and optional:
        return
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RelaError(f"{name} must be an integer {allowed}{' or None' if optional else ''}, got {value!r}")


def check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RelaError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


@dataclass(frozen=True)
class Options:
    """How the loader asks a backend to run: built once, by keyword, when the loader is made, and
    read from here (the loader's `batch_size`, `num_workers`, `worker_type`, ... are this object's).
    `worker_type="auto"` and `num_workers=None` are the loader's to resolve (`resolved`)."""

    batch_size: int
    drop_last: bool = True
    num_workers: int | None = 0
    worker_type: str = "process"  # torch backend: "process" or "thread" (WORKER_TYPES)
    prefetch_factor: int | None = 2
    pin_memory: bool = False
    timeout: float = 0
    device: torch.device = torch.device("cpu")
    handoff: str = "float32"  # torch backend: what crosses to the device (choices.HANDOFFS)
    memory_format: torch.memory_format = torch.contiguous_format  # how the loader hands views over
    scaled_decode: bool = True  # rela's JPEG decoder: 1/2 or 1/4 DCT scale where every view still fits

    def __post_init__(self) -> None:
        check_count("batch_size", self.batch_size, 1)
        check_count("num_workers", self.num_workers, 0, MAX_WORKERS, optional=True)
        check_count("prefetch_factor", self.prefetch_factor, 1, optional=True)
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (0 <= timeout < math.inf):
            raise RelaError(f"timeout must be a number of seconds >= 0 (0: wait forever), got {timeout!r}")
        check_choice("worker_type", self.worker_type, WORKER_TYPES)
        check_choice("handoff", self.handoff, choices.HANDOFFS)
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "scaled_decode", bool(self.scaled_decode))

    def resolved(self, worker_type: str, num_workers: int) -> Options:
        """These options with `auto` and `None` decided (by the loader, which knows the dataset):
        the prefetch depth only where there are workers, pinning only towards a GPU."""
        if num_workers > 4 * (os.cpu_count() or 1):
            warnings.warn(f"rela.Loader: num_workers={num_workers} on {os.cpu_count()} cores: each worker holds "
                          "batches in memory, and more than a few per core only adds switching",
                          RelaWarning, stacklevel=4)
        return replace(self, num_workers=num_workers, worker_type=worker_type,
                       prefetch_factor=self.prefetch_factor if num_workers > 0 else None,
                       pin_memory=self.pin_memory and self.device.type == "cuda")

    @property
    def batching(self) -> Batching:
        """How an epoch's order becomes a rank's batches, and how many (`len(loader)`)."""
        return Batching(self.batch_size, self.drop_last)

    @property
    def decode_threads(self) -> int:
        """C++ threads that split one batch, for a backend that builds one batch at a time in its
        feeder thread (the DALI and FFCV fallbacks): the workers' share when they are threads.
        The torch backend's thread workers each build whole batches instead (one C++ thread each)."""
        return max(1, self.num_workers or 0) if self.worker_type == "thread" else 1

    @property
    def depth(self) -> int:
        """Batches a feeder thread builds ahead (per thread, for thread workers)."""
        return max(2, self.prefetch_factor or 2)
