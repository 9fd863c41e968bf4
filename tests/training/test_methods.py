"""The methods the RELA phase hands over to: each loss against a hand-written reference, and each
method training with and without the RELA phase."""

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from rela.errors import RelaError
from rela.models import build_backbone
from rela.training.methods import METHODS, build_method
from rela.training.run import TrainConfig
from rela.training.train import train

F, B = 16, 12


def _setup(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18-cifar", 1 / 32)
    method = build_method(name, backbone, backbone.feature_dim, momentum=0.99, cosine_momentum=False, **kw)
    method.eval()  # BatchNorm in the heads: use running statistics so the references see the same maps
    views = [torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(seed + k)) for k in range(2)]
    with torch.no_grad():
        feats = backbone.eval()(torch.cat(views)).view(2, B, -1)
    return backbone, method, views, feats


def _nt_xent(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's loss written out: 2B rows, each row's positive is its other view, no self-pairs."""
    z = nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(-math.inf)
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return nn.functional.cross_entropy(sim, target)


def test_simclr_loss_is_nt_xent():
    _, m, views, feats = _setup("simclr")
    z = m.projection(feats.flatten(0, 1)).view(2, B, -1)
    assert m.loss(feats, views, 0, 10).item() == pytest.approx(_nt_xent(z[0], z[1], 0.5).item(), rel=1e-5)


def test_byol_loss_is_the_symmetric_negative_cosine():
    _, m, views, feats = _setup("byol")
    p = m.prediction(m.projection(feats.flatten(0, 1))).view(2, B, -1)
    z = m.target_projection(m.target_backbone(torch.cat(views))).view(2, B, -1)
    cos = nn.functional.cosine_similarity
    want = -0.5 * (cos(p[0], z[1]).mean() + cos(p[1], z[0]).mean())
    assert m.loss(feats, views, 0, 10).item() == pytest.approx(want.item(), rel=1e-5)


def test_barlow_twins_loss_is_the_cross_correlation_objective():
    _, m, views, feats = _setup("barlowtwins")
    z = m.projection(feats.flatten(0, 1)).view(2, B, -1)
    # Each dimension batch-normalised (biased variance, eps 1e-5), as the paper's BatchNorm does.
    a, b = ((v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5) for v in (z[0], z[1]))
    c = a.T @ b / B
    on = ((torch.diagonal(c) - 1) ** 2).sum()
    off = (c ** 2).sum() - (torch.diagonal(c) ** 2).sum()
    assert m.loss(feats, views, 0, 10).item() == pytest.approx((on + 5e-3 * off).item(), rel=1e-4)


def test_vicreg_loss_is_variance_invariance_covariance():
    _, m, views, feats = _setup("vicreg")
    z = m.projection(feats.flatten(0, 1)).view(2, B, -1)
    inv = nn.functional.mse_loss(z[0], z[1])

    def var(x):
        return torch.relu(1 - torch.sqrt(x.var(0) + 1e-4)).mean()

    def cov(x):
        x = x - x.mean(0)
        c = x.T @ x / (len(x) - 1)
        return ((c ** 2).sum() - (torch.diagonal(c) ** 2).sum()) / x.shape[1]

    want = 25 * inv + 25 * 0.5 * (var(z[0]) + var(z[1])) + 1 * (cov(z[0]) + cov(z[1]))
    assert m.loss(feats, views, 0, 10).item() == pytest.approx(want.item(), rel=1e-4)


def test_moco_contrasts_with_a_queue_of_past_keys():
    _, m, views, feats = _setup("moco", queue=32)
    q = nn.functional.normalize(m.projection(feats.flatten(0, 1)).view(2, B, -1), dim=-1)
    k = nn.functional.normalize(m.teacher(views), dim=-1)
    bank = m.criterion.memory_bank.bank.clone()  # [K, D], what the first call contrasts with

    def one(qv, kv, queue):
        logits = torch.cat([(qv * kv).sum(1, keepdim=True), qv @ queue.T], 1) / 0.1
        return nn.functional.cross_entropy(logits, torch.zeros(len(qv), dtype=torch.long))

    first = one(q[0], k[1], bank)
    after = bank.clone()
    after[:B] = k[1]  # the first call pushed its keys into the ring buffer
    second = one(q[1], k[0], after)
    assert m.loss(feats, views, 0, 10).item() == pytest.approx(0.5 * (first + second).item(), rel=1e-4)
    assert torch.allclose(m.criterion.memory_bank.bank[B:2 * B], k[0])
    # Both views' keys are queued; the queue is state, saved with the method (resume sees it).
    state = m.state_dict()
    assert torch.equal(state["criterion.memory_bank.bank"], m.criterion.memory_bank.bank)
    assert int(state["criterion.memory_bank.bank_ptr"]) == 2 * B


def test_dino_warms_the_teacher_temperature_and_matches_its_cross_entropy():
    _, m, views, feats = _setup("dino")
    assert m.teacher_temperature(0, 100) == pytest.approx(0.04)
    assert m.teacher_temperature(15, 100) == pytest.approx(0.055)
    assert m.teacher_temperature(30, 100) == m.teacher_temperature(99, 100) == pytest.approx(0.07)
    s = m.projection(feats.flatten(0, 1)).view(2, B, -1)
    t = m.teacher(views)
    # Centre starts at zero: CE of softmax(teacher / T_t) of one view against the student's other view.
    tp = [torch.softmax(x / 0.04, -1) for x in t]
    ls = [torch.log_softmax(x / 0.1, -1) for x in s]
    want = 0.5 * (-(tp[0] * ls[1]).sum(-1).mean() - (tp[1] * ls[0]).sum(-1).mean())
    assert m.loss(feats, views, 0, 100).item() == pytest.approx(want.item(), rel=1e-4)


def test_dino_multi_crop_loss_pairs_every_teacher_global_view_with_every_other_student_view():
    backbone, m, views, _ = _setup("dino", image_size=8, local_crops=3)
    assert m.views == "dino,local_crops=3" and m.local_crops == 3
    local = [torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    from rela.training.train import backbone_features

    with torch.no_grad():
        feats = backbone_features(backbone.eval(), views + local, B)
        assert feats.shape[0] == 5
        assert torch.allclose(feats[2], backbone(local[0]), atol=1e-6)  # the local views in their own pass
        s = m.projection(feats.flatten(0, 1)).view(5, B, -1)
        t = m.teacher(views)  # the teacher sees the global views only
    tp = [torch.softmax(x / 0.04, -1) for x in t]
    ls = [torch.log_softmax(x / 0.1, -1) for x in s]
    pairs = [(i, j) for i in range(2) for j in range(5) if i != j]  # DINO's: no view against itself
    want = sum(-(tp[i] * ls[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
    assert m.loss(feats, views + local, 0, 100).item() == pytest.approx(want.item(), rel=1e-4)
    with pytest.raises(RelaError, match="two global views first"):
        m.loss(feats, [views[0]] + local + [views[1]], 0, 100)
    assert _setup("dino", image_size=32)[1].local_crops == 0 and _setup("dino", image_size=64)[1].local_crops == 6


def test_dino_has_lightlys_cifar_head_and_freezes_its_prototypes_early():
    backbone, m, views, _ = _setup("dino")
    assert any(isinstance(x, nn.BatchNorm1d) for x in m.projection.layers)  # lightly's CIFAR-10 benchmark head
    m.train()

    def grads(step: int) -> tuple[float, float]:
        m.zero_grad()
        m.loss(backbone(torch.cat(views)).view(2, B, -1), views, step, 100).backward()
        last = sum(float(p.grad.abs().sum()) for p in m.projection.last_layer.parameters() if p.grad is not None)
        return last, float(m.projection.layers[0].weight.grad.abs().sum())

    (frozen, mlp_early), (free, _) = grads(0), grads(1)  # freeze_last_layer=0.01: the first 1 of 100 steps
    assert frozen == 0 and mlp_early > 0 and free > 0
    _, plain, _, _ = _setup("dino", options="batch_norm=false,freeze_last_layer=0")
    assert not any(isinstance(x, nn.BatchNorm1d) for x in plain.projection.layers) and plain.freeze_fraction == 0


def test_method_options_take_the_constructors_names_and_types():
    from rela.training.methods import parse_options

    assert parse_options("simclr", "temperature=0.2, out_dim=64") == {"temperature": 0.2, "out_dim": 64}
    assert parse_options("dino", "teacher_temp=0.04:0.04,batch_norm=0") == {"teacher_temp": (0.04, 0.04),
                                                                            "batch_norm": False}
    _, m, _, _ = _setup("simclr", options="temperature=0.2")
    assert m.criterion.temperature == pytest.approx(0.2)
    with pytest.raises(RelaError, match="simclr takes out_dim=128, temperature=0.5"):
        parse_options("simclr", "temprature=0.2")  # a typo lists what the method takes
    with pytest.raises(RelaError, match="simclr takes"):
        parse_options("simclr", "momentum=0.9")  # its own flag, --momentum, sets that
    with pytest.raises(RelaError, match="batch_norm: 'maybe' is not a bool"):
        parse_options("dino", "batch_norm=maybe")
    with pytest.raises(RelaError, match="vicreg takes no options"):
        parse_options("vicreg", "out_dim=64")
    with pytest.raises(RelaError, match="queue: 'x' is not a int"):
        TrainConfig(out="unused", method="moco", method_options="queue=x")  # before any conversion


def test_supervised_is_cross_entropy_and_needs_labels():
    _, m, views, feats = _setup("supervised", classes=3)
    labels = torch.arange(B) % 3
    logits = m.classifier(feats.flatten(0, 1))
    want = nn.functional.cross_entropy(logits, labels.repeat(2))
    assert m.loss(feats, views, 0, 10, labels).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(RelaError, match="labelled dataset"):
        m.loss(feats, views, 0, 10, torch.full((B,), -1))


def test_momentum_teachers_track_the_backbone():
    for name in ("byol", "moco", "dino"):
        backbone, m, _, _ = _setup(name)
        with torch.no_grad():
            for p in backbone.parameters():
                p.add_(1.0)
        before = [p.clone() for p in m.target_backbone.parameters()]
        m.update_target(0, 10, backbone)
        moved = [float((a - b).abs().max()) for a, b in zip(m.target_backbone.parameters(), before, strict=True)]
        assert max(moved) == pytest.approx(0.01, rel=1e-3), name  # (1 - 0.99) of the +1 shift
        assert not any(p.requires_grad for p in m.target_backbone.parameters())
        online = {id(p) for p in m.online_parameters()}
        assert not any(id(p) in online for p in m.target_backbone.parameters()), name


def _rows(run) -> list[dict]:
    with open(run / "steps.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("phase", ["fixed:0.5", "off"])
def test_every_method_trains_with_and_without_the_rela_phase(tiny, tmp_path, name, phase):  # noqa: F811
    cfg = TrainConfig(data=tiny["data"], out=str(tmp_path / "run"), prior=tiny["store"] if phase != "off" else None,
                      phase=phase, method=name, budget=0.5, epochs=2, batch_size=16, image_size=16, width=0.0625,
                      test_data=tiny["data"], num_workers=0, probe_at_switch=False)
    s = train(cfg, progress=False)
    rows = _rows(tmp_path / "run")
    assert s["steps"] == len(rows) == 10
    ssl = [float(r["ssl_loss"]) for r in rows if r["phase"] != "rela"]  # the method alone, or beside RELA
    assert len(ssl) == (5 if phase != "off" else 10) and all(np.isfinite(ssl))
    if phase != "off":
        assert all(np.isfinite(float(r["rela_loss"])) for r in rows if r["phase"] != "ssl")


def test_warm_heads_train_the_heads_and_leave_the_backbone_to_rela():
    from rela.training.accelerate import Accelerator
    from rela.training.train import _Student

    def grads(warm: bool):
        backbone, method, views, _ = _setup("byol")
        backbone.train(), method.train()
        acc = Accelerator(backbone.feature_dim, 8, "fixed:1")
        torch.manual_seed(1)
        acc.transfer.reset_parameters()
        student = _Student(backbone, method, acc, warm_heads=warm)
        target = torch.randn(B, 8, generator=torch.Generator().manual_seed(2))
        loss, rela_l, ssl_l = student(views, target, torch.arange(B), 1.0, 0, 10)
        loss.backward()
        return backbone, method, rela_l, ssl_l

    b_cold, m_cold, rela_cold, ssl_cold = grads(False)
    b_warm, m_warm, rela_warm, ssl_warm = grads(True)
    assert math.isnan(ssl_cold) and math.isfinite(ssl_warm) and rela_cold == rela_warm
    for p, q in zip(b_cold.parameters(), b_warm.parameters(), strict=True):  # the backbone: RELA's gradient only
        assert torch.equal(p.grad, q.grad)
    assert all(p.grad is None for p in m_cold.online_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m_warm.projection.parameters())
    assert all(p.grad is None for p in m_warm.target_backbone.parameters())


def test_foreach_momentum_update_matches_lightlys():
    """The two-call `torch._foreach_*` EMA gives lightly's `update_momentum` result."""
    import copy

    import torch
    from lightly.models.utils import update_momentum

    from rela.models import build_backbone
    from rela.training.methods import build_method

    torch.manual_seed(0)
    backbone = build_backbone("resnet18-cifar", 0.0625)
    method = build_method("byol", backbone, backbone.feature_dim)
    with torch.no_grad():
        for p in [*backbone.parameters(), *method.projection.parameters()]:
            p.add_(torch.randn_like(p))  # online and target now differ
    ref_b, ref_p = copy.deepcopy(method.target_backbone), copy.deepcopy(method.target_projection)
    update_momentum(backbone, ref_b, 0.99)
    update_momentum(method.projection, ref_p, 0.99)
    method.update_target(0, 10, backbone)
    for ref, got in ((ref_b, method.target_backbone), (ref_p, method.target_projection)):
        for a, b in zip(ref.parameters(), got.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_method_contract_is_explicit():
    """Labels are declared, options are the constructor's own (a misspelling fails, naming them),
    and every criterion computes in float32 under autocast wherever the method is used."""
    import copy

    from rela.errors import RelaError
    from rela.training.methods import METHODS, SimCLR

    assert [n for n, m in METHODS.items() if m.needs_labels] == ["supervised"]
    backbone = build_backbone("resnet18-cifar", 1 / 32)
    with pytest.raises(RelaError, match="simclr has no option temprature: it takes out_dim=128, temperature=0.5"):
        build_method("simclr", backbone, backbone.feature_dim, temprature=0.2)
    with pytest.raises(TypeError, match="temprature"):
        SimCLR(backbone, backbone.feature_dim, temprature=0.2)
    assert not hasattr(build_method("vicreg", backbone, backbone.feature_dim, momentum=0.9), "momentum")
    moco = build_method("moco", backbone, backbone.feature_dim, queue=64)
    twin = copy.deepcopy(moco)  # the copy's criterion is its own (its queue), not the original's
    assert twin.criterion.forward.__self__ is twin.criterion
    x = torch.randn(4, 128).bfloat16().requires_grad_()  # lightly's bank takes a batch only with gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin.criterion(x, x).dtype == torch.float32
    assert not torch.equal(twin.criterion.memory_bank.bank, moco.criterion.memory_bank.bank)
