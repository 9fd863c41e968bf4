"""The held-out run's bad inputs (a hostile folder, odd user datasets, a broken environment): each
gets a one-line error naming the file, index or argument, or a counted skip — never a raw
traceback, a hang, silent garbage or lost work."""

import os

import numpy as np
import pytest
import torch

from rela import Loader
from rela.data.datasets import MapDataset, open_dataset
from rela.errors import CorruptImageError, DatasetError, RelaError
from tests.conftest import run_cli, smooth_image

# --- odd items from a user's map-style dataset ------------------------------------------------

_GOOD = np.stack([smooth_image(np.random.default_rng(i), 20, 20) for i in range(24)])
# index -> (image, label) of an item rela can't read; the rest are good
_BAD = {
    3: (None, 0),
    5: (np.zeros((20, 20, 2), np.uint8), 0),  # two channels
    7: (np.zeros((20, 20, 3), np.float32), 0),  # float pixels
    9: (np.zeros((0, 20, 3), np.uint8), 0),  # zero-sized (was a raw ZeroDivisionError)
    11: (_GOOD[11], "cat"),  # not a class index
    13: (_GOOD[13], -5),  # negative
    15: (_GOOD[15], 2.5),  # not an integer
}


class _Odd(torch.utils.data.Dataset):
    def __len__(self):
        return len(_GOOD)

    def __getitem__(self, i):
        return _BAD.get(i, (_GOOD[i], i % 3))


@pytest.mark.parametrize("index", sorted(_BAD))
def test_each_odd_item_is_a_corrupt_sample_with_its_index(index):
    ds = MapDataset(_Odd())
    with pytest.raises(CorruptImageError) as e:
        ds.load(index)
    assert e.value.index == index and f"sample {index} " in str(e.value) and "\n" not in str(e.value)
    assert "transform" not in str(e.value) or index == 7  # None no longer blames a transform


@pytest.mark.parametrize("workers,kind", [(0, "process"), (2, "process"), (2, "thread")])
def test_odd_items_are_skipped_and_counted_or_raise_cleanly(workers, kind):
    loader = Loader(_Odd(), 4, image_size=16, shuffle=False, num_workers=workers, worker_type=kind, on_error="skip")
    with pytest.warns(RuntimeWarning, match=f"{len(_BAD)} undecodable samples were replaced"):
        batches = list(loader)
    assert sorted(r[0] for r in loader.skipped) == sorted(_BAD)
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert not set(index) & set(_BAD)
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert labels == [i % 3 for i in index]
    with pytest.raises(CorruptImageError) as e:  # raise: the first bad one, as rela's one-line error
        list(Loader(_Odd(), 4, image_size=16, shuffle=False, num_workers=workers, worker_type=kind))
    assert e.value.index == 3 and "on_error='skip'" in str(e.value) and "Traceback" not in str(e.value)


def test_a_label_column_with_a_bad_label_is_skippable():
    datasets = __import__("datasets") if os.environ.get("CI") else pytest.importorskip("datasets")
    labels = [i % 3 for i in range(12)]
    labels[4] = -5
    from PIL import Image

    hf = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in _GOOD[:12]], "label": labels})
    hf = hf.cast_column("image", datasets.Image())
    ds = open_dataset(hf)
    with pytest.raises(CorruptImageError, match="sample 4 .*label -5 is negative"):
        ds.load(4)
    with pytest.warns(RuntimeWarning, match="1 undecodable"):
        got = list(Loader(hf, 4, image_size=16, shuffle=False, num_workers=0, on_error="skip"))
    assert 4 not in torch.cat([b["index"] for b in got]).tolist()


def test_a_transformed_dataset_is_still_refused_at_construction():
    class Transformed(_Odd):
        def __getitem__(self, i):
            return torch.rand(3, 8, 8), 0

    with pytest.raises(DatasetError, match="float tensors .*without transform="):
        MapDataset(Transformed())


def test_errors_raised_in_worker_processes_arrive_as_relas_own():
    """A non-skippable error inside a worker process (here: as-is views of two sizes in one
    batch) reaches the loop as rela's one-line error, not wrapped in torch's worker traceback."""

    class TwoSizes(_Odd):
        def __getitem__(self, i):
            return torch.zeros(3, 8 + i % 2, 8), 0

    with pytest.raises(RelaError) as e:
        list(Loader(TwoSizes(), 4, views="as-is", num_workers=2))
    assert "differ in view count, shape" in str(e.value)
    assert "Caught" not in str(e.value) and "Traceback" not in str(e.value)


# --- the environment: read-only folders, a full disk, a missing run ------------------------------

@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (a real read-only or full file system). Needs
    root (CI and the project's machines run as root); skipped where mounting is not allowed."""
    import subprocess

    mounted = []

    def mount(options: str):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _one_line_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rela: error: "), r.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


_CONVERT = ("convert", "--data", "fashion-mnist", "--limit", "2000", "--prior", "random:resnet18", "--dim", "8",
            "--input-size", "32", "--chunk-rows", "256", "--workers", "0", "--quiet")


def test_out_in_a_read_only_folder_is_one_line(tmp_path, mount_tmpfs):
    ro = mount_tmpfs("ro,size=1m")
    _one_line_error(run_cli(*_CONVERT, "--out", str(ro / "store")), str(ro / "store"), "read-only")
    _one_line_error(run_cli("train", "--data", "fashion-mnist", "--limit", "64", "--epochs", "1", "--quiet",
                            "--out", str(ro / "run")), str(ro / "run"), "read-only")
    (tmp_path / "file").write_text("x")
    _one_line_error(run_cli(*_CONVERT, "--out", str(tmp_path / "file" / "store")), "is a file, not a folder")


def test_a_full_disk_during_conversion_loses_nothing(tmp_path, mount_tmpfs):
    disk = mount_tmpfs("size=300k")  # less than the first chunk of raw features
    line = _one_line_error(run_cli(*_CONVERT, "--out", str(disk / "store")), "No space left", "rerun the same command")
    assert str(disk / "store") in line
    left = sorted(p.name for p in (disk / "store").rglob("*"))
    assert "manifest.json" not in left and not [n for n in left if n.endswith(".tmp")], left
    import subprocess

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed: rerun
    assert run_cli(*_CONVERT, "--out", str(disk / "store")).returncode == 0
    assert run_cli(*_CONVERT, "--out", str(tmp_path / "ref")).returncode == 0
    assert (disk / "store" / "targets.npy").read_bytes() == (tmp_path / "ref" / "targets.npy").read_bytes()


def test_eval_of_a_missing_or_unfinished_run_is_one_line(tmp_path):
    _one_line_error(run_cli("eval", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("eval", str(tmp_path / "empty")), "not a run directory")


def test_nan_in_targets_is_refused_when_the_store_opens(tmp_path, npz_dataset):
    from rela import convert
    from rela.data.store import TargetStore
    from rela.errors import StoreError

    store = convert(str(npz_dataset), "random:resnet18", tmp_path / "s", dim=4, input_size=32, progress=False)
    assert TargetStore.open(store.path).dim == 4  # as written: opens without a scan
    targets = np.load(store.path / "targets.npy", mmap_mode="r+")
    targets[17, 2] = np.nan
    targets.flush()
    del targets
    with pytest.raises(StoreError, match=r"NaN or inf .*row 17.*--overwrite"):
        TargetStore.open(store.path)
    with pytest.raises(StoreError, match="row 17"):
        Loader(str(npz_dataset), 8, targets=store.path)
    _one_line_error(run_cli("info", str(store.path)), "row 17")
