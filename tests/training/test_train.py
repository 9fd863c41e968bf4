"""ReLA-F training: phase modes, the view switch, the transfer head, exact resume, probes, bad arguments."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from rela import Loader, convert
from rela.data.datasets import ArrayDataset
from rela.errors import RelaError, StoreMismatchError
from rela.loading.views import eval_view
from rela.training.accelerate import Accelerator
from rela.training.evaluate import evaluate_run, knn_accuracy, knn_votes, lbfgs_probe, linear_probe
from rela.training.run import TrainConfig
from rela.training.train import train
from tests.conftest import run_cli, smooth_image


def _cfg(tiny, tmp_path, **kw) -> TrainConfig:
    base = dict(data=tiny["data"], out=str(tmp_path / "run"), prior=tiny["store"], budget=0.5, epochs=2,
                batch_size=16, image_size=16, width=0.0625, phase="fixed:0.5", test_data=tiny["data"],
                num_workers=0, probe_at_switch=True)
    return TrainConfig(**{**base, **kw})


def _steps(run) -> list[dict]:
    with open(run / "steps.csv") as f:
        return list(csv.DictReader(f))


def test_fixed_phase_switches_at_the_epoch_and_logs(tiny, tmp_path):
    s = train(_cfg(tiny, tmp_path, handover_floor=0.0), progress=False)  # then the method alone
    rows = _steps(tmp_path / "run")
    assert s["steps"] == len(rows) == 2 * (80 // 16)
    assert {r["phase"] for r in rows if r["epoch"] == "0"} == {"rela"}
    assert {r["phase"] for r in rows if r["epoch"] == "1"} == {"ssl"}
    assert all(math.isnan(float(r["ssl_loss"])) for r in rows if r["epoch"] == "0")
    sw = json.loads((tmp_path / "run" / "switch.json").read_text())
    assert sw["step"] == 5 and sw["epoch"] == 1 and 0 <= sw["knn_top1"] <= 1
    assert s["images_seen"] == 160 and s["conversion_seconds"] > 0 and s["train_seconds"] > 0
    assert s["train_cpu_seconds"] > 0 and s["conversion_cpu_seconds"] > 0  # costs other work does not inflate
    assert s["total_cpu_seconds"] == pytest.approx(s["train_cpu_seconds"] + s["conversion_cpu_seconds"])
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "epochs.csv").exists()


def test_blend_mixes_both_losses(tiny, tmp_path):
    train(_cfg(tiny, tmp_path, phase="blend", switch_rule="reference", switch_window="0:1"), progress=False)
    rows = _steps(tmp_path / "run")
    lams = [float(r["lam"]) for r in rows]
    assert all(0 < lam < 1 for lam in lams) and lams[-1] < lams[0]  # ρ rises as the RELA loss settles
    assert all(r["phase"] == "blend" and not math.isnan(float(r["ssl_loss"])) for r in rows)


def test_adaptive_phase_runs_rela_until_rho_crosses(tiny, tmp_path):
    train(_cfg(tiny, tmp_path, phase="adaptive", switch_rule="reference", switch_window="0:1"), progress=False)
    rows = _steps(tmp_path / "run")
    # With the reference constants ρ cannot reach 0.995 in ten steps: the whole run is RELA.
    assert {r["phase"] for r in rows} == {"rela"} and float(rows[-1]["rho"]) < 0.995


def test_adaptive_switch_changes_the_loader_views_at_the_next_batch():
    rng = np.random.default_rng(0)
    ds = ArrayDataset(np.stack([smooth_image(rng, 20, 20) for _ in range(64)]), np.zeros(64, int), name="a")
    loader = Loader(ds, 8, views="rela", image_size=16, num_workers=0)
    acc = Accelerator(32, 8, "adaptive", loader=loader, ssl_views=[eval_view(12)], rule="scaled",
                      fast_momentum=0.5, slow_momentum=0.5, threshold=0.9, floor=0.0)
    it = iter(loader)
    switched_at = None
    for step in range(8):
        batch = next(it)
        if switched_at is not None:
            assert len(batch["views"]) == 1 and batch["views"][0].shape[-1] == 12  # the very next batch
            break
        assert len(batch["views"]) == 2
        if acc.step(1.0):  # a flat loss: fast and slow meet, ρ → 1
            switched_at = step
    assert switched_at is not None and acc.lam == 0 and acc.switched and int(acc.switch_step) == switched_at + 1
    state = acc.state_dict()
    again = Accelerator(32, 8, "adaptive", floor=0.0)
    again.load_state_dict(state)
    assert again.switched and again.lam == 0 and again.rho == acc.rho


@pytest.mark.parametrize("frozen", [False, True])
def test_transfer_head_gets_gradients_unless_frozen(frozen):
    acc = Accelerator(32, 8, "fixed:0.5", freeze_transfer=frozen)
    feats = torch.randn(2, 4, 32, requires_grad=True)
    acc.loss(feats, torch.randn(4, 8)).backward()
    assert feats.grad is not None  # the backbone always learns from the RELA loss
    assert (acc.transfer.weight.grad is None) == frozen


def test_frozen_transfer_head_stays_put_in_training(tiny, tmp_path):
    from rela.training.run import load_checkpoint

    def head(name, **kw):
        train(_cfg(tiny, tmp_path / name, phase="fixed:1", **kw), progress=False)  # all RELA
        return load_checkpoint(tmp_path / name / "run" / "checkpoint.pt")["accelerator"]["transfer.weight"]

    frozen1, frozen2 = head("f1", freeze_transfer=True, epochs=1), head("f2", freeze_transfer=True, epochs=2)
    trained = head("t1", epochs=1)
    assert torch.equal(frozen1, frozen2)  # 5 and 10 steps later: still the initial projection
    assert not torch.equal(frozen1, trained)  # same seed, same init: only the trainable one moved


def test_resume_continues_the_identical_loss_sequence(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "a", epochs=3, phase="fixed:0.5")
    train(cfg, progress=False)
    full = [r["loss"] for r in _steps(tmp_path / "a" / "run")]
    crashed = _cfg(tiny, tmp_path / "b", epochs=3, phase="fixed:0.5")
    assert train(crashed, progress=False, stop_after_steps=7)["stopped_at_step"] == 7  # mid-epoch 2
    with pytest.raises(RelaError, match="--resume"):
        train(crashed, progress=False)
    s = train(crashed, resume=True, progress=False)
    resumed = [r["loss"] for r in _steps(tmp_path / "b" / "run")]
    assert resumed == full and s["steps"] == len(full)
    with pytest.raises(RelaError, match="different configuration"):
        train(_cfg(tiny, tmp_path / "b", epochs=3, lr=0.5), resume=True, progress=False)


def test_linear_probe_and_knn_separate_separable_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 4
    y = torch.arange(1000) % 5
    x = centres[y] + torch.randn(1000, 16, generator=g)
    probe = linear_probe(x[:800], y[:800], x[800:], y[800:], probe="adam", epochs=30, lr=1e-2)
    assert probe["top1"] > 0.98 and len(probe["curve"]) == 30
    assert knn_accuracy(x[:800], y[:800], x[800:], y[800:]) > 0.98
    converged = linear_probe(x[:800], y[:800], x[800:], y[800:])  # the default: L-BFGS logistic regression
    assert converged["top1"] > 0.98 and converged["converged"] and converged["protocol"]["probe"] == "lbfgs"


def test_knn_majority_vote_counts_neighbours_where_the_weighted_vote_follows_the_nearest():
    # one test point; its nearest neighbour is class 0, the next two (further away) are class 1
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x, test_y = torch.tensor([[1.0, 0.01]]), torch.tensor([0])
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3) == 1.0  # exp(1/0.07) outweighs two exp(0.8/0.07)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3, vote="majority") == 0.0
    assert knn_votes(train_x, train_y, test_x, test_y, k=3) == {"weighted": 1.0, "majority": 0.0}  # one search
    with pytest.raises(RelaError, match="majority"):
        knn_accuracy(train_x, train_y, test_x, test_y, vote="mean")


def test_lbfgs_probe_is_deterministic_and_matches_the_logistic_regression_optimum():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 12, generator=g)
    y = (x[:, :3] @ torch.randn(3, 4, generator=g) + 0.5 * torch.randn(600, 4, generator=g)).argmax(1)
    a = lbfgs_probe(x[:500], y[:500], x[500:], y[500:], C=0.5)
    b = lbfgs_probe(x[:500], y[:500], x[500:], y[500:], C=0.5)
    assert a == b and a["converged"] and a["iterations"] > 1
    # Optimality of the fitted W, b (same standardisation): the gradient of C·Σ CE + ½‖W‖² vanishes.
    xs = (x[:500].double() - x[:500].double().mean(0)) / (x[:500].double().std(0) + 1e-6)
    w = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=2000, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def f():
        opt.zero_grad()
        v = 0.5 * torch.nn.functional.cross_entropy(xs @ w + bias, y[:500], reduction="sum") + 0.5 * (w * w).sum()
        v.backward()
        return v

    opt.step(f)
    with torch.no_grad():
        acc = float(((x[500:].double() - x[:500].double().mean(0)) / (x[:500].double().std(0) + 1e-6) @ w + bias)
                    .argmax(1).eq(y[500:]).double().mean())
    assert a["top1"] == pytest.approx(acc, abs=1e-9)
    # A weaker penalty fits the training set at least as well.
    assert lbfgs_probe(x[:500], y[:500], x[500:], y[500:], C=100.0)["train_top1"] >= a["train_top1"]
    with pytest.raises(RelaError, match="unknown probe"):
        linear_probe(x, y, x, y, probe="sgd")


def test_eval_reports_linear_and_knn(tiny, tmp_path):
    train(_cfg(tiny, tmp_path, epochs=1), progress=False)
    r = evaluate_run(tmp_path / "run", probe="adam", probe_epochs=3, progress=False)
    assert 0 <= r["linear_top1"] <= 1 and 0 <= r["knn_top1"] <= 1 and r["train_samples"] == 160
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["knn_top1"] == r["knn_top1"]
    assert r["probe"] == {"probe": "adam", "epochs": 3, "lr": 3e-4, "batch_size": 64, "last": 3, "standardize": True}
    r = evaluate_run(tmp_path / "run", progress=False)  # the default probe, recorded in eval.json
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["probe"]["probe"] == "lbfgs" and saved["probe"]["C"] == 1.0 and saved["probe_converged"] is True


def test_bad_arguments_are_refused(tiny, tmp_path):
    for budget in (0, -0.1, 1.5):
        with pytest.raises(RelaError, match="budget"):
            _cfg(tiny, tmp_path, budget=budget)
    with pytest.raises(RelaError, match="unknown method 'swav'"):
        _cfg(tiny, tmp_path, method="swav")
    with pytest.raises(RelaError, match="unknown phase"):
        _cfg(tiny, tmp_path, phase="sometimes")
    with pytest.raises(RelaError, match="0 <= c <= 1"):
        _cfg(tiny, tmp_path, phase="fixed:1.5")
    with pytest.raises(RelaError, match="fewer than one batch of 128"):
        train(_cfg(tiny, tmp_path, budget=0.1, batch_size=128), progress=False)
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((40, 8, 8, 3), np.uint8), labels=np.zeros(40, int))
    with pytest.raises(StoreMismatchError):
        train(_cfg(tiny, tmp_path, data=str(other)), progress=False)


def test_cli_train_and_eval(tiny, tmp_path):
    run = tmp_path / "cli-run"
    r = run_cli(
        "train",
        "--data",
        tiny["data"],
        "--prior",
        tiny["store"],
        "--budget",
        "0.5",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--image-size",
        "16",
        "--width",
        "0.0625",
        "--test-data",
        tiny["data"],
        "--phase",
        "fixed:0.5",
        "--out",
        str(run),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "switch     step 5" in r.stdout and "rela eval" in r.stdout
    assert "phase      fixed:0.5: switched at step 5 of 10 (50%) because fixed:0.5" in r.stdout
    r = run_cli("eval", str(run), "--probe-epochs", "2", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["linear_top1"] <= 1
    r = run_cli("train", "--data", tiny["data"], "--budget", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--budget must be in (0, 1]" in r.stderr


def test_prior_input_size_fits_the_data(tiny, tmp_path):
    from rela.data.priors import input_size_for

    assert [input_size_for(224, side) for side in (10, 20, 28, 33, 64, 112, 500)] == [32, 32, 32, 64, 64, 128, 224]
    assert input_size_for(96, 500) == 96  # never above the prior's own
    s = train(_cfg(tiny, tmp_path, prior="random:resnet18", epochs=1, dim=8), progress=False)
    manifest = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())
    assert manifest["preprocessing"]["input_size"] == 32  # 20-px images: 20 rounded up to 32, not 224
    assert s["conversion_seconds"] > 0


def test_view_flags_are_checked_recorded_and_used(tiny, tmp_path):
    with pytest.raises(RelaError, match="--ssl-views.*unknown views"):
        _cfg(tiny, tmp_path, ssl_views="mae")
    with pytest.raises(RelaError, match="--rela-views.*key among"):
        _cfg(tiny, tmp_path, rela_views="rela,zoom=2")
    cfg = _cfg(tiny, tmp_path, rela_views="rela,scale=0.3:1", ssl_views="byol,1.solarize_p=0", epochs=2)
    train(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["rela_views"] == "rela,scale=0.3:1" and saved["ssl_views"] == "byol,1.solarize_p=0"
    from rela.training.run import load_checkpoint

    views = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loader"]["views"]  # after the switch: SSL's
    assert len(views) == 2 and views[1]["solarize_p"] == 0 and views[0]["blur_p"] == 0  # 16 px: no blur


def test_warm_heads_log_the_ssl_loss_during_the_rela_phase(tiny, tmp_path):
    train(_cfg(tiny, tmp_path, warm_heads=True), progress=False)
    rows = _steps(tmp_path / "run")
    rela_rows = [r for r in rows if r["phase"] == "rela"]
    assert rela_rows and all(math.isfinite(float(r["ssl_loss"])) for r in rela_rows)
    assert math.isclose(float(rela_rows[0]["loss"]), float(rela_rows[0]["rela_loss"]) + float(rela_rows[0]["ssl_loss"]),
                        rel_tol=1e-4)


def test_a_trained_student_becomes_the_next_prior(tiny, tmp_path):
    from rela.data.priors import load_prior
    from rela.errors import PriorError
    from rela.training.evaluate import extract_features
    from rela.training.run import load_checkpoint

    train(_cfg(tiny, tmp_path, epochs=1), progress=False)
    out = tmp_path / "student.safetensors"
    r = run_cli("export", str(tmp_path / "run"), "--out", str(out))
    assert r.returncode == 0 and f"student:{out}" in r.stdout, r.stderr
    prior = load_prior(f"student:{out}")
    assert prior.input_size == 16 and prior.identity["arch"] == "resnet18-cifar x0.0625"
    from rela.training.run import export_student

    export_student(tmp_path / "run", out)  # the same run exported again: a store made from it still matches
    assert load_prior(f"student:{out}").identity == prior.identity
    # The prior's features are the run's backbone's features under the eval view (square images).
    from rela.models import build_backbone

    backbone = build_backbone("resnet18-cifar", 0.0625)
    backbone.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["backbone"])
    from rela.data.datasets import open_dataset

    ds = open_dataset(tiny["data"], limit=32)
    want, _ = extract_features(backbone, ds, 16)
    images = [ds.load(i) for i in range(32)]
    got = prior(prior.normalize(prior.resize_crop(images)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    store = convert(tiny["data"], f"student:{out}", tmp_path / "store2", dim=8, progress=False)
    assert store.manifest["prior"]["name"] == f"student:{out}" and store.dim == 8
    (tmp_path / "other.safetensors").write_bytes(out.read_bytes()[:100])
    with pytest.raises(PriorError, match="not a safetensors file"):
        load_prior(f"student:{tmp_path / 'other.safetensors'}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PriorError, match="not written by `rela export`"):
        load_prior(f"student:{tmp_path / 'plain.safetensors'}")
    r = run_cli("export", str(tmp_path / "nowhere"), "--out", str(out))
    assert r.returncode == 2 and "train it first" in r.stderr


def test_lbfgs_probe_refuses_features_too_large_to_hold(monkeypatch):
    import rela.training.evaluate as ev

    monkeypatch.setattr(ev, "MAX_LBFGS_BYTES", 1000)
    x, y = torch.randn(100, 8), torch.arange(100) % 2
    with pytest.raises(RelaError, match="--probe adam"):
        ev.lbfgs_probe(x, y, x, y)
    assert ev.adam_probe(x, y, x, y, epochs=1)["top1"] >= 0


def test_training_on_a_torchvision_dataset_object(tmp_path):
    import torchvision

    train_set = torchvision.datasets.FakeData(size=64, image_size=(3, 20, 20), num_classes=4, random_offset=3)
    test_set = torchvision.datasets.FakeData(size=32, image_size=(3, 20, 20), num_classes=4, random_offset=9)
    cfg = TrainConfig(data="fakedata", out=str(tmp_path / "run"), prior="random:resnet18", dim=8, epochs=2,
                      batch_size=16, image_size=16, width=0.0625, phase="fixed:0.5", num_workers=0)
    s = train(cfg, dataset=train_set, test_dataset=test_set, progress=False)
    assert s["steps"] == 8 and s["switch"]["epoch"] == 1 and 0 <= s["switch"]["knn_top1"] <= 1
    store_kind = json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())["dataset"]["kind"]
    assert store_kind.endswith("FakeData")
    r = evaluate_run(tmp_path / "run", train_data=train_set, test_data=test_set, progress=False)
    assert r["train_samples"] == 64 and r["test_samples"] == 32 and r["test_data"].endswith("FakeData")


def test_default_phase_keeps_rela_without_evidence_and_says_so(tiny, tmp_path):
    # The default (adaptive, evidence rule) on a run of 10 steps: too few steps to measure the RELA
    # loss's trend, so no switch; the summary says why and what to pass instead.
    s = train(_cfg(tiny, tmp_path, phase="adaptive", log_every=1), progress=False)
    assert s["switch"] is None and not (tmp_path / "run" / "switch.json").exists()
    assert [r["phase"] for r in _steps(tmp_path / "run")] == ["rela"] * 10
    assert "no switch" in s["phase"] and "fewer than the 100" in s["phase"] and "--phase fixed:0.5" in s["phase"]


def test_evidence_rule_switch_records_its_evidence(tiny, tmp_path):
    # a window of 3 steps and a gain no fall reaches: the rule reads the trend and switches once the
    # window opens; switch.json holds the reading it switched on
    s = train(_cfg(tiny, tmp_path, phase="adaptive", log_every=1, switch_evidence=3, switch_min_gain=0.99),
              progress=False)
    sw = json.loads((tmp_path / "run" / "switch.json").read_text())
    assert sw["rule"] == "evidence" and 2 <= sw["step"] <= 4 and "stopped paying" in sw["why"]
    assert sw["evidence"]["steps"] == 3 and sw["evidence"]["fall_upper"] < 0.99
    assert s["switch"]["evidence"] == sw["evidence"]


def test_scaled_rule_hands_over_within_its_window_and_says_why(tiny, tmp_path):
    # The scaled rule with the window 0.2:0.6 (the default before issue 33): the run of 10 steps
    # switches by step 6 at the latest, hands over in 0.1 x 10 = 1 step to the default residual
    # (λ = 0.5: the method beside RELA), and switch.json and the summary say when and why.
    s = train(_cfg(tiny, tmp_path, phase="adaptive", log_every=1, switch_rule="scaled", switch_window="0.2:0.6"),
              progress=False)
    rows = _steps(tmp_path / "run")
    sw = json.loads((tmp_path / "run" / "switch.json").read_text())
    assert 2 <= sw["step"] <= 6 and sw["share"] == sw["step"] / 10 and sw["rule"] == "scaled"
    assert sw["why"] and sw["window"] == [0.2, 0.6] and sw["handover_steps"] == 1 and sw["evidence"] is None
    assert [r["phase"] for r in rows] == ["rela"] * sw["step"] + ["blend"] * (10 - sw["step"])
    assert {float(r["lam"]) for r in rows[sw["step"]:]} == {0.5}
    assert all(math.isfinite(float(r["ssl_loss"])) and math.isfinite(float(r["rela_loss"])) for r in rows[sw["step"]:])
    assert f"switched at step {sw['step']} of 10" in s["phase"] and "--phase fixed:1 keeps RELA" in s["phase"]


def test_handover_window_moves_the_loss_over_and_the_method_clock_starts_at_the_switch(tiny, tmp_path):
    from rela.training.methods.dino import DINO

    temps = []
    real = DINO.teacher_temperature
    DINO.teacher_temperature = lambda self, step, total: temps.append((step, total)) or real(self, step, total)
    try:
        train(_cfg(tiny, tmp_path, method="dino", phase="fixed:0.5", handover=0.4, handover_floor=0.0, log_every=1),
              progress=False)
    finally:
        DINO.teacher_temperature = real
    rows = _steps(tmp_path / "run")
    lams = [float(r["lam"]) for r in rows]
    # switch at step 5; λ falls to 0 over 0.4 × 10 = 4 steps: 0.75, 0.5, 0.25, then 0
    assert lams == [1.0] * 5 + [0.75, 0.5, 0.25, 0.0, 0.0]
    assert [r["phase"] for r in rows[5:]] == ["blend", "blend", "blend", "ssl", "ssl"]
    assert all(not math.isnan(float(r["rela_loss"])) for r in rows[:8]) and math.isnan(float(rows[8]["rela_loss"]))
    assert temps == [(k, 5) for k in range(5)]  # the method's clock: steps since the switch, of 5


def test_dino_trains_with_local_crops_after_the_rela_phase(tiny, tmp_path):
    # --local-crops 3: after the switch each batch holds 2 global views at --image-size and 3 local
    # ones at 96/224 of it; the RELA phase before it keeps its two RELA views; the residual RELA
    # term after it reads the global views only
    from rela.training.methods.dino import DINO

    seen = []
    real = DINO.loss
    DINO.loss = lambda self, feats, views, *a, **k: seen.append([v.shape[-1] for v in views]) or real(self, feats,
                                                                                                      views, *a, **k)
    try:
        train(_cfg(tiny, tmp_path, method="dino", local_crops=3, log_every=1), progress=False)
    finally:
        DINO.loss = real
    assert len(seen) == 5 and all(sizes == [16, 16, 8, 8, 8] for sizes in seen)  # 16 x 96/224, at least 8 px
    rows = _steps(tmp_path / "run")
    assert all(math.isfinite(float(r["rela_loss"])) and math.isfinite(float(r["ssl_loss"])) for r in rows[5:])
    r = run_cli("train", "--data", tiny["data"], "--method", "byol", "--local-crops", "2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--local-crops and --local-size are DINO's" in r.stderr


def test_loader_settings_reach_the_loader(tiny, tmp_path):
    from rela.training.train import Trainer

    t = Trainer(_cfg(tiny, tmp_path, scaled_decode=False), progress=False)
    assert t.loader.scaled_decode is False and t.loader.worker_type == "thread"  # auto: rela's own decode
    assert Trainer(_cfg(tiny, tmp_path / "b"), progress=False).loader.scaled_decode is True


def test_switch_window_and_handover_are_checked():
    with pytest.raises(RelaError, match="switch-window"):
        TrainConfig(out="x", switch_window="0.7:0.2")
    with pytest.raises(RelaError, match="MIN:MAX"):
        TrainConfig(out="x", switch_window="half")
    with pytest.raises(RelaError, match="handover"):
        TrainConfig(out="x", handover=1.5)


def test_a_run_saved_before_the_hand_over_keeps_its_hard_switch(tmp_path):
    # config.json written before the phase-rule fields existed: the run ran with the reference rule
    # and a hard switch; reading it back must say so (a resume continues it, a cache never mistakes
    # it for a run made with today's defaults).
    from rela.training.run import config_from_run

    old = {k: v for k, v in TrainConfig(out=str(tmp_path)).__dict__.items()
           if k not in ("switch_rule", "switch_window", "handover", "handover_floor", "method_clock")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = config_from_run(tmp_path)
    assert (cfg.switch_rule, cfg.switch_window, cfg.handover, cfg.handover_floor, cfg.method_clock) == \
        ("reference", "0:1", 0.0, 0.0, "run")
    assert cfg != TrainConfig(out=str(tmp_path))


def test_cpu_seconds_count_the_threads_and_the_workers_that_ended():
    import subprocess
    import sys
    import threading
    import time

    from rela._workers import cpu_seconds

    c0 = cpu_seconds()
    subprocess.run(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"],
        check=True,
    )
    c1 = cpu_seconds()

    def spin():
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert c1 - c0 >= 0.35 and cpu_seconds() - c1 >= 0.25
