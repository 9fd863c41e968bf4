"""The RELA accelerator (ReLA-F): a transfer head, the RELA loss and the phase control.

Usable from any training loop in a few lines:

    acc = Accelerator(backbone.feature_dim, store.dim, phase="fixed:0.5", loader=loader, ssl_views="byol",
                      total_steps=epochs * len(loader))
    step = 0
    for epoch in range(epochs):
        acc.begin_epoch(epoch, epochs, step)           # fixed:c switches here
        for batch in loader:
            lam = acc.lam_at(step)                     # 1, then falling over the hand-over, then the floor
            feats = backbone(torch.cat(batch["views"])).view(len(batch["views"]), B, -1)
            loss = lam * acc.loss(feats, batch["target"], batch["index"]) if lam > 0 else 0
            if lam < 1:
                loss = loss + (1 - lam) * ssl_loss(...)
            ...
            acc.step()                                 # adaptive / blend update ρ and λ here
            step += 1

Phases (`phase=`):
- `fixed:c` — RELA for the first ⌊c·epochs⌋ epochs, then the SSL method (`fixed:1` = RELA only).
- `adaptive` — switch once the RELA loss stops falling: fast = m_f·fast + (1 − m_f)·loss,
  slow = m_s·slow + (1 − m_s)·fast, ρ = exp(−max(slow − fast, 0) / scale); switch once ρ ≥ 0.995,
  but never before `window[0]` and at the latest at `window[1]` of the run's steps (1: no forced switch).
  `rule="scaled"` (the default) starts fast and slow at the first observed loss, measures the gap
  relative to it (scale = that loss) and gives the EMAs the time constants the reference's
  0.999 / 0.99 have at its run length (1000 and 100 of 39k steps: 2.6% and 0.26% of the run; at
  least 10 and 3 steps, fewer cannot tell a plateau from batch noise), so
  the rule reads the loss's shape whatever its scale and the run's length. `rule="reference"` is
  the reference code's: starts 1.0 / 2.0, momenta 0.999 / 0.99, scale 1 — it cannot fire before
  step 528, and on a flat loss of 0.1–0.4 needs 2,600–3,000 steps.
- `blend` — λ = 1 − ρ weights the RELA loss and 1 − λ = ρ the SSL loss, continuously, on the
  SSL method's views (the accelerator sets them on the loader when it is created); λ = 1 before
  `window[0]`, and from `window[1]` on the hand-over below, from blend's last λ.
- `off` — no RELA at all (the plain SSL baseline).

The hand-over (`handover=h`, a fraction of the run's steps; default 0.1): from the switch on λ
falls linearly over W = round(h·total) steps instead of at once, so the loss moves towards the
method's while the method's heads catch up (`lam_at(step)`); h = 0 (or W = 1) is a hard switch.
`floor=f` (default 0.5) is where it falls to and stays: a residual RELA term, the method then
training beside RELA, L = f·L_rela + (1 − f)·L_ssl; `floor=0` hands over to the method alone.
The defaults are the best of the candidates measured in bench/table1.py --parts handover (README).

`acc.step()` advances the rule by one step from the last RELA loss (reading it on the host and,
under torch.distributed, averaging it over ranks: a sync and a collective per step). A loop that
keeps the device busy instead calls `acc.observe(losses)` every k steps with those steps'
rank-averaged RELA losses: the same recursion over the same values, so ρ is identical; adaptive
and blend then decide at those points (the switch lands on the first decision point at or after
the step where ρ crossed). `rela train` does this every `--log-every` steps.

λ (`acc.lam_at(step)`; `acc.lam` at the last observed step) is the RELA loss weight: 1 in the RELA
phase, the floor once handed over. At the switch the accelerator calls `loader.set_views(ssl_views)`,
which takes effect from the very next batch. The window and the scaled rule need the run's
length: `total_steps=` or `acc.plan(total_steps)` (without it: no window, the given momenta).
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
                 fast_init: float = 1.0, slow_init: float = 2.0, threshold: float = 0.995,
                 rule: str = "scaled", window: tuple[float, float] = (0.2, 0.6), handover: float = 0.1,
                 floor: float = 0.5, total_steps: int | None = None) -> None:
        super().__init__()
        self.mode, self.fraction = parse_phase(phase)
        self.phase = phase
        if rule not in ("scaled", "reference"):
            raise RelaError(f"switch rule must be 'scaled' or 'reference', not {rule!r}")
        if not 0 <= window[0] <= window[1] <= 1:
            raise RelaError(f"switch window needs 0 <= min <= max <= 1, got {window[0]}:{window[1]}")
        if not 0 <= handover <= 1:
            raise RelaError(f"handover is a fraction of the run's steps in [0, 1], got {handover}")
        if not 0 <= floor < 1:
            raise RelaError(f"the RELA weight's floor after the hand-over must be in [0, 1), got {floor}")
        self.rule, self.window, self.handover, self.floor = rule, tuple(window), handover, floor
        self.transfer = nn.Linear(feature_dim, target_dim)
        self.transfer.requires_grad_(not freeze_transfer)
        self.loader, self.ssl_views = loader, ssl_views
        self.fast_momentum, self.slow_momentum, self.threshold = fast_momentum, slow_momentum, threshold
        self.total_steps: int | None = None
        # The phase state: host floats (read every step without touching the device), mirrored
        # into buffers (state_dict, DDP's broadcast) whenever it changes. `start` is the first
        # observed loss (the scaled rule's origin and scale; NaN until then).
        self._fast, self._slow, self._steps, self._switch_step = fast_init, slow_init, 0, -1
        self._start, self._switch_weight = math.nan, 1.0
        self._weight = 0.0 if self.mode == "off" else 1.0
        for name in ("fast", "slow", "weight", "start", "switch_weight"):
            self.register_buffer(name, torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.int64))  # -1: not switched
        self.register_load_state_dict_pre_hook(_fill_missing_start)
        self.register_load_state_dict_post_hook(lambda module, _: module._read_buffers())
        if self.mode == "blend":
            self._weight = 1.0 - self.rho if self.window[0] == 0 else 1.0
            if loader is not None:
                loader.set_views(ssl_views)  # both losses every step, on the SSL method's views
        if total_steps is not None:
            self.plan(total_steps)
        self._write_buffers()
        self.last_loss = torch.zeros(())  # the last mean RELA loss (a device tensor), for step()
        self._scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # (index, loss) not yet sent to the loader

    def plan(self, total_steps: int) -> None:
        """The run's length in optimizer steps: the switch window's bounds and, under the scaled
        rule, the EMAs' momenta (time constants 2.6% and 0.26% of the run, at least 10 and 3 steps)."""
        self.total_steps = int(total_steps)
        if self.rule == "scaled":  # at least 10 and 3 steps: fewer cannot tell a plateau from batch noise
            self.fast_momentum = 1.0 - 1.0 / max(10.0, 0.026 * total_steps)
            self.slow_momentum = 1.0 - 1.0 / max(3.0, 0.0026 * total_steps)

    def _write_buffers(self) -> None:
        for name, value in (("fast", self._fast), ("slow", self._slow), ("weight", self._weight),
                            ("start", self._start), ("switch_weight", self._switch_weight), ("steps", self._steps),
                            ("switch_step", self._switch_step)):
            getattr(self, name).fill_(value)  # a device fill from a host scalar: no sync

    def _read_buffers(self) -> None:
        self._fast, self._slow, self._weight = float(self.fast), float(self.slow), float(self.weight)
        self._start, self._switch_weight = float(self.start), float(self.switch_weight)
        self._steps, self._switch_step = int(self.steps), int(self.switch_step)

    # --- the phase --------------------------------------------------------------------------
    @property
    def rho(self) -> float:
        scale = self._start if self.rule == "scaled" and self._start > 0 else 1.0
        return math.exp(-max(self._slow - self._fast, 0.0) / scale)

    @property
    def lam(self) -> float:
        """Weight of the RELA loss at the last observed step (1 − λ goes to the SSL loss)."""
        return self.lam_at(self._steps)

    def lam_at(self, step: int) -> float:
        """Weight of the RELA loss at optimizer step `step`: over the hand-over window's W steps it
        falls linearly from its value before the switch (1; blend's 1 − ρ), by 1 − k/W at the k-th
        step from the switch on (k = 1 at the switch step, so the method trains from there; W = 1
        is the hard switch)."""
        if not self.switched:
            return self._weight
        end = min(self.floor, self._switch_weight)  # a residual RELA term stays at `floor`
        if self.handover <= 0 or self.total_steps is None:
            return end
        left = 1.0 - (step - self._switch_step + 1) / self.handover_steps  # the window's share still to go
        return end + (self._switch_weight - end) * min(1.0, max(0.0, left))

    @property
    def handover_steps(self) -> int:
        """W, the hand-over window in steps (1: a hard switch; needs the run's length)."""
        return max(1, round(self.handover * (self.total_steps or 0)))

    @property
    def switched(self) -> bool:
        return self._switch_step >= 0

    @property
    def switched_at(self) -> int:
        """The optimizer step of the switch (−1 before it)."""
        return self._switch_step

    def _window_step(self, k: int) -> float:
        """The step the window opens (k=0) or closes (k=1); without the run's length, no window."""
        if self.total_steps is None:
            return 0.0 if k == 0 else math.inf
        return self.window[k] * self.total_steps

    def _switch(self, step: int | None = None) -> None:
        self._switch_weight = self._weight  # where the hand-over starts from
        self._weight, self._switch_step = 0.0, self._steps if step is None else step
        self._write_buffers()
        if self.loader is not None:
            self.loader.set_views(self.ssl_views)

    def begin_epoch(self, epoch: int, epochs: int, step: int | None = None) -> bool:
        """fixed:c switches at the start of epoch ⌊c·epochs⌋ (at optimizer step `step`, when the
        loop knows it); returns True when it switched now."""
        if (self.mode == "fixed" and not self.switched and self._weight > 0
                and epoch >= math.floor(self.fraction * epochs)):
            self._switch(step)
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
        """Advance the rule over several steps' RELA losses (already averaged over ranks; NaN for a
        step without one, after the hand-over), then decide once. Returns (switched now, ρ after
        each of those steps)."""
        self.flush_scores()
        rhos = []
        for value in losses:
            self._steps += 1
            if not (self.mode == "off" or self.switched or math.isnan(value)):  # ρ: while RELA runs
                if self.rule == "scaled" and math.isnan(self._start):  # normalised starts: the first loss
                    self._start = self._fast = self._slow = value
                self._fast = self.fast_momentum * self._fast + (1 - self.fast_momentum) * value
                self._slow = self.slow_momentum * self._slow + (1 - self.slow_momentum) * self._fast
            rhos.append(self.rho)
        switched = False
        if self.mode in ("adaptive", "blend") and not self.switched:
            # a window ending at 1 forces nothing: a switch at the last step would hand over nothing
            opened = self._steps >= self._window_step(0)
            due = self.window[1] < 1 and self._steps >= self._window_step(1)
            if self.mode == "blend":
                self._weight = 1.0 - self.rho if opened else 1.0
            if due or (self.mode == "adaptive" and opened and self.rho >= self.threshold):
                switched = True  # blend at the window's end: the SSL method alone from here
                self._switch()
        self._write_buffers()
        return switched, rhos

    def why(self) -> str:
        """Why the switch came when it did (for switch.json)."""
        if self.mode == "fixed":
            return f"fixed:{self.fraction:g}: the start of epoch floor({self.fraction:g} x epochs)"
        if self.total_steps is not None and self._switch_step >= self._window_step(1):
            return (f"the window's end ({self.window[1]:g} of {self.total_steps} steps) came before rho reached "
                    f"{self.threshold:g} (rho {self.rho:.4f})")
        return f"rho {self.rho:.4f} >= {self.threshold:g}: the RELA loss stopped falling ({self.rule} rule)"

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


def _fill_missing_start(module, state_dict, prefix, *_) -> None:
    """Checkpoints from before the scaled rule and the hand-over have no `start` (NaN: set from the
    next loss) and no `switch_weight` (1)."""
    state_dict.setdefault(prefix + "start", torch.tensor(math.nan, dtype=torch.float64))
    state_dict.setdefault(prefix + "switch_weight", torch.tensor(1.0, dtype=torch.float64))
