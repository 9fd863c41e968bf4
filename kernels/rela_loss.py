"""RELA target-matching loss: per-row 1 − cos(pred, target), fused forward and backward.

    loss[v, b] = 1 − <p̂, t̂>,  p̂ = p / max(‖p‖, eps),  t̂ = t / max(‖t‖, eps)

(the semantics of `F.normalize(·, eps)`: a zero row has zero direction, never NaN). `pred` is
[B, d] or [V, B, d] — the RELA phase always has two views of the same images against one
target, and both views are matched in one launch that reads each target tile once.

The forward keeps three floats per row (1/‖p‖, 1/‖t‖ and the cosine, zeroed where the norm was
clamped) so the backward is a single pass that needs no reductions:

    dL/dp = g · (c·r_p²·p − r_p·r_t·t),   g the upstream gradient of that row's loss.

Bytes moved per call, with V views, B rows, d columns, s_p / s_t bytes per pred / target element:
    forward   V·B·d·s_p + B·d·s_t                 (+ 16·V·B for the per-row outputs)
    backward  2·V·B·d·s_p + B·d·s_t               (+ 16·V·B)
The target gets no gradient: it is a stored constant.

Layout after Liger-Kernel: the Triton kernels, their launchers, the `torch.autograd.Function`,
the plain-PyTorch path used on CPU, a float64 reference for tests, and the functional / module
wrappers all live here. Dispatch per call: see `rela.kernels._dispatch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rela.kernels._dispatch import HAS_TRITON, interpreting, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rela_loss_fwd_kernel(
        P, T, LOSS, RP, RT, C,
        B, D, stride_pv, stride_pb, stride_pd, stride_tb, stride_td, eps,
        TWO_VIEWS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        tt = tl.zeros([BLOCK_M], dtype=ACC)
        dot0 = tl.zeros([BLOCK_M], dtype=ACC)
        pp0 = tl.zeros([BLOCK_M], dtype=ACC)
        dot1 = tl.zeros([BLOCK_M], dtype=ACC)
        pp1 = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols[None, :] < D)
            # Upcast right after every load: no arithmetic on bf16/fp16 values.
            t = tl.load(T + rows[:, None] * stride_tb + cols[None, :] * stride_td, mask=m, other=0.0).to(ACC)
            tt += tl.sum(t * t, axis=1)
            p_off = rows[:, None] * stride_pb + cols[None, :] * stride_pd
            p = tl.load(P + p_off, mask=m, other=0.0).to(ACC)
            dot0 += tl.sum(p * t, axis=1)
            pp0 += tl.sum(p * p, axis=1)
            if TWO_VIEWS:
                p = tl.load(P + stride_pv + p_off, mask=m, other=0.0).to(ACC)
                dot1 += tl.sum(p * t, axis=1)
                pp1 += tl.sum(p * p, axis=1)
        nt = tl.sqrt(tt)
        rt = 1.0 / tl.maximum(nt, eps)
        tl.store(RT + rows, rt, mask=rmask)
        np0 = tl.sqrt(pp0)
        rp0 = 1.0 / tl.maximum(np0, eps)
        cos0 = dot0 * rp0 * rt
        tl.store(LOSS + rows, 1.0 - cos0, mask=rmask)
        tl.store(RP + rows, rp0, mask=rmask)
        tl.store(C + rows, tl.where(np0 > eps, cos0, 0.0), mask=rmask)
        if TWO_VIEWS:
            np1 = tl.sqrt(pp1)
            rp1 = 1.0 / tl.maximum(np1, eps)
            cos1 = dot1 * rp1 * rt
            tl.store(LOSS + B + rows, 1.0 - cos1, mask=rmask)
            tl.store(RP + B + rows, rp1, mask=rmask)
            tl.store(C + B + rows, tl.where(np1 > eps, cos1, 0.0), mask=rmask)

    @triton.jit
    def _rela_loss_bwd_kernel(
        P, T, G, RP, RT, C, DP,
        B, D, stride_pv, stride_pb, stride_pd, stride_tb, stride_td, stride_dv, stride_db,
        TWO_VIEWS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        rt = tl.load(RT + rows, mask=rmask, other=0.0).to(ACC)
        g0 = tl.load(G + rows, mask=rmask, other=0.0).to(ACC)
        rp0 = tl.load(RP + rows, mask=rmask, other=0.0).to(ACC)
        c0 = tl.load(C + rows, mask=rmask, other=0.0).to(ACC)
        a0 = -g0 * rp0 * rt
        b0 = g0 * c0 * rp0 * rp0
        a1 = a0
        b1 = b0
        if TWO_VIEWS:
            g1 = tl.load(G + B + rows, mask=rmask, other=0.0).to(ACC)
            rp1 = tl.load(RP + B + rows, mask=rmask, other=0.0).to(ACC)
            c1 = tl.load(C + B + rows, mask=rmask, other=0.0).to(ACC)
            a1 = -g1 * rp1 * rt
            b1 = g1 * c1 * rp1 * rp1
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols[None, :] < D)
            t = tl.load(T + rows[:, None] * stride_tb + cols[None, :] * stride_td, mask=m, other=0.0).to(ACC)
            p_off = rows[:, None] * stride_pb + cols[None, :] * stride_pd
            d_off = rows[:, None] * stride_db + cols[None, :]
            p = tl.load(P + p_off, mask=m, other=0.0).to(ACC)
            dp = a0[:, None] * t + b0[:, None] * p
            tl.store(DP + d_off, dp.to(DP.dtype.element_ty), mask=m)
            if TWO_VIEWS:
                p = tl.load(P + stride_pv + p_off, mask=m, other=0.0).to(ACC)
                dp = a1[:, None] * t + b1[:, None] * p
                tl.store(DP + stride_dv + d_off, dp.to(DP.dtype.element_ty), mask=m)


def _blocks(d: int, device: torch.device) -> tuple[int, int]:
    """Rows and columns per program. The interpreter pays ~3 ms per program whatever its size,
    so it gets big tiles; a GPU gets register-sized ones (d ≈ 256 fits one column tile)."""
    dp2 = 1 << max(d - 1, 0).bit_length()
    if device.type == "cpu":
        block_d = min(dp2, 1024)
        return max(1, 8192 // block_d), block_d
    block_d = min(dp2, 256)
    return max(1, min(64, 4096 // block_d)), block_d


def _acc_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _views_of(pred: torch.Tensor) -> list[tuple[int, int]]:
    """(first view, number of views) per launch: pairs fused, an odd view alone."""
    V = pred.shape[0]
    return [(v, min(2, V - v)) for v in range(0, V, 2)]


def _forward_triton(pred: torch.Tensor, target: torch.Tensor, eps: float, out=None):
    """Launch the forward; `out` = (loss, rp, rt, c) buffers may be passed in (tests poison them)."""
    V, B, D = pred.shape
    acc = _acc_dtype(pred)
    if out is None:
        loss = torch.empty(V, B, dtype=acc, device=pred.device)
        out = (loss, torch.empty_like(loss), torch.empty(B, dtype=acc, device=pred.device), torch.empty_like(loss))
    loss, rp, rt, c = out
    bm, bd = _blocks(D, pred.device)
    tl_acc = tl.float64 if acc == torch.float64 else tl.float32
    grid = (triton.cdiv(B, bm),)
    for v, nv in _views_of(pred):
        _rela_loss_fwd_kernel[grid](
            pred[v], target, loss[v], rp[v], rt, c[v],
            B, D, pred.stride(0), pred.stride(1), pred.stride(2), target.stride(0), target.stride(1), eps,
            TWO_VIEWS=nv == 2, ACC=tl_acc, BLOCK_M=bm, BLOCK_D=bd,
        )
    return loss, rp, rt, c


def _backward_triton(pred, target, g, rp, rt, c, dp=None):
    V, B, D = pred.shape
    if dp is None:
        dp = torch.empty(V, B, D, dtype=pred.dtype, device=pred.device)
    g = g.to(rp.dtype).contiguous()
    bm, bd = _blocks(D, pred.device)
    tl_acc = tl.float64 if rp.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(B, bm),)
    for v, nv in _views_of(pred):
        _rela_loss_bwd_kernel[grid](
            pred[v], target, g[v], rp[v], rt, c[v], dp[v],
            B, D, pred.stride(0), pred.stride(1), pred.stride(2), target.stride(0), target.stride(1),
            dp.stride(0), dp.stride(1),
            TWO_VIEWS=nv == 2, ACC=tl_acc, BLOCK_M=bm, BLOCK_D=bd,
        )
    return dp


def _forward_torch(pred: torch.Tensor, target: torch.Tensor, eps: float):
    """The same maths in a few whole-tensor PyTorch ops, with no [V, B, d] temporaries."""
    acc = _acc_dtype(pred)
    p, t = pred.to(acc), target.to(acc)
    dot = torch.einsum("vbd,bd->vb", p, t)
    norm_p = torch.linalg.vector_norm(p, dim=-1)
    rp = norm_p.clamp_min(eps).reciprocal_()
    rt = torch.linalg.vector_norm(t, dim=-1).clamp_min_(eps).reciprocal_()
    cos = dot.mul_(rp).mul_(rt)
    c = torch.where(norm_p > eps, cos, torch.zeros((), dtype=acc))
    return 1.0 - cos, rp, rt, c


def _backward_torch(pred, target, g, rp, rt, c):
    acc = rp.dtype
    g = g.to(acc)
    a = (-g * rp * rt).unsqueeze(-1)
    b = (g * c * rp * rp).unsqueeze(-1)
    dp = torch.addcmul(b * pred.to(acc), a, target.to(acc).unsqueeze(0))
    return dp.to(pred.dtype)


class RelaLossFunction(torch.autograd.Function):
    """Per-row loss [V, B] from pred [V, B, d] and target [B, d]; gradient for pred only."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, eps: float, triton_path: bool):
        fwd = _forward_triton if triton_path else _forward_torch
        loss, rp, rt, c = fwd(pred, target, eps)
        ctx.save_for_backward(pred, target, rp, rt, c)
        ctx.triton_path = triton_path
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        pred, target, rp, rt, c = ctx.saved_tensors
        bwd = _backward_triton if ctx.triton_path else _backward_torch
        return bwd(pred, target, grad_loss, rp, rt, c), None, None, None


