"""How an epoch's order becomes this rank's batches, and how many there are: one owner of both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rela.errors import RelaError


@dataclass(frozen=True)
class Batching:
    """`batch_size` and `drop_last`, and what follows from them: each rank's disjoint, equally long
    share of an epoch's order (`shard`), its batches (`batches`) and their count (`count`, what
    `len(loader)` answers), computed in one place so they cannot disagree."""

    batch_size: int
    drop_last: bool = True

    def shard(self, order: np.ndarray, rank: int, world: int) -> np.ndarray:
        """This rank's share of the order, equally long on every rank: the order is cut to a
        multiple of `world` (and of `world · batch_size` with drop_last), so every rank runs the
        same number of batches; the few samples cut are the order's last ones, which differ every
        epoch."""
        if not 0 <= rank < world:
            raise RelaError(f"rank {rank} out of range for world size {world}")
        return order[rank::world][:self._per_rank(len(order), world)]

    def batches(self, order: np.ndarray, rank: int, world: int) -> list[np.ndarray]:
        mine = self.shard(order, rank, world)
        return [mine[s:s + self.batch_size] for s in range(0, len(mine), self.batch_size)]

    def count(self, size: int, world: int) -> int:
        """Batches per rank in an epoch of `size` samples."""
        return -(-self._per_rank(size, world) // self.batch_size)

    def _per_rank(self, size: int, world: int) -> int:
        per_rank = size // world
        return per_rank // self.batch_size * self.batch_size if self.drop_last else per_rank
