"""Batch buffers reused in the loop's own process (thread workers, or no workers at all).

A float32 batch of 64 224-px images is 38 MB. Allocated afresh per batch, its pages kept being
faulted in and zeroed by the kernel before the decoder overwrote them: `clear_page` was 4-5% of
a thread pass's CPU (`perf`, bench/loader.py's plain crops), and is gone from the profile with
the pool. So the pool keeps up to `slots` buffers per (shape, dtype) and lends one per batch
tensor. The user gets a tensor of its own storage over the buffer (no copy); when nothing uses
that storage any more (a finaliser on it, as `shm_ring.claim` does for worker processes) the
buffer goes back to the pool. A batch stays valid as long as the user
holds it; when every buffer is lent out, `take` allocates a new one: it never waits. Each loader's
builder has a pool of its own, emptied when a pass ends (the loader keeps no memory between
passes: the next one faults its first few batches' pages in again).
"""

from __future__ import annotations

import threading
import weakref

import torch


class BatchPool:
    """Free buffers per (shape, dtype), at most `slots` of each kept."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        # Reentrant: a garbage collection while `take` holds it can run a finaliser, and so
        # `_give_back`, on the same thread.
        self.lock = threading.RLock()
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` whose buffer returns here once nothing uses it."""
        key = (tuple(shape), dtype)
        with self.lock:
            free = self.free.setdefault(key, [])
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty(key[0], dtype=dtype)  # 64-byte aligned: the decoder's whole-line stores
        lent = torch.from_numpy(buffer.numpy())  # a storage of its own over the buffer's memory
        weakref.finalize(lent.untyped_storage(), self._give_back, key, buffer).atexit = False
        return lent

    def _give_back(self, key: tuple, buffer: torch.Tensor) -> None:
        with self.lock:
            free = self.free.setdefault(key, [])
            if len(free) < self.slots:
                free.append(buffer)

    def clear(self) -> None:
        """Drop the free buffers (those still lent come back as they are dropped)."""
        with self.lock:
            self.free.clear()

    def __getstate__(self) -> dict:  # a copy in a spawned worker process starts empty
        return {"slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["slots"])
