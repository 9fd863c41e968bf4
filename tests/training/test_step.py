"""The training step for GPUs, checked on the CPU: mixed precision, channels_last, optimizers and
schedules that resume exactly, a log interval that changes no numbers, and no host syncs between
log points."""

import csv
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from rela import Loader, convert
from rela.data.datasets import ArrayDataset
from rela.training.methods import build_method
from rela.training.optim import lr_factor
from rela.training.precision import Precision, float32_loss
from rela.training.run import TrainConfig, load_checkpoint
from rela.training.train import Trainer, train
from tests.conftest import run_cli, smooth_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    rng = np.random.default_rng(0)
    path = root / "tiny.npz"
    np.savez(path, images=np.stack([smooth_image(rng, 20, 20) for _ in range(96)]), labels=rng.integers(0, 3, 96))
    store = convert(str(path), "random:resnet18", root / "store", dim=8, input_size=32, progress=False)
    return {"data": str(path), "store": str(store.path)}


def _cfg(tiny, out, **kw) -> TrainConfig:
    base = dict(data=tiny["data"], out=str(out), prior=tiny["store"], epochs=2, batch_size=16, image_size=16,
                width=0.0625, phase="fixed:0.5", num_workers=0, probe_at_switch=False, budget=0.5)
    return TrainConfig(**{**base, **kw})


def _weights(out) -> dict:
    return load_checkpoint(out / "checkpoint.pt")["backbone"]


def _rows(out) -> list[dict]:
    with open(out / "steps.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite_and_close_to_fp32(precision):
    """One BYOL step on a tiny student: loss and gradients under autocast (fp16 with the scaler)
    against fp32 from the same weights and views."""
    from rela.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18-cifar", 0.0625)
    method = build_method("byol", backbone, backbone.feature_dim)
    float32_loss(method.criterion)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]

    def step(name):
        p = Precision(name, torch.device("cpu"))
        for m in (backbone, method):
            m.zero_grad(set_to_none=True)
        with p.autocast():
            feats = backbone(torch.cat(views)).view(2, 8, -1).float()
            loss = method.loss(feats, views, 0, 10)
        assert loss.dtype == torch.float32  # the loss itself is computed in fp32
        p.scaler.scale(loss).backward()
        grads = [q.grad / p.scaler.get_scale() if p.scaler.is_enabled() else q.grad for q in backbone.parameters()]
        return loss.detach(), torch.cat([g.flatten() for g in grads])

    ref_loss, ref_grad = step("fp32")
    loss, grad = step(precision)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(float(loss - ref_loss)) < 0.02 * abs(float(ref_loss)) + 1e-3, (loss, ref_loss)
    cos = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)
    # Measured here: cosine 0.91-0.93 for bf16 (8 mantissa bits), 0.985-0.988 for fp16 (11), over
    # widths 1/16-1/4 and batches 8-64; the norm within 1%. A wrong unscale or a dropped cast is off by far more.
    assert cos > (0.85 if precision == "bf16" else 0.97), cos
    assert abs(float(grad.norm() / ref_grad.norm()) - 1) < 0.1


