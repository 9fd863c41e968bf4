"""Per-sample scores for the loader's `scored` subset policy: a fused table update and the
score → sampling-weight transform.

Update. For each sample in a batch, `score[i] = m·score[i] + (1−m)·loss`, and a sample's first
visit sets `score[i] = loss`. A batch may hold the same index more than once (drawing with
replacement, or two views): those updates are applied in batch order, exactly as if the batch had
been fed one sample at a time. The kernel gets the batch sorted by index (a stable sort, so batch
order is kept within an index) and gives each unique index to one lane, which folds its losses in
sequentially — no atomics, so the result is bit-for-bit deterministic on any device.

Weights. Scores of visited samples are standardised, z = (s − mean) / std, and mapped to
w = exp(z / T): w = 1 for an average sample, larger for samples the model still gets wrong,
T (temperature) controls how peaked the sampling is. Samples never visited get the largest
weight of the visited ones, so the first epochs cover the data. A floor keeps every valid sample
drawable (w ≥ floor); samples marked invalid (skipped at conversion) get exactly 0.

Unbiased loss (optional, after InfoBatch). Drawing K of N samples with inclusion probability
π_i ≈ min(1, K·w_i / Σw) and scaling sample i's loss by (K/N)/π_i makes the subset's mean loss a
Horvitz–Thompson estimate of the full-data mean loss, so the objective is not tilted towards the
hard samples that the sampler prefers. Off by default: the paper trains plainly on the subset.
"""

from __future__ import annotations

import torch

