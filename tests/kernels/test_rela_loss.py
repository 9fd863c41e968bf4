"""The fused RELA loss: Triton kernels (under TRITON_INTERPRET=1) and the PyTorch path, each
against a float64 reference, with random upstream gradients and poisoned outputs."""

import zlib

import pytest
import torch

import rela.kernels.rela_loss as rl
from rela import rela_loss as public_rela_loss
from rela.kernels import _dispatch
from rela.kernels.rela_loss import RelaLoss, rela_loss, rela_loss_reference
from tests.conftest import spy_on_kernels

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
SHAPES = [(1, 1), (1, 7), (3, 2), (37, 100), (130, 256), (64, 1000)]


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("RELA_KERNELS", request.param)
    return request.param


def _inputs(V, B, d, dtype, tdtype, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(V, B, d, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(B, d, generator=g, dtype=torch.float64).to(tdtype)
    return pred, target


def _rel_err(a, b, scale=0.0):
    """Max abs error relative to the largest reference value, or to `scale` where that is larger
    (for d = 1 the exact gradient is 0 and only rounding is left)."""
    return float((a.double() - b.double()).abs().max() / max(float(b.double().abs().max()), scale, 1e-30))


def _check(pred, target, path, dtype, single=False):
    p = pred.detach().clone().requires_grad_(True)
    arg = p[0] if single else p
    loss = rela_loss(arg, target, reduction="none")
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (loss.double() * up).sum().backward()
    pd = pred.detach().double().requires_grad_(True)
    ref = rela_loss_reference(pd[0] if single else pd, target)
    (ref * up).sum().backward()
    assert loss.dtype == torch.float32 or dtype == torch.float64
    assert torch.isfinite(loss).all() and torch.isfinite(p.grad).all()
    fwd_tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((loss.detach().double() - ref.detach()).abs().max()) <= fwd_tol
    # Natural size of a gradient entry: |upstream| / |pred row|.
    scale = float(up.abs().max() / pred.double().norm(dim=-1).clamp_min(1e-8).min())
    assert _rel_err(p.grad, pd.grad, scale) <= TOL[dtype]
    assert p.grad.dtype == dtype


@pytest.mark.parametrize("B,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 2, 3])
def test_matches_float64_reference(path, B, d, dtype, V):
    tdtype = torch.float16 if dtype != torch.float32 else torch.float32
    # crc32, not hash(): Python salts str hashes per process, so a failure must replay from its test id
    pred, target = _inputs(V, B, d, dtype, tdtype, seed=zlib.crc32(f"{B},{d},{V},{dtype}".encode()))
    _check(pred, target, path, dtype)


def test_single_view_2d_input(path):
    pred, target = _inputs(1, 33, 65, torch.float32, torch.float16, seed=3)
    _check(pred, target, path, torch.float32, single=True)
    assert rela_loss(pred[0], target, reduction="none").shape == (33,)


def test_non_contiguous_inputs(path):
    base_p = torch.randn(2, 80, 300, dtype=torch.float32)
    base_t = torch.randn(300, 160, dtype=torch.float32)
    pred = base_p[:, ::2, ::3]          # [2, 40, 100] with strides in every dim
    target = base_t.t()[::4, :100]      # [40, 100] from transposed storage
    assert not pred.is_contiguous() and not target.is_contiguous()
    _check(pred, target, path, torch.float32)


def test_zero_norm_rows_never_nan(path):
    pred, target = _inputs(2, 6, 16, torch.float32, torch.float32, seed=1)
    pred[0, 1] = 0.0
    pred[1, 4] = 0.0
    target[2] = 0.0
    p = pred.clone().requires_grad_(True)
    loss = rela_loss(p, target, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(p.grad).all()
    assert loss[0, 1] == 1.0 and loss[:, 2].eq(1.0).all()
    pd = pred.double().requires_grad_(True)
    rela_loss_reference(pd, target).sum().backward()
    torch.testing.assert_close(p.grad.double(), pd.grad, rtol=1e-5, atol=1e-2)


def test_reductions_and_module(path):
    pred, target = _inputs(2, 10, 12, torch.float32, torch.float16, seed=5)
    per_row = rela_loss(pred, target, reduction="none")
    torch.testing.assert_close(rela_loss(pred, target), per_row.mean())
    torch.testing.assert_close(rela_loss(pred, target, reduction="sum"), per_row.sum())
    torch.testing.assert_close(RelaLoss()(list(pred), target), per_row.mean())
    assert public_rela_loss is rela_loss


def test_gradcheck_float64(path):
    pred, target = _inputs(2, 5, 9, torch.float64, torch.float64, seed=11)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: rela_loss(p, target, reduction="none"), (pred,))
    assert torch.autograd.gradcheck(lambda p: rela_loss(p, target), (pred,))


def test_kernel_writes_every_output_element():
    # Poison the output buffers: any row or column a mask forgets stays NaN.
    for V, B, d in [(2, 131, 300), (1, 1, 3), (2, 64, 1024)]:
        pred, target = _inputs(V, B, d, torch.float32, torch.float16, seed=B)
        out = tuple(torch.full(s, float("nan")) for s in [(V, B), (V, B), (B,), (V, B)])
        loss, rp, rt, c = rl._forward_triton(pred, target, 1e-8, out=out)
        assert all(torch.isfinite(x).all() for x in (loss, rp, rt, c))
        dp = torch.full((V, B, d), float("nan"))
        rl._backward_triton(pred, target, torch.ones(V, B), rp, rt, c, dp=dp)
        assert torch.isfinite(dp).all()


def test_bad_arguments():
    t = torch.randn(4, 8)
    with pytest.raises(ValueError, match="pred must be"):
        rela_loss(torch.randn(4, 9), t)
    with pytest.raises(ValueError, match="reduction"):
        rela_loss(torch.randn(4, 8), t, reduction="avg")
    with pytest.raises(ValueError, match="empty batch"):
        rela_loss(torch.randn(0, 8), torch.randn(0, 8))


# --- dispatch -----------------------------------------------------------------------------

class _FakeCuda:
    is_cuda = True
    device = torch.device("cuda", 0)


def test_dispatch_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("RELA_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.use_triton(cpu)
    assert _dispatch.use_triton(_FakeCuda())
    monkeypatch.setenv("RELA_KERNELS", "torch")
    assert not _dispatch.use_triton(_FakeCuda())
    monkeypatch.setenv("RELA_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(cpu)
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    monkeypatch.setenv("RELA_KERNELS", "auto")
    assert not _dispatch.use_triton(_FakeCuda())
    monkeypatch.setenv("RELA_KERNELS", "fast")
    with pytest.raises(ValueError, match="RELA_KERNELS"):
        _dispatch.use_triton(cpu)


def test_the_triton_path_really_launches(monkeypatch):
    calls = spy_on_kernels(monkeypatch, rl, "_rela_loss_fwd_kernel", "_rela_loss_bwd_kernel")
    pred, target = _inputs(2, 8, 4, torch.float32, torch.float32, seed=0)
    pred.requires_grad_(True)
    monkeypatch.setenv("RELA_KERNELS", "auto")
    rela_loss(pred, target).backward()
    assert len(calls) == 2  # one fused launch for both views, forward and backward
    monkeypatch.setenv("RELA_KERNELS", "torch")
    rela_loss(pred, target).backward()
    assert len(calls) == 2