def _as_views(pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(pred, torch.Tensor):
        pred = torch.stack(list(pred))
        single = False
    else:
        single = pred.dim() == 2
        if single:
            pred = pred.unsqueeze(0)
    if pred.dim() != 3 or target.dim() != 2 or pred.shape[1:] != target.shape:
        raise ValueError(f"pred must be [B, d] or [V, B, d] matching target [B, d]; got pred "
                         f"{tuple(pred.shape)} and target {tuple(target.shape)}")
    if not pred.is_floating_point() or not target.is_floating_point():
        raise TypeError("rela_loss needs floating-point pred and target")
    if target.device != pred.device:
        raise ValueError(f"pred is on {pred.device} but target on {target.device}")
    return pred, single


def rela_loss(
    pred: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """RELA loss, 1 − cos(pred, target) per row.

    pred: [B, d], [V, B, d] or a sequence of [B, d] views (fp32 / bf16 / fp16 / fp64);
    target: [B, d] (fp16 store rows or fp32). reduction "mean" averages over views and rows;
    "none" returns per-row losses in float32 ([B] or [V, B]); "sum" sums them.
    """
    views, single = _as_views(pred, target)
    if views.shape[1] == 0:
        raise ValueError("rela_loss got an empty batch")
    if target.dtype == torch.float64 and views.dtype != torch.float64:
        target = target.float()
    loss = RelaLossFunction.apply(views, target, eps, use_triton(views))
    if loss.dtype != torch.float64:
        loss = loss.float()
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss[0] if single else loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


class RelaLoss(nn.Module):
    """Module form of `rela_loss`."""

    def __init__(self, reduction: str = "mean", eps: float = 1e-8) -> None:
        super().__init__()
        self.reduction, self.eps = reduction, eps

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return rela_loss(pred, target, self.reduction, self.eps)


def rela_loss_reference(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Float64 eager reference: per-row losses, same shape rules as `rela_loss(reduction='none')`."""
    p = pred.double()
    t = target.double()
    return 1.0 - (F.normalize(p, dim=-1, eps=eps) * F.normalize(t, dim=-1, eps=eps)).sum(-1)


def eager_rela_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """What a user writes without rela (the benchmark's baseline): normalize, cosine, mean."""
    t = F.normalize(target.to(pred.dtype), dim=-1, eps=eps)
    return (1.0 - (F.normalize(pred, dim=-1, eps=eps) * t).sum(-1)).mean()


__all__ = ["RelaLoss", "RelaLossFunction", "eager_rela_loss", "interpreting", "rela_loss", "rela_loss_reference"]