def test_bf16_training_runs_end_to_end_on_cpu(tiny, tmp_path):
    s = train(_cfg(tiny, tmp_path, precision="bf16", method="simclr"), progress=False)
    rows = _rows(tmp_path)
    assert s["steps"] == len(rows) == 6 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_channels_last_reaches_the_model_and_every_view(tiny, tmp_path):
    rng = np.random.default_rng(0)
    ds = ArrayDataset(np.stack([smooth_image(rng, 20, 20) for _ in range(16)]), np.zeros(16, int), name="a")
    batch = next(iter(Loader(ds, 8, views="byol", image_size=16, memory_format=torch.channels_last)))
    assert all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in batch["views"])
    # Width 1/8: every strided 1x1 convolution has >= 8 input channels, so oneDNN #6035 can't touch it
    # and channels_last stays on (no warning may be raised).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = Trainer(_cfg(tiny, tmp_path, channels_last=True, epochs=1, width=0.125), progress=False)
    assert trainer.memory_format is torch.channels_last
    conv = next(m for m in trainer.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    views = next(iter(trainer.loader))["views"]
    assert views[0].is_contiguous(memory_format=torch.channels_last)
    trainer.fit()


def test_the_onednn_guard_finds_the_convolutions_the_bug_breaks():
    from rela.models import build_backbone
    from rela.training.memory_format import compile_options, onednn_hazards, student_memory_format

    narrow, wide = build_backbone("resnet18-cifar", 0.0625), build_backbone("resnet18-cifar", 0.125)
    found = onednn_hazards(narrow)
    assert found and all(name.endswith("downsample.0") for name in found)  # the 4 -> 8 shortcut
    assert onednn_hazards(wide) == []
    convs = [torch.nn.Conv2d(4, 8, 1, stride=2), torch.nn.Conv2d(7, 8, 1, stride=(1, 2)),
             torch.nn.Conv2d(16, 16, 1, stride=2, groups=4)]  # 4 input channels per group
    assert all(onednn_hazards(c) for c in convs)
    safe = [torch.nn.Conv2d(8, 16, 1, stride=2), torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(4, 8, 3, stride=2)]
    assert not any(onednn_hazards(c) for c in safe)
    with pytest.warns(RuntimeWarning, match=r"oneDNN issue #6035.*downsample.*widen the student"):
        assert student_memory_format(narrow, "cpu", True) is torch.contiguous_format
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert student_memory_format(narrow, "cuda", True) is torch.channels_last  # cuDNN: not affected
        assert student_memory_format(wide, "cpu", True) is torch.channels_last
        assert student_memory_format(narrow, "cpu", False) is torch.contiguous_format
    # --compile: Inductor would turn the convolutions channels_last by itself (its layout optimisation)
    assert compile_options(narrow, "cpu") == {"layout_optimization": False}
    assert compile_options(wide, "cpu") == compile_options(narrow, "cuda") == {}


def test_a_student_the_bug_breaks_trains_contiguous_on_the_avx2_kernels(tmp_path):
    """The issue's command: width 1/16 (a 4 -> 8 strided 1x1 shortcut), channels_last, one thread, oneDNN
    held to its AVX2 kernels (ONEDNN_MAX_CPU_ISA works on AVX-512 hosts too). Unguarded, it aborts
    ('double free or corruption'); guarded, it trains contiguous and says so in one line."""
    r = run_cli("train", "--data", "fashion-mnist", "--limit", "64", "--batch-size", "16", "--image-size", "16",
                "--width", "0.0625", "--epochs", "1", "--channels-last", "--prior", "random:resnet18",
                "--phase", "fixed:0.5", "--budget", "0.5", "--workers", "0", "--out", str(tmp_path / "run"),
                "--quiet", env={"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [line for line in r.stderr.splitlines() if "oneDNN issue #6035" in line]
    assert len(warning) == 1 and warning[0].startswith("rela: warning: channels_last is off"), r.stderr
    assert "steps      2" in r.stdout


def test_lr_factor_warms_up_then_follows_the_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert (
        cos[:3] == [0.5, 1.0, 1.0] and cos[-1] < 0.05 and all(a >= b for a, b in zip(cos[1:-1], cos[2:], strict=True))
    )


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("sgd", "cosine"), ("lars", "constant")])
def test_optimizers_and_schedules_resume_exactly(tiny, tmp_path, optimizer, schedule):
    kw = dict(optimizer=optimizer, lr_schedule=schedule, warmup_epochs=1.0, epochs=3, lr=0.05 if optimizer != "adamw"
              else 1e-3, lr_scale="linear", log_every=2)
    train(_cfg(tiny, tmp_path / "a", **kw), progress=False)
    crashed = _cfg(tiny, tmp_path / "b", **kw)
    train(crashed, progress=False, stop_after_steps=8)  # mid-epoch 3; the last checkpoint is after epoch 2
    train(crashed, resume=True, progress=False)
    assert [r["loss"] for r in _rows(tmp_path / "a")] == [r["loss"] for r in _rows(tmp_path / "b")]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["schedule"]
    assert lrs["last_epoch"] == 9  # stepped once per optimizer step


def test_the_log_interval_changes_no_numbers(tiny, tmp_path):
    one = train(_cfg(tiny, tmp_path / "one", log_every=1), progress=False)
    ten = train(_cfg(tiny, tmp_path / "ten", log_every=4), progress=False)
    assert one["steps"] == ten["steps"]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "ten")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("step", "loss", "rela_loss", "ssl_loss", "lam", "rho", "phase")
    assert [{k: r[k] for k in keep} for r in _rows(tmp_path / "one")] == \
           [{k: r[k] for k in keep} for r in _rows(tmp_path / "ten")]


