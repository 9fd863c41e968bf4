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
- `adaptive` — switch once the RELA loss stops paying, by `rule=`:
  `"evidence"` (the default) fits a least-squares line to the RELA loss of the last W steps
  (W = `evidence_steps`, 100, or a fifth of the run, whichever is more), projects it over the
  steps left (at least W) and switches once even the fall's upper bound (slope + 2 standard
  errors) would take the loss down by less than `min_gain` (5%) of its level. A steady fall,
  however slow per step, keeps RELA while it would still pay over what is left; batch noise
  widens the bound and makes the rule wait; a run with fewer than W RELA steps never switches.
  The window's lower edge still holds (never before `window[0]`); the default window ends at 1:
  no forced switch. Why not a direct probe (held-out RELA loss or kNN agreement): each costs
  forward passes the training loss already gives on fresh samples (every epoch draws a new
  subset), and it answers the same question — is RELA still moving the representation.
  `"scaled"` (the earlier default) fires on ρ: fast = m_f·fast + (1 − m_f)·loss,
  slow = m_s·slow + (1 − m_s)·fast, ρ = exp(−max(slow − fast, 0) / scale), switch once ρ ≥
  0.995, EMAs started at the first loss with time constants 2.6% and 0.26% of the run (at least
  10 and 3 steps). On short runs that read a slow, steady fall (1.0 → 0.95 over 30 steps) as a
  plateau and fired at the window's edge, 7–16 points under RELA alone on held-out data.
  `rule="reference"` is the reference code's: starts 1.0 / 2.0, momenta 0.999 / 0.99, scale 1
  — it cannot fire before step 528, and on a flat loss of 0.1–0.4 needs 2,600–3,000 steps.
  ρ is computed (and logged) under every rule.
- `blend` — λ = 1 − ρ weights the RELA loss and 1 − λ = ρ the SSL loss, continuously, on the
  SSL method's views (the accelerator sets them on the loader when it is created); λ = 1 before
  `window[0]`, and from `window[1]` on the hand-over below, from blend's last λ.
- `off` — no RELA at all (the plain SSL baseline).

