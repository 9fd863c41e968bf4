"""The dynamic subset: which samples an epoch visits, in which order, on which rank.

A budget ratio r means every epoch visits a fresh ⌊r·N⌋ of the N usable samples (samples skipped
at conversion are never drawn), for the same number of epochs: r of the optimizer steps.

- `uniform` (the paper's policy): a uniformly random subset, drawn per epoch.
- `scored`: drawn without replacement with probability ∝ a weight computed from each sample's
  loss history (an EMA fed back by the training loop), so samples the model still gets wrong are
  visited more often; see `rela.kernels.scoring` for the update and the weights.

Everything is a pure function of (seed, epoch[, scores at the epoch's start]): no global
`random`/numpy/torch state is read or changed, so every rank computes the same order and a
resumed run continues the same sequence. Ranks then take disjoint, equally long slices, so DDP
never waits on a rank with one batch more.
"""

from __future__ import annotations

import numpy as np
import torch

from rela import _ext, choices
from rela.errors import RelaError
from rela.kernels.scoring import loss_scale, scores_to_weights, update_scores

POLICIES = choices.POLICIES


def stream_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for (seed, epoch, purpose[, ...]), from numpy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), *map(int, keys)]).generate_state(1, np.uint64)[0])


class Subset:
    """Per-epoch sample order for a budget `ratio` under a `policy`, identical on every rank."""

    def __init__(
        self,
        n: int,
        ratio: float = 1.0,
        policy: str = "uniform",
        *,
        seed: int = 0,
        valid: np.ndarray | None = None,
        momentum: float = 0.9,
        temperature: float = 1.0,
        floor: float = 0.05,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise RelaError(f"budget ratio must be in (0, 1], got {ratio}")
        if policy not in POLICIES:
            raise RelaError(f"unknown subset policy {policy!r}; use one of {POLICIES}")
        self.n, self.ratio, self.policy, self.seed = n, float(ratio), policy, int(seed)
        self.valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool).copy()
        if self.valid.shape != (n,):
            raise RelaError(f"valid mask has shape {self.valid.shape}, expected ({n},)")
        self.valid_index = np.flatnonzero(self.valid).astype(np.int64)
        self.size = int(np.floor(self.ratio * len(self.valid_index)))
        if self.size == 0:
            raise RelaError(f"a {ratio} budget of {len(self.valid_index)} usable samples draws nothing")
        self.momentum, self.temperature, self.floor = momentum, temperature, floor
        self.score = torch.zeros(n, dtype=torch.float32)
        self.seen = torch.zeros(n, dtype=torch.int8)

    def epoch_indices(self, epoch: int, shuffle: bool = True) -> np.ndarray:
        """The epoch's samples in visiting order (the same on every rank)."""
        if self.policy == "scored":
            w = self.weights().cpu().numpy()  # the table may live on the GPU: one copy per epoch
            chosen = _ext.weighted_subset(w, self.size, stream_seed(self.seed, epoch, 1))  # sorted
        elif self.size == len(self.valid_index):
            chosen = self.valid_index
        else:
            pick = _ext.uniform_subset(len(self.valid_index), self.size, stream_seed(self.seed, epoch, 1))
            chosen = np.sort(self.valid_index[pick])
        if not shuffle:
            return chosen
        return chosen[_ext.permutation(len(chosen), stream_seed(self.seed, epoch, 2))]

    def to(self, device: str | torch.device) -> Subset:
        """Keep the score table on `device` (the training GPU): `update` then runs there, in
        place (the Triton kernel on CUDA), and only the weights come to the host, once per epoch."""
        self.score, self.seen = self.score.to(device), self.seen.to(device)
        self._valid_t = None
        return self

    def weights(self) -> torch.Tensor:
        """Current sampling weights (0 for samples that must never be drawn)."""
        if getattr(self, "_valid_t", None) is None:
            self._valid_t = torch.from_numpy(self.valid).to(self.score.device)
        return scores_to_weights(self.score, self.seen, self._valid_t,
                                 temperature=self.temperature, floor=self.floor)

    def loss_scale(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Multipliers for the losses of `index` that keep scored-subset training unbiased."""
        if self.policy != "scored":
            return torch.ones(len(index))
        return loss_scale(self.weights(), self.size)[torch.as_tensor(index, device=self.score.device)]

    def update(self, index: torch.Tensor | np.ndarray, loss: torch.Tensor | np.ndarray) -> None:
        """Fold per-sample losses into the score table (EMA; used by the `scored` policy), on the
        table's device."""
        device = self.score.device
        update_scores(self.score, self.seen, torch.as_tensor(index).to(device),
                      torch.as_tensor(loss).to(device, torch.float32), self.momentum)

    def state_dict(self) -> dict:
        return {"n": self.n, "ratio": self.ratio, "policy": self.policy, "seed": self.seed,
                "score": self.score.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "ratio", "policy", "seed"):
            if state[key] != getattr(self, key):
                raise RelaError(f"subset state was saved with {key}={state[key]!r}, this subset has "
                                f"{getattr(self, key)!r}; resume with the original settings")
        self.score.copy_(state["score"])
        self.seen.copy_(state["seen"])