def test_a_nan_loss_is_caught_at_the_log_interval_before_any_checkpoint(tiny, tmp_path):
    from rela.errors import RelaError

    with pytest.raises(RelaError, match=r"loss became (nan|inf) at step 1 .*no checkpoint"):
        train(_cfg(tiny, tmp_path, lr=1e6, optimizer="sgd", log_every=2, method="vicreg", phase="off"),
              progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("phase,method", [("fixed:0.5", "byol"), ("adaptive", "simclr"), ("blend", "byol")])
def test_no_host_sync_between_log_points(tiny, tmp_path, monkeypatch, phase, method):
    """Every way a tensor's value reaches the host (item, tolist, float/int/bool, numpy), counted
    inside the training steps: zero, whatever the phase. Only `_flush` reads values."""
    trainer = Trainer(_cfg(tiny, tmp_path, phase=phase, method=method, log_every=100, policy="scored"),
                      progress=False)
    calls = []
    counting = [False]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if counting[0]:
                caller = sys._getframe(1).f_code.co_filename
                # torch's optimizers read their step counters, kept on the host by design (not
                # capturable); anything else reading a value is a sync on a GPU.
                if f"torch{os.sep}optim" not in caller:
                    calls.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    step = trainer.train_step

    def counted(*a, **k):
        counting[0] = True
        try:
            return step(*a, **k)
        finally:
            counting[0] = False

    trainer.train_step = counted
    trainer.fit()
    assert trainer.step == 6 and calls == [], calls[:10]


@pytest.mark.slow  # ~50-80 s of Inductor compilation; run with -m slow
def test_compiled_student_trains_and_matches_eager_closely(tiny, tmp_path):
    """--compile (inductor on the CPU: ~80 s of compilation for this tiny student, once)."""
    eager = train(_cfg(tiny, tmp_path / "eager", epochs=1), progress=False)
    compiled = train(_cfg(tiny, tmp_path / "compiled", epochs=1, compile=True), progress=False)
    assert compiled["steps"] == eager["steps"] == 3
    a, b = ([float(r["loss"]) for r in _rows(tmp_path / name)] for name in ("eager", "compiled"))
    # Step 0 sees the same weights and batch: only the fused kernels' order of float sums differs.
    assert abs(a[0] - b[0]) <= 1e-3 * abs(a[0]) + 1e-6, (a, b)
    # Later steps start from weights that already differ in the last bits; AdamW's first steps
    # amplify that (seen here: 1.8% apart by step 2 of a 1/16-width student). Still the same run.
    assert np.allclose(a, b, rtol=0.05, atol=2e-3) and np.isfinite(b).all(), (a, b)


def test_a_resumed_run_killed_before_its_first_checkpoint_keeps_its_steps_csv(tiny, tmp_path):
    """steps.csv was reopened for writing at resume: a kill before the next checkpoint lost every row."""
    import csv
    import signal

    from tests.conftest import run_cli

    out = tmp_path / "run"
    args = ("train", "--data", tiny["data"], "--prior", tiny["store"], "--epochs", "3", "--batch-size", "32",
            "--image-size", "16", "--width", "0.125", "--workers", "0", "--log-every", "1", "--phase", "fixed:0.5",
            "--no-probe-at-switch", "--quiet", "--out", str(out))
    assert run_cli(*args, env={"RELA_CRASH_AT": "checkpoint-written:1"}).returncode == -signal.SIGKILL
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert rows
    r = run_cli(*args, "--resume", env={"RELA_CRASH_AT": "steps-logged:1"})
    assert r.returncode == -signal.SIGKILL  # killed again, before the resumed run's first checkpoint ...
    again = list(csv.DictReader((out / "steps.csv").open()))
    assert again[:len(rows)] == rows  # ... with every row up to the checkpoint it resumed from


def test_checkpoints_and_exports_are_written_like_the_store(tiny, tmp_path, monkeypatch):
    """Temp file opened exclusively (a link planted at its name is not followed), fsynced, renamed,
    folder fsynced: a checkpoint or export is never torn, and never writes through a planted link."""
    import os

    from rela.training.run import export_student, save_checkpoint
    from rela.training.train import train

    run = tmp_path / "run"
    train(_cfg(tiny, run, epochs=1), progress=False)
    victim = tmp_path / "victim"
    victim.write_text("unrelated")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    for path, write in ((tmp_path / "ck.pt", lambda p: save_checkpoint(p, {"step": 1})),
                        (tmp_path / "student.safetensors", lambda p: export_student(run, p))):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.symlink_to(victim)
        synced.clear()
        write(path)
        assert victim.read_text() == "unrelated" and path.is_file() and not tmp.exists()
        assert str(tmp) in synced and str(path.parent) in synced, synced  # the file, then its folder
