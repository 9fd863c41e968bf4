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
        self.register_buffer("fast", torch.tensor(fast_init, dtype=torch.float64))
        self.register_buffer("slow", torch.tensor(slow_init, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.int64))  # -1: not switched
        self.register_buffer("weight", torch.tensor(0.0 if self.mode == "off" else 1.0, dtype=torch.float64))
        if self.mode == "blend":
            self.weight.fill_(1.0 - self.rho)
            if loader is not None:
                loader.set_views(ssl_views)  # both losses every step, on the SSL method's views
        self.last_loss = 0.0  # the last mean RELA loss, for step() and the logs

    # --- the phase --------------------------------------------------------------------------
    @property
    def rho(self) -> float:
        return math.exp(-max(float(self.slow) - float(self.fast), 0.0))

    @property
    def lam(self) -> float:
        """Weight of the RELA loss this step (1 − λ goes to the SSL loss)."""
        return float(self.weight)

    @property
    def switched(self) -> bool:
        return int(self.switch_step) >= 0

    def _switch(self) -> None:
        self.weight.fill_(0.0)
        self.switch_step.fill_(int(self.steps))
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
        self.steps += 1
        if loss is None:
            loss = self.last_loss
        if self.mode == "off" or self.switched:
            return False  # ρ is tracked in every mode while RELA runs (logged); only adaptive acts on it
        value = torch.as_tensor(float(loss), dtype=torch.float64, device=self.fast.device)  # NCCL: on the GPU
        from rela import distributed as dist_util

        if dist_util.active():
            import torch.distributed as dist

            dist.all_reduce(value)  # every rank takes the same decision at the same step
            value /= dist.get_world_size()
        self.fast.mul_(self.fast_momentum).add_((1 - self.fast_momentum) * value)
        self.slow.mul_(self.slow_momentum).add_((1 - self.slow_momentum) * self.fast)
        if self.mode == "blend":
            self.weight.fill_(1.0 - self.rho)
            return False
        if self.mode == "adaptive" and self.rho >= self.threshold:
            self._switch()
            return True
        return False

    # --- the loss ---------------------------------------------------------------------------
    def loss(self, features: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Mean RELA loss of `features` [V, B, F] (or [B, F]) against store targets [B, d].

        Per-sample losses (averaged over views) go back to the loader's scores when it samples
        by score; the mean is remembered for `step()`."""
        pred = self.transfer(features)
        per = rela_loss(pred, target.to(pred.device), reduction="none")
        per = per.mean(0) if per.dim() == 2 else per
        if index is not None and self.loader is not None and self.loader.subset.policy == "scored":
            self.loader.update_scores(index, per.detach())
        mean = per.mean()
        self.last_loss = float(mean.detach())
        return mean

    def extra_repr(self) -> str:
        return f"phase={self.phase}, lam={self.lam:.3f}, rho={self.rho:.4f}, steps={int(self.steps)}"