The hand-over (`handover=h`, a fraction of the run's steps; default 0.1): from the switch on λ
falls linearly over W = round(h·total) steps instead of at once, so the loss moves towards the
method's while the method's heads catch up (`lam_at(step)`); h = 0 (or W = 1) is a hard switch.
`floor=f` (default 0.5) is where it falls to and stays: a residual RELA term, the method then
training beside RELA, L = f·L_rela + (1 − f)·L_ssl; `floor=0` hands over to the method alone.
The hand-over defaults are the best of the candidates measured in bench/table1.py --parts handover;
the switch rule's were validated on held-out data (docs/defaults.md).

`acc.step()` advances the rule by one step from the last RELA loss (reading it on the host and,
under torch.distributed, averaging it over ranks: a sync and a collective per step). A loop that
keeps the device busy instead calls `acc.observe(losses)` every k steps with those steps'
rank-averaged RELA losses: the same recursion over the same values, so ρ is identical; adaptive
and blend then decide at those points (the switch lands on the first decision point at or after
the step where the rule fired). `rela train` does this every `--log-every` steps.

λ (`acc.lam_at(step)`; `acc.lam` at the last observed step) is the RELA loss weight: 1 in the RELA
phase, the floor once handed over. At the switch the accelerator calls `loader.set_views(ssl_views)`,
which takes effect from the very next batch. The window and the scaled rule need the run's
length: `total_steps=` or `acc.plan(total_steps)` (without it: no window, the given momenta, an
evidence window of `evidence_steps`).
Unlike the reference code, the transfer head is trained (`freeze_transfer=True` reproduces the
reference's frozen random projection), and the whole phase state is in `state_dict()`.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import nn

from rela.choices import SWITCH_RULES
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
                 rule: str = "evidence", window: tuple[float, float] = (0.2, 1.0), handover: float = 0.1,
                 floor: float = 0.5, evidence_steps: int = 100, min_gain: float = 0.05,
                 total_steps: int | None = None) -> None:
        super().__init__()
        self.mode, self.fraction = parse_phase(phase)
        self.phase = phase
        if rule not in SWITCH_RULES:
            raise RelaError(f"switch rule must be one of {', '.join(SWITCH_RULES)}, not {rule!r}")
        if evidence_steps < 3 or not 0 < min_gain < 1:  # a slope's standard error needs 3 points
            raise RelaError(f"the evidence rule needs evidence_steps >= 3 and 0 < min_gain < 1, got {evidence_steps} "
                            f"and {min_gain}")
        if not 0 <= window[0] <= window[1] <= 1:
            raise RelaError(f"switch window needs 0 <= min <= max <= 1, got {window[0]}:{window[1]}")
        if not 0 <= handover <= 1:
            raise RelaError(f"handover is a fraction of the run's steps in [0, 1], got {handover}")
        if not 0 <= floor < 1:
            raise RelaError(f"the RELA weight's floor after the hand-over must be in [0, 1), got {floor}")
        self.rule, self.window, self.handover, self.floor = rule, tuple(window), handover, floor
        self.evidence_steps, self.min_gain = int(evidence_steps), min_gain
        self.evidence: dict = {}  # the evidence rule's last reading (switch.json)
        self.transfer = nn.Linear(feature_dim, target_dim)
        self.transfer.requires_grad_(not freeze_transfer)
        self.loader, self.ssl_views = loader, ssl_views
        self.fast_momentum, self.slow_momentum, self.threshold = fast_momentum, slow_momentum, threshold
        self.total_steps: int | None = None
        self._recent: deque[float] = deque(maxlen=self.evidence_window)  # the evidence rule's last W RELA losses
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
        if self.rule != "reference":  # at least 10 and 3 steps: fewer cannot tell a plateau from batch noise
            self.fast_momentum = 1.0 - 1.0 / max(10.0, 0.026 * total_steps)
            self.slow_momentum = 1.0 - 1.0 / max(3.0, 0.0026 * total_steps)
        self._recent = deque(self._recent, maxlen=self.evidence_window)

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
        scale = self._start if self.rule != "reference" and self._start > 0 else 1.0
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
                if self.rule != "reference" and math.isnan(self._start):  # normalised starts: the first loss
                    self._start = self._fast = self._slow = value
                self._fast = self.fast_momentum * self._fast + (1 - self.fast_momentum) * value
                self._slow = self.slow_momentum * self._slow + (1 - self.slow_momentum) * self._fast
                self._recent.append(value)
            rhos.append(self.rho)
        switched = False
        if self.mode in ("adaptive", "blend") and not self.switched:
            # a window ending at 1 forces nothing: a switch at the last step would hand over nothing
            opened = self._steps >= self._window_step(0)
            due = self.window[1] < 1 and self._steps >= self._window_step(1)
            if self.mode == "blend":
                self._weight = 1.0 - self.rho if opened else 1.0
            if due or (self.mode == "adaptive" and opened and self._plateau()):
                switched = True  # blend at the window's end: the SSL method alone from here
                self._switch()
        self._write_buffers()
        return switched, rhos

    # --- the evidence rule -------------------------------------------------------------------
    @property
    def evidence_window(self) -> int:
        """W, the steps the evidence rule measures the trend over, and the shortest horizon it
        projects it to: `evidence_steps` at least, and a fifth of the run (a trend over fewer steps
        is batch noise; a share alone is a handful of steps in a short run; a fall that would still
        be 5% over a fifth of the run is RELA still paying)."""
        return max(self.evidence_steps, round(0.2 * (self.total_steps or 0)))

    def _plateau(self) -> bool:
        """Whether the RELA loss has stopped paying: the evidence rule's reading (self.evidence),
        or ρ ≥ threshold under the scaled and reference rules."""
        if self.rule != "evidence":
            return self.rho >= self.threshold
        if len(self._recent) < self.evidence_window:
            self.evidence = {"steps": len(self._recent), "needed": self.evidence_window}
            return False
        left = (self.total_steps or 0) - self._steps
        self.evidence = reading = projected_fall(self._recent, max(left, self.evidence_window))
        return reading["fall_upper"] < self.min_gain

    def why(self) -> str:
        """Why the switch came when it did (for switch.json and the CLI's summary)."""
        if self.mode == "fixed":
            return f"fixed:{self.fraction:g}: the start of epoch floor({self.fraction:g} x epochs)"
        if self.total_steps is not None and self._switch_step >= self._window_step(1):
            return (f"the window's end ({self.window[1]:g} of {self.total_steps} steps) came before the RELA loss "
                    f"stopped falling ({self.rule} rule)")
        if self.rule == "evidence":
            e = self.evidence
            return (f"the RELA loss stopped paying: at the rate of its last {e['steps']} steps it would fall at most "
                    f"{100 * e['fall_upper']:.1f}% more over {e['horizon']} steps (under {100 * self.min_gain:g}%)")
        return f"rho {self.rho:.4f} >= {self.threshold:g}: the RELA loss stopped falling ({self.rule} rule)"

    def why_not(self) -> str:
        """Why there was no switch (the summary of a run that kept RELA to its end)."""
        if self.mode != "adaptive" or self.switched:
            return ""
        e = self.evidence
        if self.rule != "evidence":
            return f"rho stayed below {self.threshold:g} ({self.rule} rule)"
        if "fall_upper" not in e:
            return (f"the run had {e.get('steps', 0)} RELA steps, fewer than the {self.evidence_window} the rule needs "
                    "to measure the loss's trend")
        return (f"the RELA loss was still falling: at the rate of its last {e['steps']} steps it would fall "
                f"{100 * e['fall']:.1f}% (up to {100 * e['fall_upper']:.1f}%) over another {e['horizon']} steps, "
                f"and the rule switches below {100 * self.min_gain:g}%")

    def decision(self) -> str:
        """What the phase did and why, in words a user can act on (the end-of-run summary)."""
        total = self.total_steps or 0
        if self.mode == "off":
            return "off: no RELA"
        if self.switched:
            at = f"step {self._switch_step}" + (
                f" of {total} ({100 * self._switch_step / total:.0f}%)" if total else ""
            )
            keep = (
                ""
                if self.mode == "fixed" and self.fraction == 1
                else "; --phase fixed:1 keeps RELA for the whole budget"
            )
            return f"{self.phase}: switched at {at} because {self.why()}{keep}"
        if self.mode == "fixed":
            return f"{self.phase}: RELA for the whole run"
        return (f"{self.phase} ({self.rule} rule): no switch, RELA for the whole run, because {self.why_not()}; "
                "--phase fixed:0.5 hands over to the method at half the run")

    def get_extra_state(self) -> dict:
        return {"recent": list(self._recent), "evidence": dict(self.evidence)}

    def set_extra_state(self, state: dict) -> None:
        self._recent = deque(state.get("recent", []), maxlen=self.evidence_window)
        self.evidence = dict(state.get("evidence", {}))

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


def projected_fall(losses: list[float], horizon: int) -> dict:
    """The least-squares trend of `losses` (one per step), projected `horizon` steps on, relative
    to the loss's level at the last step: `fall` from the slope, `fall_upper` from the slope plus
    two standard errors (≈97.5% one-sided: a noisy window cannot pass for a plateau)."""
    y = np.asarray(losses, dtype=np.float64)
    n = len(y)
    if n < 3:  # no slope and no spread to measure
        return {"steps": n, "horizon": int(horizon), "fall": math.inf, "fall_upper": math.inf}
    x = np.arange(n) - (n - 1) / 2
    sxx = float(x @ x)
    slope = float(x @ y) / sxx
    resid = y - y.mean() - slope * x
    se = math.sqrt(float(resid @ resid) / max(n - 2, 1) / sxx)
    level = max(float(y.mean() + slope * x[-1]), 1e-12)
    return {"steps": n, "horizon": int(horizon), "slope": slope, "slope_se": se, "level": level,
            "fall": max(-slope, 0.0) * horizon / level, "fall_upper": max(-slope + 2 * se, 0.0) * horizon / level}



def _fill_missing_start(module, state_dict, prefix, *_) -> None:
    """Checkpoints from before the scaled rule and the hand-over have no `start` (NaN: set from the
    next loss) and no `switch_weight` (1)."""
    state_dict.setdefault(prefix + "start", torch.tensor(math.nan, dtype=torch.float64))
    state_dict.setdefault(prefix + "_extra_state", {})  # before the evidence rule: no trend window yet
    state_dict.setdefault(prefix + "switch_weight", torch.tensor(1.0, dtype=torch.float64))
