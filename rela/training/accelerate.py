"""The RELA accelerator (ReLA-F): a transfer head, the RELA loss and the phase control.

Usable from any training loop in a few lines:

    acc = Accelerator(backbone.feature_dim, store.dim, phase="fixed:0.5", loader=loader, ssl_views="byol")
    for epoch in range(epochs):
        acc.begin_epoch(epoch, epochs)                 # fixed:c switches here
        for batch in loader:
            feats = backbone(torch.cat(batch["views"])).view(len(batch["views"]), B, -1)
            loss = acc.lam * acc.loss(feats, batch["target"], batch["index"])
            if acc.lam < 1:
                loss = loss + (1 - acc.lam) * ssl_loss(...)
            ...
            acc.step()                                 # adaptive / blend update ρ and λ here

Phases (`phase=`):
- `fixed:c` — RELA for the first ⌊c·epochs⌋ epochs, then the SSL method alone (`fixed:1` = RELA only).
- `adaptive` — the reference rule: fast = 0.999·fast + 0.001·loss, slow = 0.99·slow + 0.01·fast
  (start 1.0 / 2.0), ρ = exp(−max(slow − fast, 0)); switch once ρ ≥ 0.995. Constants are arguments.
- `blend` — λ = 1 − ρ weights the RELA loss and 1 − λ = ρ the SSL loss, continuously, on the
  SSL method's views (the accelerator sets them on the loader when it is created).
- `off` — no RELA at all (the plain SSL baseline).

`acc.step()` advances the rule by one step from the last RELA loss (reading it on the host and,
under torch.distributed, averaging it over ranks: a sync and a collective per step). A loop that
keeps the device busy instead calls `acc.observe(losses)` every k steps with those steps'
rank-averaged RELA losses: the same recursion over the same values, so ρ is identical; adaptive
and blend then decide at those points (the switch lands on the first decision point at or after
the step where ρ crossed). `rela train` does this every `--log-every` steps.

λ (`acc.lam`) is the RELA loss weight: 1 in the RELA phase, 0 after the switch. At the switch the
accelerator calls `loader.set_views(ssl_views)`, which takes effect from the very next batch.
Unlike the reference code, the transfer head is trained (`freeze_transfer=True` reproduces the
reference's frozen random projection), and the whole phase state is in `state_dict()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rela.errors import RelaError
from rela.kernels.rela_loss import rela_loss


def parse_phase(phase: str) -> tuple[str, float]:
    """'fixed:0.3' → ('fixed', 0.3); 'adaptive' / 'blend' / 'off' → (name, nan)."""
    name, _, arg = phase.partition(":")
    if name == "fixed":
        try:
            c = float(arg)
        except ValueError:
            raise RelaError(f"phase 'fixed' needs a fraction of the epochs, e.g. fixed:0.5 (got {phase!r})") from None
        if not 0.0 <= c <= 1.0:
            raise RelaError(f"phase fixed:c needs 0 <= c <= 1, got {c}")
        return name, c
    if name in ("adaptive", "blend", "off") and not arg:
        return name, math.nan
    raise RelaError(f"unknown phase {phase!r}: use fixed:<fraction>, adaptive, blend or off")


class Accelerator(nn.Module):
    """Transfer head + RELA loss + phase state (see module doc)."""

    def __init__(self, feature_dim: int, target_dim: int, phase: str = "fixed:0.5", *,
                 freeze_transfer: bool = False, loader=None, ssl_views="byol",
                 fast_momentum: float = 0.999, slow_momentum: float = 0.99,
                 fast_init: float = 1.0, slow_init: float = 2.0, threshold: float = 0.995) -> None:
        super().__init__()
        self.mode, self.fraction = parse_phase(phase)
        self.phase = phase
        self.transfer = nn.Linear(feature_dim, target_dim)
        self.transfer.requires_grad_(not freeze_transfer)
        self.loader, self.ssl_views = loader, ssl_views
        self.fast_momentum, self.slow_momentum, self.threshold = fast_momentum, slow_momentum, threshold
        # The phase state: host floats (read every step without touching the device), mirrored
        # into buffers (state_dict, DDP's broadcast) whenever it changes.
        self._fast, self._slow, self._steps, self._switch_step = fast_init, slow_init, 0, -1
        self._weight = 0.0 if self.mode == "off" else 1.0
        for name in ("fast", "slow", "weight"):
            self.register_buffer(name, torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.int64))  # -1: not switched
        self.register_load_state_dict_post_hook(lambda module, _: module._read_buffers())
        if self.mode == "blend":
            self._weight = 1.0 - self.rho
            if loader is not None:
                loader.set_views(ssl_views)  # both losses every step, on the SSL method's views
        self._write_buffers()
        self.last_loss = torch.zeros(())  # the last mean RELA loss (a device tensor), for step()
        self._scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # (index, loss) not yet sent to the loader

    def _write_buffers(self) -> None:
        for name, value in (("fast", self._fast), ("slow", self._slow), ("weight", self._weight),
                            ("steps", self._steps), ("switch_step", self._switch_step)):
            getattr(self, name).fill_(value)  # a device fill from a host scalar: no sync

    def _read_buffers(self) -> None:
        self._fast, self._slow, self._weight = float(self.fast), float(self.slow), float(self.weight)
        self._steps, self._switch_step = int(self.steps), int(self.switch_step)

    # --- the phase --------------------------------------------------------------------------
    @property
    def rho(self) -> float:
        return math.exp(-max(self._slow - self._fast, 0.0))

    @property
    def lam(self) -> float:
        """Weight of the RELA loss this step (1 − λ goes to the SSL loss)."""
        return self._weight

    @property
    def switched(self) -> bool:
        return self._switch_step >= 0

    def _switch(self) -> None:
        self._weight, self._switch_step = 0.0, self._steps
        self._write_buffers()
        if self.loader is not None:
            self.loader.set_views(self.ssl_views)

    def begin_epoch(self, epoch: int, epochs: int) -> bool:
        """fixed:c switches at the start of epoch ⌊c·epochs⌋; returns True when it switched now."""
        if self.mode == "fixed" and not self.switched and self.lam > 0 and epoch >= math.floor(self.fraction * epochs):
            self._switch()
            return True
        return False

    def step(self, loss: float | torch.Tensor | None = None) -> bool:
        """After each optimizer step: update ρ from the RELA loss (averaged over ranks) and, for
        adaptive/blend, λ. Returns True on the step that switched."""
        value = torch.as_tensor(self.last_loss if loss is None else loss, dtype=torch.float64)
        from rela import distributed as dist_util

        if dist_util.active() and not (self.mode == "off" or self.switched):
            import torch.distributed as dist

            value = value.to(self.fast.device)  # NCCL reduces on the GPU
            dist.all_reduce(value)  # every rank takes the same decision at the same step
            value /= dist.get_world_size()
        return self.observe([float(value)])[0]

    def observe(self, losses: list[float]) -> tuple[bool, list[float]]:
        """Advance the rule over several steps' RELA losses (already averaged over ranks), then
        decide once. Returns (switched now, ρ after each of those steps)."""
        self.flush_scores()
        rhos = []
        for value in losses:
            self._steps += 1
            if not (self.mode == "off" or self.switched):  # ρ is tracked in every mode while RELA runs
                self._fast = self.fast_momentum * self._fast + (1 - self.fast_momentum) * value
                self._slow = self.slow_momentum * self._slow + (1 - self.slow_momentum) * self._fast
            rhos.append(self.rho)
        switched = False
        if self.mode == "blend":
            self._weight = 1.0 - self.rho
        elif self.mode == "adaptive" and not self.switched and self.rho >= self.threshold:
            switched = True
            self._switch()
        self._write_buffers()
        return switched, rhos

    def flush_scores(self) -> None:
        """Hand the per-sample RELA losses gathered since the last call to the loader's scores
        (one transfer, and under DDP one all-gather, per call instead of per step)."""
        if self._scores:
            index, loss = (torch.cat(t) for t in zip(*self._scores, strict=True))
            self._scores = []
            self.loader.update_scores(index, loss)

    # --- the loss ---------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Mean RELA loss of `features` [V, B, F] (or [B, F]) against store targets [B, d].

        Per-sample losses (averaged over views) go back to the loader's scores when it samples
        by score; the mean is remembered for `step()`."""
        pred = self.transfer(features)
        per = rela_loss(pred, target.to(pred.device), reduction="none")
        per = per.mean(0) if per.dim() == 2 else per
        if index is not None and self.loader is not None and self.loader.subset.policy == "scored":
            self._scores.append((index.detach(), per.detach()))  # scores matter from the next epoch's draw
        mean = per.mean()
        self.last_loss = mean.detach()
        return mean

    def extra_repr(self) -> str:
        return f"phase={self.phase}, lam={self.lam:.3f}, rho={self.rho:.4f}, steps={self._steps}"