from rela.kernels._dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _score_update_kernel(
        SCORE, SEEN, UNIQ, STARTS, COUNTS, SLOSS, U, max_count, momentum,
        BLOCK: tl.constexpr,
    ):
        seg = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        smask = seg < U
        idx = tl.load(UNIQ + seg, mask=smask, other=0)
        start = tl.load(STARTS + seg, mask=smask, other=0)
        count = tl.load(COUNTS + seg, mask=smask, other=0)
        old = tl.load(SCORE + idx, mask=smask, other=0.0).to(tl.float32)
        seen = tl.load(SEEN + idx, mask=smask, other=0)
        first = tl.load(SLOSS + start, mask=smask, other=0.0).to(tl.float32)
        acc = tl.where(seen != 0, old, first)
        for j in range(0, max_count):
            live = smask & (j < count)
            loss = tl.load(SLOSS + start + j, mask=live, other=0.0).to(tl.float32)
            acc = tl.where(live, momentum * acc + (1.0 - momentum) * loss, acc)
        tl.store(SCORE + idx, acc, mask=smask)
        tl.store(SEEN + idx, tl.full([BLOCK], 1, tl.int8), mask=smask)

    @triton.jit
    def _score_weights_kernel(
        SCORE, SEEN, VALID, W, N, mean, inv_std, inv_temp, unseen_w, floor,
        HAS_VALID: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        s = tl.load(SCORE + offs, mask=m, other=0.0).to(tl.float32)
        seen = tl.load(SEEN + offs, mask=m, other=0)
        z = (s - mean) * inv_std * inv_temp
        w = tl.exp(tl.minimum(tl.maximum(z, -30.0), 30.0))
        w = tl.where(seen != 0, w, unseen_w)
        w = tl.maximum(w, floor)
        if HAS_VALID:
            valid = tl.load(VALID + offs, mask=m, other=0)
            w = tl.where(valid != 0, w, 0.0)
        tl.store(W + offs, w, mask=m)


def _check_table(score: torch.Tensor, seen: torch.Tensor) -> None:
    if score.dtype != torch.float32 or score.dim() != 1 or not score.is_contiguous():
        raise ValueError("score must be a contiguous 1-d float32 tensor")
    if seen.dtype != torch.int8 or seen.shape != score.shape or not seen.is_contiguous():
        raise ValueError("seen must be a contiguous int8 tensor shaped like score")


def _segments(index: torch.Tensor, loss: torch.Tensor):
    order = torch.argsort(index, stable=True)
    sidx = index[order]
    sloss = loss[order].float().contiguous()
    uniq, counts = torch.unique_consecutive(sidx, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return uniq, starts, counts, sloss


@torch.no_grad()
def update_scores(score: torch.Tensor, seen: torch.Tensor, index: torch.Tensor, loss: torch.Tensor,
                  momentum: float = 0.9) -> None:
    """In place: fold a batch's per-sample losses into the EMA score table (see module doc)."""
    _check_table(score, seen)
    index = index.reshape(-1).to(device=score.device, dtype=torch.int64)
    loss = loss.detach().reshape(-1).to(score.device)
    if index.numel() != loss.numel():
        raise ValueError(f"{index.numel()} indices but {loss.numel()} losses")
    if index.numel() == 0:
        return
    if not torch.isfinite(loss).all():
        raise ValueError("update_scores got NaN/inf losses; refusing to poison the score table")
    if int(index.min()) < 0 or int(index.max()) >= score.numel():
        raise IndexError(f"sample index out of range [0, {score.numel()})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    uniq, starts, counts, sloss = _segments(index, loss)
    max_count = int(counts.max())
    if use_triton(score):
        block = 1024 if score.device.type == "cpu" else 128
        grid = (triton.cdiv(uniq.numel(), block),)
        _score_update_kernel[grid](score, seen, uniq, starts, counts, sloss, uniq.numel(), max_count,
                                   float(momentum), BLOCK=block)
        return
    acc = torch.where(seen[uniq] != 0, score[uniq], sloss[starts])
    for j in range(max_count):
        live = j < counts
        step = momentum * acc + (1.0 - momentum) * sloss[(starts + j).clamp_(max=sloss.numel() - 1)]
        acc = torch.where(live, step, acc)
    score[uniq] = acc
    seen[uniq] = 1


def update_scores_reference(score, seen, index, loss, momentum: float = 0.9):
    """One sample at a time in float64, in batch order: the definition the kernels must match."""
    score = score.double().clone()
    seen = seen.clone()
    for i, x in zip(index.tolist(), loss.double().tolist(), strict=True):
        score[i] = x if not seen[i] else momentum * score[i] + (1.0 - momentum) * x
        seen[i] = 1
    return score, seen


@torch.no_grad()
def scores_to_weights(score: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor | None = None,
                      temperature: float = 1.0, floor: float = 0.05) -> torch.Tensor:
    """Sampling weights (float32, ≥ floor for valid samples, 0 for invalid); see module doc."""
    _check_table(score, seen)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if floor <= 0:
        raise ValueError(f"floor must be positive so every valid sample stays drawable, got {floor}")
    mean, inv_std, unseen_w = _weight_stats(score, seen, temperature)
    if valid is not None:
        valid = valid.to(device=score.device, dtype=torch.int8).contiguous()
        if valid.shape != score.shape:
            raise ValueError("valid must be shaped like score")
    if use_triton(score):
        w = torch.empty_like(score)
        block = 65536 if score.device.type == "cpu" else 1024
        grid = (triton.cdiv(score.numel(), block),)
        _score_weights_kernel[grid](score, seen, valid if valid is not None else seen, w, score.numel(),
                                    mean, inv_std, 1.0 / temperature, unseen_w, float(floor),
                                    HAS_VALID=valid is not None, BLOCK=block)
        return w
    z = ((score - mean) * (inv_std / temperature)).clamp_(-30.0, 30.0)
    w = torch.where(seen != 0, z.exp_(), torch.full_like(score, unseen_w)).clamp_min_(floor)
    if valid is not None:
        w = torch.where(valid != 0, w, torch.zeros((), device=w.device))
    return w


def _weight_stats(score: torch.Tensor, seen: torch.Tensor, temperature: float) -> tuple[float, float, float]:
    visited = score[seen != 0].double()
    if visited.numel() == 0:
        return 0.0, 1.0, 1.0  # nothing visited yet: uniform
    mean = float(visited.mean())
    std = float(visited.std(unbiased=False)) if visited.numel() > 1 else 0.0
    inv_std = 1.0 / std if std > 1e-12 else 0.0
    zmax = (float(visited.max()) - mean) * inv_std / temperature
    return mean, inv_std, float(torch.tensor(min(max(zmax, -30.0), 30.0)).exp())


def inclusion_probabilities(weights: torch.Tensor, k: int) -> torch.Tensor:
    """π_i for drawing k items with probability ∝ weight: k·w/Σw, capped at 1 with the excess
    redistributed over the rest (the standard πps fixed point)."""
    w = weights.double()
    n_pos = int((w > 0).sum())
    if not 0 <= k <= n_pos:
        raise ValueError(f"cannot draw {k} of {n_pos} samples with positive weight")
    pi = torch.zeros_like(w)
    capped = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(n_pos + 1):
        free = (w > 0) & ~capped
        budget = k - int(capped.sum())
        pi = torch.where(capped, torch.ones_like(w), w * budget / w[free].sum().clamp_min(1e-300))
        pi[w <= 0] = 0.0
        over = (pi > 1.0) & free
        if not over.any():
            break
        capped |= over
    return pi.clamp_(max=1.0)


def loss_scale(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample loss multipliers (K/N)/π_i that make subset training unbiased (module doc)."""
    pi = inclusion_probabilities(weights, k)
    n = int((weights > 0).sum())
    scale = torch.where(pi > 0, (k / n) / pi.clamp_min(1e-300), torch.zeros_like(pi))
    return scale.float()


__all__ = ["inclusion_probabilities", "loss_scale", "scores_to_weights", "update_scores", "update_scores_reference"]
