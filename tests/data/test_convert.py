"""Conversion end to end: store contents, mismatch refusal, bad input, and kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rela import convert, load_prior, open_dataset
from rela.data.store import TargetStore, TargetWriter
from rela.errors import CorruptImageError, RelaError, StoreError, StoreMismatchError
from tests.conftest import REPO, make_folder, run_cli

PRIOR = dict(prior="random:resnet18", input_size=32)
SMALL = dict(dim=16, batch_size=32, chunk_rows=64, num_workers=0, progress=False)


@pytest.fixture
def store(tmp_path, npz_dataset):
    return convert(npz_dataset, out=tmp_path / "store", **PRIOR, **SMALL)


def test_store_roundtrip_matches_direct_computation(store, npz_dataset):
    ds = open_dataset(npz_dataset)
    assert len(store) == 300 and store.dim == 16
    m = store.manifest
    assert m["n"] == 300 and m["raw_dim"] == 512 and m["dataset"] == ds.fingerprint()
    assert m["prior"]["name"] == "random:resnet18" and len(m["prior"]["weights_sha256"]) == 64
    assert m["preprocessing"]["input_size"] == 32 and m["skipped"] == []
    rows = store[[3, 7, 299]]
    assert rows.dtype == np.float32 and rows.shape == (3, 16)

    # Recompute in memory, float64 PCA via SVD, and compare up to per-component sign.
    prior = load_prior("random:resnet18", input_size=32)
    feats = np.concatenate(
        [
            prior(torch.stack([prior.preprocess(ds.load(i)) for i in range(s, min(s + 32, 300))])).numpy()
            for s in range(0, 300, 32)
        ]
    ).astype(np.float64)
    xc = feats - feats.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:16].T / (s[:16] / np.sqrt(300))
    got = store[:]
    signs = np.sign((got * ref).sum(0))
    np.testing.assert_allclose(got, ref * signs, atol=0.02, rtol=0.01)
    st = store.stats()
    np.testing.assert_allclose(st["mean"], 0, atol=1e-3)
    np.testing.assert_allclose(st["std"], 1, atol=2e-3)
    assert st["nan"] == st["inf"] == 0


def test_store_refuses_another_dataset(store, npz_dataset):
    TargetStore.open(store.path, open_dataset(npz_dataset))  # the right one opens
    with pytest.raises(StoreMismatchError, match="n: store has 300, dataset has 100"):
        TargetStore.open(store.path, open_dataset(npz_dataset, limit=100))
    shuffled = open_dataset(npz_dataset)
    shuffled.images = shuffled.images[::-1].copy()
    with pytest.raises(StoreMismatchError, match="digest"):
        TargetStore.open(store.path, shuffled)


def test_workers_give_the_same_store(store, tmp_path, npz_dataset):
    other = convert(npz_dataset, out=tmp_path / "w2", **PRIOR, **{**SMALL, "num_workers": 2})
    assert np.array_equal(np.asarray(other.targets), np.asarray(store.targets))


def test_existing_store_is_reused_or_protected(store, npz_dataset):
    again = convert(npz_dataset, out=store.path, **PRIOR, **SMALL)
    assert again.manifest["created"] == store.manifest["created"]
    with pytest.raises(RelaError, match="--overwrite"):
        convert(npz_dataset, out=store.path, **PRIOR, **{**SMALL, "dim": 8})
    replaced = convert(npz_dataset, out=store.path, overwrite=True, **PRIOR, **{**SMALL, "dim": 8})
    assert replaced.dim == 8


def test_unfinished_store_is_not_a_store(tmp_path):
    (tmp_path / "s" / ".convert").mkdir(parents=True)
    with pytest.raises(StoreError, match="unfinished conversion"):
        TargetStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist"):
        TargetStore.open(tmp_path / "missing")


def test_writer_refuses_nonfinite_rows(tmp_path):
    w = TargetWriter(tmp_path / "t.npy", 4, 2)
    w.write(np.zeros((2, 2)))
    with pytest.raises(StoreError, match="row 3 contains NaN"):
        w.write(np.array([[0.0, 1.0], [np.nan, 0.0]]))
    with pytest.raises(StoreError, match="overflows float16"):
        w.write(np.array([[1e6, 0.0]]))


def test_dim_larger_than_prior(tmp_path, npz_dataset):
    with pytest.raises(RelaError, match="--dim 600 is out of range.*512"):
        convert(npz_dataset, out=tmp_path / "s", **PRIOR, **{**SMALL, "dim": 600})
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_resume_flag_needs_something_to_resume(tmp_path, npz_dataset):
    with pytest.raises(RelaError, match="nothing to resume"):
        convert(npz_dataset, out=tmp_path / "s", resume=True, **PRIOR, **SMALL)


def _corrupt_folder(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=2, per_class=20)
    bad = root / "class_1" / "img_005.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    return root, bad


def test_corrupt_image_stops_with_its_name(tmp_path):
    root, bad = _corrupt_folder(tmp_path)
    with pytest.raises(CorruptImageError, match="sample 25 .*img_005.jpg.*--skip-corrupt"):
        convert(root, out=tmp_path / "s", **PRIOR, **{**SMALL, "dim": 4})
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_skip_corrupt_records_the_index(tmp_path):
    root, _ = _corrupt_folder(tmp_path)
    s = convert(root, out=tmp_path / "s", skip_corrupt=True, **PRIOR, **{**SMALL, "dim": 4})
    assert s.manifest["skipped"] == [25] and "25" in s.manifest["skipped_reasons"]
    assert not s.valid_mask()[25] and s.valid_mask().sum() == 39
    assert np.all(s[25] == 0)
    np.testing.assert_allclose(s.stats()["std"], 1, atol=2e-3)


def test_prior_nan_is_refused(tmp_path, npz_dataset):
    prior = load_prior("random:resnet18", input_size=32)
    with torch.no_grad():
        prior.model.backbone.conv1.weight.fill_(float("nan"))
    with pytest.raises(RelaError, match="NaN/inf features for sample 0"):
        convert(npz_dataset, prior, out=tmp_path / "s", **SMALL)


# --- kill and resume -----------------------------------------------------------------------

CLI_ARGS = ["--prior", "random:resnet18", "--input-size", "32", "--dim", "16",
            "--batch-size", "32", "--chunk-rows", "64", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import smooth_image

    d = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(3)
    np.savez(d / "data.npz", images=np.stack([smooth_image(rng, 28, 28) for _ in range(300)]))
    r = run_cli("convert", "--data", str(d / "data.npz"), "--out", str(d / "ref"), *CLI_ARGS)
    assert r.returncode == 0, r.stderr
    return d


def _same_store(a, b):
    for name in ("targets.npy", "pca.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):  # when and how long: the only fields a resumed run may differ in
        m.pop("created"), m.pop("cost"), m["targets_file"].pop("mtime_ns")
    assert ma == mb


@pytest.mark.parametrize("point", ["chunk-written:2", "before-journal:3", "targets-written", "before-manifest"])
def test_sigkill_then_resume_is_bit_identical(reference, point):
    out = reference / f"killed-{point.replace(':', '-')}"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    r = run_cli(*args, env={"RELA_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="unfinished"):
        TargetStore.open(out)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    _same_store(out, reference / "ref")
    assert not (out / ".convert").exists()


def test_external_sigkill_mid_extraction_then_resume(reference):
    def args(out):
        return ["convert", "--data", str(reference / "data.npz"), "--out", str(out),
                "--prior", "random:resnet18", "--input-size", "32", "--dim", "16",
                "--batch-size", "8", "--chunk-rows", "16", "--workers", "0", "--quiet"]

    out = reference / "killed-external"
    proc = subprocess.Popen([sys.executable, "-m", "rela", *args(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".convert" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not (out / "manifest.json").exists()
    r = run_cli(*args(out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    # Another batch size than the reference: compare with an uninterrupted run of this same job.
    r = run_cli(*args(reference / "ref-b8"))
    assert r.returncode == 0, r.stderr
    _same_store(out, reference / "ref-b8")


def test_resume_with_other_settings_is_refused(reference):
    out = reference / "killed-other"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    assert run_cli(*args, env={"RELA_CRASH_AT": "chunk-written:1"}).returncode == -signal.SIGKILL
    other = [a if a != "random:resnet18" else "random:resnet34" for a in args]
    r = run_cli(*other)
    assert r.returncode == 2 and "interrupted conversion with a different prior" in r.stderr


def test_killed_subprocess_leaves_journal_chunks_only(reference):
    out = reference / "killed-journal"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    assert run_cli(*args, env={"RELA_CRASH_AT": "chunk-written:2"}).returncode == -signal.SIGKILL
    lines = (out / ".convert" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(ln)["chunk"] for ln in lines] == [0, 1]
    assert sorted(p.name for p in (out / ".convert" / "chunks").iterdir()) == ["000000.npz", "000001.npz"]
    assert os.listdir(out) == [".convert"]


def test_bad_inputs_through_the_cli(tmp_path, npz_dataset):
    cases = [
        (["--data", str(tmp_path / "missing"), "--prior", "random:resnet18"], "does not exist"),
        (["--data", str(npz_dataset), "--prior", "nonsense"], "unknown prior"),
        (["--data", str(npz_dataset), "--prior", "random:resnet18", "--dim", "9999"], "out of range"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["--data", str(tmp_path / "empty"), "--prior", "random:resnet18"], "no images found"))
    for args, msg in cases:
        r = run_cli("convert", *args, "--out", str(tmp_path / "out"), "--quiet")
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_malloc_tuning_is_applied_and_can_be_turned_off():
    code = "from rela._alloc import keep_freed_memory; print(keep_freed_memory())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RELA_TUNE_MALLOC": "0"})
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


# --- one writer at a time, nothing torn ---------------------------------------------------------

def test_a_second_conversion_into_the_same_out_is_refused_while_the_first_holds_it(reference):
    """Two runs into one --out (another --dim) once left a manifest of dim 4 over targets of dim 8."""
    out = reference / "locked"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    first = subprocess.Popen([sys.executable, "-m", "rela", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "RELA_SLEEP_AT": "chunk-written=3"})
    lock = reference / ".locked.rela-lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and b"pid" in lock.read_bytes()):
        time.sleep(0.01)
    other = [a if a != "16" else "8" for a in args]  # another --dim
    r = run_cli(*other)
    # it sleeps 3 s per chunk (5 chunks): the second run starts well inside that, even on a loaded
    # machine (at 1 s a second CLI starting beside a benchmark once came after the first had finished)
    first_rc = first.wait()
    assert r.returncode == 2 and "is being written by another conversion (pid" in r.stderr, r.stderr
    assert first_rc == 0
    _same_store(out, reference / "ref")
    r = run_cli(*other)  # afterwards: a store of another dim is there, and it says so
    assert r.returncode == 2 and "already holds a different target store" in r.stderr


def test_dim_is_part_of_the_jobs_identity(reference):
    out = reference / "killed-dim"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    assert run_cli(*args, env={"RELA_CRASH_AT": "chunk-written:1"}).returncode == -signal.SIGKILL
    r = run_cli(*[a if a != "16" else "8" for a in args])
    assert r.returncode == 2 and "interrupted conversion with a different dim" in r.stderr


def test_a_torn_journal_line_is_cut_before_the_resume_appends(reference):
    out = reference / "torn"
    args = ["convert", "--data", str(reference / "data.npz"), "--out", str(out), *CLI_ARGS]
    assert run_cli(*args, env={"RELA_CRASH_AT": "chunk-written:3"}).returncode == -signal.SIGKILL
    journal = out / ".convert" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # the last record cut mid-write
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {len(lines) - 1}/" in r.stderr  # every whole record counted, once
    _same_store(out, reference / "ref")


def test_a_dim_the_samples_cannot_span_is_refused_before_the_prior_runs(tmp_path):
    # N samples, centred, span at most N - 1 axes: dim = N keeps a component with no variance
    from rela.data.datasets import ArrayDataset

    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (8, 10, 10, 3), dtype=np.uint8), np.zeros(8, np.int64))
    with pytest.raises(RelaError, match=r"--dim 8 cannot be fitted from 8 samples: .* at most 7 principal "
                                        r"components.*use --dim 7 or less"):
        convert(ds, "random:resnet18", tmp_path / "s", dim=8, input_size=32, progress=False)
    assert not (tmp_path / "s").exists()  # refused before anything ran or was written
    assert convert(ds, "random:resnet18", tmp_path / "s", dim=7, input_size=32, progress=False).dim == 7


def test_components_without_variance_are_warned_with_the_largest_dim_that_fits(tmp_path):
    # 12 images, 3 distinct: their features span 2 axes, however many samples there are
    from rela.data.datasets import ArrayDataset
    from rela.errors import RelaWarning

    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 255, (3, 10, 10, 3), dtype=np.uint8)
    ds = ArrayDataset(distinct[np.arange(12) % 3], np.zeros(12, np.int64))
    with pytest.warns(RelaWarning, match=r"keeps 4 of its 6 components with no variance \(12 samples; smallest kept "
                                         r"eigenvalue .*The largest dim that fits this data is 2: .*--dim 2"):
        convert(ds, "random:resnet18", tmp_path / "s", dim=6, input_size=32, progress=False)
