"""Shared-memory batch buffers that a worker process reuses, instead of a new segment per batch.

A worker process hands each batch to the loop through shared memory. A new segment per batch
cost ~30 ms per 64 float32 224-px images here (creating it, then a page fault per 4 KB page on
the first write): 36% of a worker-process pass's CPU was the workers' kernel time (`perf`,
bench/loader.py's plain crops). Instead each worker keeps `slots` segments per batch shape
(`Ring`) and leases one per batch tensor. The batch goes to the user as it is (no copy); the
loop frees the lease when the last tensor using that memory is gone (`claim`: a finaliser on
the tensor's storage), in a flag array both processes map. Batches stay valid as long as the
user holds them; a worker that finds every slot leased (the loop fell behind, or the user keeps
batches) takes a new segment, as before: it never waits.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

_FREE, _LEASED = 0, 1


class Ring:
    """One worker process's segments, `slots` per (shape, dtype), and its leases not yet sent."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.buffers: dict[tuple, tuple[torch.Tensor, list]] = {}
        self.taken: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (flags, slot, tensor)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A shared tensor for one batch: a free slot (leased until the loop frees it), else new."""
        key = (tuple(shape), dtype)
        if key not in self.buffers:
            self.buffers[key] = (torch.zeros(self.slots, dtype=torch.int32).share_memory_(), [None] * self.slots)
        flags, tensors = self.buffers[key]
        free = (flags == _FREE).nonzero()
        if not len(free):
            return torch.empty(shape, dtype=dtype).share_memory_()
        k = int(free[0])
        if tensors[k] is None:
            tensors[k] = torch.empty(shape, dtype=dtype).share_memory_()
        flags[k] = _LEASED
        self.taken.append((flags, k, tensors[k]))
        return tensors[k]

    def handed(self, built) -> list[tuple[int, torch.Tensor, int]]:
        """The leases of `built`'s views as (view, flags, slot); buffers leased while building it
        that it does not hand over (a uint8 stage before normalising) are free again now."""
        ptrs = {v.untyped_storage().data_ptr(): i for i, v in enumerate(built.views)}
        out = []
        for flags, k, tensor in self.taken:
            view = ptrs.get(tensor.untyped_storage().data_ptr())
            if view is None:
                flags[k] = _FREE
            else:
                out.append((view, flags, k))
        self.taken = []
        return out


_ring: Ring | None = None


def take(shape, dtype: torch.dtype, slots: int) -> torch.Tensor:
    """A batch tensor in this worker process's ring (created on first use)."""
    global _ring
    if _ring is None:
        _ring = Ring(slots)
    return _ring.take(shape, dtype)


def attach(built):
    """`built` with the leases its views hold (in a worker process; unchanged elsewhere)."""
    if _ring is None or not _ring.taken:
        return built
    return replace(built, leases=_ring.handed(built))


def _free(flags: torch.Tensor, k: int) -> None:
    flags[k] = _FREE


def claim(built):
    """The loop's side: each leased view's slot is freed once nothing uses its memory any more
    (at once if torch's pin-memory thread already copied the views into page-locked memory)."""
    if not built.leases:
        return built
    for view, flags, k in built.leases:
        v = built.views[view]
        if v.is_pinned():
            flags[k] = _FREE
        else:
            weakref.finalize(v.untyped_storage(), _free, flags, k).atexit = False
    return replace(built, leases=[])
