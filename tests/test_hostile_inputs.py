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
from tests.conftest import make_folder, need_backend, run_cli, smooth_image, write_shard

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


def test_arrays_with_a_negative_label_or_no_pixels_are_refused(tmp_path):
    labels = np.arange(24) % 3
    labels[6] = -5
    np.savez(tmp_path / "d.npz", images=_GOOD, labels=labels)
    with pytest.raises(DatasetError, match="label -5 of sample 6 is negative"):
        open_dataset(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", images=np.zeros((4, 0, 8), np.uint8))
    with pytest.raises(DatasetError, match="empty"):
        open_dataset(str(tmp_path / "e.npz"))


def test_a_transformed_dataset_is_still_refused_at_construction():
    class Transformed(_Odd):
        def __getitem__(self, i):
            return torch.rand(3, 8, 8), 0

    with pytest.raises(DatasetError, match="float tensors .*without transform=") as e:
        MapDataset(Transformed())
    message = str(e.value)  # the fast path (transform as views=) is offered before the as-is one
    assert message.index("views=BYOLTransform") < message.index("views='as-is'")


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


# --- a hostile image folder -------------------------------------------------------------------

def test_a_symlink_loop_is_refused_by_name(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    (root / "class_1" / "loop").symlink_to("..")  # 6 files became 1394 samples, class 0 relabelled 1
    with pytest.raises(DatasetError, match=r"class_1/loop is a link to .*data, a folder that contains it: a loop"):
        open_dataset(str(root))
    (root / "class_1" / "loop").unlink()
    (root / "class_1" / "up").symlink_to("../..")  # a link above the dataset root loops too
    with pytest.raises(DatasetError, match="a loop"):
        open_dataset(str(root))
    (root / "class_1" / "up").unlink()
    extra = make_folder(tmp_path / "elsewhere", classes=1, per_class=2)
    (root / "class_1" / "more").symlink_to(extra / "class_0")  # not a loop: followed once
    ds = open_dataset(str(root))
    assert len(ds) == 8 and [ds.label(i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]


def test_folder_oddities_are_refused_or_said(tmp_path):
    from PIL import Image

    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    (root / "class_0" / ".ipynb_checkpoints").mkdir()  # hidden folders are not data
    Image.fromarray(smooth_image(np.random.default_rng(0), 20, 20)).save(
        root / "class_0" / ".ipynb_checkpoints" / "x.jpg"
    )
    Image.fromarray(smooth_image(np.random.default_rng(1), 20, 24)).save(root / "class_1" / "anim.gif")  # read
    (root / "class_1" / "notes.txt").write_text("not an image")
    with pytest.warns(RuntimeWarning, match=r"1 files in the class folders are not images .*class_1/notes.txt"):
        ds = open_dataset(str(root))
    names = [ds.describe(i).split("data/")[1] for i in range(len(ds))]
    assert "class_1/anim.gif" in names and not any("ipynb" in n for n in names) and len(ds) == 7
    assert ds.load(names.index("class_1/anim.gif")).shape == (20, 24, 3)
    (root / "class_9").mkdir()  # an empty class folder would shift no label here, but one before others would
    (root / "class_00").mkdir()
    with pytest.raises(DatasetError, match="class folder.*class_00, class_9 hold no images"):
        open_dataset(str(root))


def test_decode_reasons_carry_no_build_paths_or_addresses(tmp_path):
    from rela.data.datasets import ImageFolder

    root = make_folder(tmp_path / "data", classes=1, per_class=2)
    (root / "class_0" / "img_000.jpg").write_bytes(b"\xff\xd8\xff broken")  # torchvision: its source path
    (root / "class_0" / "img_001.jpg").write_bytes(b"hello" * 20)  # PIL: a BytesIO's address
    ds = ImageFolder(root)
    for i in range(2):
        with pytest.raises(CorruptImageError) as e:
            ds.load(i)
        assert e.value.reason and not any(s in str(e.value) for s in (".cpp", "/__w/", " at 0x")), str(e.value)


# --- WebDataset shards ------------------------------------------------------------------------

def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_image(np.random.default_rng(seed), 30, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_one_truncated_shard_does_not_stop_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    for s in range(2):
        items = []
        for k in range(6):
            items += [(f"s{s}/{k:04d}.jpg", _jpeg(s * 6 + k)), (f"s{s}/{k:04d}.cls", b"1")]
        write_shard(tmp_path / f"{s:06d}.tar", items)
    whole = (tmp_path / "000001.tar").read_bytes()
    cut = whole.index(_jpeg(9)) + 100  # inside sample s1/0003's image
    (tmp_path / "000001.tar").write_bytes(whole[:cut])
    spec = str(tmp_path / "{000000..000001}.tar")
    for _attempt in range(2):  # the second open reads the cached index and warns again
        with pytest.warns(RuntimeWarning, match="000001.tar is truncated"):
            ds = open_dataset(spec)
    assert len(ds) == 10  # shard 0's six, and shard 1's first four (the fourth cut short)
    with pytest.raises(CorruptImageError, match=r"s1/0003.jpg\).*truncated"):
        ds.load(9)
    for workers in (0, 2):
        with pytest.warns(RuntimeWarning, match="1 undecodable"):
            batches = list(Loader(ds, 2, image_size=16, shuffle=False, num_workers=workers, on_error="skip",
                                  drop_last=False))
        assert 9 not in torch.cat([b["index"] for b in batches]).tolist()


def test_a_bad_class_member_is_a_corrupt_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    write_shard(tmp_path / "000000.tar", [("a.jpg", _jpeg(0)), ("a.cls", b"cat"), ("b.jpg", _jpeg(1)), ("b.cls", b"-5"),
                                     ("c.jpg", _jpeg(2)), ("c.cls", b"2")])
    ds = open_dataset(str(tmp_path / "000000.tar"))
    for i in (0, 1):
        with pytest.raises(CorruptImageError, match="not a class index"):
            ds.load(i)
    with pytest.warns(RuntimeWarning, match="2 undecodable"):  # the JPEG fast path must not take them either
        batch, = list(Loader(ds, 3, image_size=16, shuffle=False, num_workers=0, on_error="skip"))
    assert batch["label"].tolist() == [2, 2, 2] and batch["index"].tolist() == [2, 2, 2]


# --- rela train on a folder with a corrupt image ----------------------------------------------

def test_rela_train_skips_corrupt_images_when_asked(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=2, per_class=12)
    (root / "class_1" / "img_005.jpg").write_bytes(b"\xff\xd8\xff broken")
    args = ("train", "--data", str(root), "--prior", "random:resnet18", "--dim", "8", "--epochs", "2",
            "--batch-size", "8", "--image-size", "16", "--width", "0.125", "--workers", "0", "--phase", "fixed:0.5",
            "--test-data", str(root), "--quiet", "--out", str(tmp_path / "run"))
    line = _one_line_error(run_cli(*args), "img_005.jpg", "--skip-corrupt")
    assert "Unsupported marker" in line and ".cpp" not in line
    r = run_cli(*args, "--skip-corrupt")  # the same command, resumed: the conversion records it as skipped
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        f"rela: warning: rela.Loader: 1 undecodable samples were replaced this epoch (first: index 17, "
        f"{root}/class_1/img_005.jpg); see loader.skipped"]  # the switch probe's pass, said once, one line
    import json

    assert json.loads((tmp_path / "run" / "store" / "manifest.json").read_text())["skipped"] == [17]
    r = run_cli("eval", str(tmp_path / "run"), "--json", "--quiet")  # eval follows the run's setting
    assert r.returncode == 0 and json.loads(r.stdout)["train_samples"] == 23, r.stderr[-2000:]


# --- crafted JPEGs through every path (item: memory-safe decoding) ----------------------------

def test_the_jpeg_fuzz_corpus_gives_rows_or_refusals_and_the_same_pixels_twice():
    """3,000 mutated JPEGs (parser disagreements, empty and huge frames, cut, spliced) through the
    header read, the box drawing and the C++ decoder as the Loader calls them (tests/fuzz_jpeg.py;
    `make asan` runs the same corpus under AddressSanitizer). In its own process: a crash fails here."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-m", "tests.fuzz_jpeg", "--count", "3000"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    if "skipped" in counts:
        pytest.skip(counts["skipped"])
    assert counts["files"] == 3000 and counts["nondeterministic"] == 0
    assert counts["refused_by_header"] + counts["rows"] + counts["decoder_errors"] == 3000
    assert min(counts["refused_by_header"], counts["rows"], counts["decoder_errors"], counts["wrong_size_rows"],
               counts["wrong_size_refused"]) > 50  # every outcome is exercised


def _hostile_folder(root):
    """12 good JPEGs and 5 crafted ones: a fake frame header (TEM + a fake SOF), an empty frame, a
    bomb behind a junk byte, a dangling link and a two-link cycle."""
    from tests.conftest import jpeg_bytes, junk_before_sof, tem_fake_sof, with_frame_size

    make_folder(root, classes=2, per_class=6)
    d = root / "class_0"
    (d / "z_tem.jpg").write_bytes(tem_fake_sof(jpeg_bytes(96, 64, seed=3), 9000, 9000))  # decodes: a real image
    (d / "z_zero.jpg").write_bytes(with_frame_size(jpeg_bytes(40, 40), 40, 0))
    (d / "z_bomb.jpg").write_bytes(junk_before_sof(with_frame_size(jpeg_bytes(40, 40), 10016, 10016)))
    (d / "z_gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "class_1" / "z_loop.jpg").symlink_to(root / "class_1" / "z_loop2.jpg")
    (root / "class_1" / "z_loop2.jpg").symlink_to(root / "class_1" / "z_loop.jpg")
    return root


_HOSTILE = {"z_zero.jpg", "z_bomb.jpg", "z_gone.jpg", "z_loop.jpg", "z_loop2.jpg"}


@pytest.mark.usefixtures("collect_backend_garbage")
@pytest.mark.parametrize("backend,kind", [("torch", "thread"), ("torch", "process"), ("ffcv", "thread"),
                                          ("dali", "thread")])
def test_crafted_images_are_skipped_or_one_clean_error_in_every_backend(tmp_path, monkeypatch, backend, kind):
    from rela.data.datasets import ImageFolder

    need_backend(backend)
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    ds = ImageFolder(_hostile_folder(tmp_path / "f"))
    bad = {i for i in range(len(ds)) if ds.path(i).name in _HOSTILE}
    kw = dict(image_size=16, shuffle=False, num_workers=2, worker_type=kind, backend=backend, seed=0)
    if backend == "ffcv":  # FFCV draws its random crops from its own unseeded stream: compare centre crops
        from rela.loading.views import eval_view

        kw["views"] = [eval_view(16)]
    assert len(ds) == 18  # three batches of 6: every sample is visited
    with pytest.raises(CorruptImageError) as e:
        list(Loader(ds, 6, **kw))
    assert "\n" not in str(e.value) and "on_error='skip'" in str(e.value)
    loader = Loader(ds, 6, on_error="skip", **kw)
    runs = []
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="undecodable samples were replaced"):
            runs.append(list(loader))
        loader.set_epoch(0)
    assert {r[0] for r in loader.skipped} == bad
    index = torch.cat([b["index"] for b in runs[0]]).tolist()
    assert len(index) == len(ds) and not set(index) & bad
    for a, b in zip(*runs, strict=True):  # the same pixels on a second pass: no heap bytes in a batch
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))


def test_crafted_images_are_skipped_by_convert_train_and_eval(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    root = _hostile_folder(tmp_path / "f")
    store = tmp_path / "store"
    common = ("--prior", "random:resnet18", "--dim", "4", "--input-size", "32", "--workers", "0")
    line = _one_line_error(run_cli("convert", "--data", str(root), "--out", str(store), *common, "--quiet"), "z_",
                           "--skip-corrupt")
    assert "Traceback" not in line
    r = run_cli("convert", "--data", str(root), "--out", str(store), *common, "--skip-corrupt", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((store / "manifest.json").read_text())["skipped"]) == len(_HOSTILE)
    args = ("train", "--data", str(root), "--no-rela", "--epochs", "1", "--batch-size", "8", "--image-size", "16",
            "--width", "0.125", "--workers", "0", "--test-data", str(root), "--quiet", "--out", str(tmp_path / "run"))
    _one_line_error(run_cli(*args), "z_", "--skip-corrupt")
    r = run_cli(*args, "--skip-corrupt")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli("eval", str(tmp_path / "run"), "--json", "--quiet", "--skip-corrupt")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["train_samples"] == 13  # the fake-header file is a real image


# --- every argument checked once, where it is declared ------------------------------------------

_CLI_BAD = [
    (("convert", "--workers", "-1"), "--workers must be in [0, 256]"),
    (("convert", "--input-size", "100000"), "--input-size must be in [8, 2048]"),
    (("convert", "--device", "bogus"), "--device 'bogus' is not one of auto | cpu | cuda[:N] | mps"),
    (("train", "--workers", "-1"), "--workers must be in [0, 256]"),
    (("train", "--lr", "nan"), "--lr must be in (0, inf), got nan"),
    (("train", "--lr", "-1"), "--lr must be in (0, inf)"),
    (("train", "--weight-decay", "nan"), "--weight-decay must be in [0, 10]"),
    (("train", "--warmup-epochs", "nan"), "--warmup-epochs must be in [0, inf)"),
    (("train", "--momentum", "2"), "--momentum must be in [0, 1]"),
    (("train", "--device", "bogus"), "--device 'bogus'"),
    (("train", "--prior-input-size", "100000"), "--prior-input-size must be in [8, 2048]"),
]


@pytest.mark.parametrize("args,needle", _CLI_BAD, ids=[" ".join(a) for a, _ in _CLI_BAD])
def test_out_of_range_flags_are_one_line_errors(tmp_path, args, needle):
    common = {"convert": ("--data", "fashion-mnist", "--limit", "10", "--prior", "random:resnet18", "--out",
                          str(tmp_path / "s"), "--quiet"),
              "train": ("--out", str(tmp_path / "r"), "--quiet")}[args[0]]
    _one_line_error(run_cli(args[0], *common, *args[1:]), needle)


def test_a_garbage_timm_weights_file_is_a_one_line_error(tmp_path):
    pytest.importorskip("timm")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"garbage, not a weights file")
    _one_line_error(run_cli("convert", "--data", "fashion-mnist", "--limit", "10", "--prior", "timm:resnet18",
                            "--weights", str(weights), "--out", str(tmp_path / "s"), "--quiet"),
                    str(weights), "not a weights file")


_NAN = float("nan")
_PY_BAD = [
    ({"prefetch_factor": 0, "num_workers": 1}, "prefetch_factor must be an integer >= 1"),
    ({"timeout": -1}, "timeout must be a number of seconds >= 0"),
    ({"world_size": 0}, "world_size must be an integer >= 1"),
    ({"rank": 2, "world_size": 2}, "rank must be an integer in [0, 1]"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ({"num_workers": -1, "worker_type": "thread"}, "num_workers must be an integer in [0, 256]"),  # hung forever
    ({"std": (0, 0, 0)}, "std must be three finite numbers > 0"),
    ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
    ({"mean": (_NAN, 0.5, 0.5)}, "mean must be 3 finite numbers"),
    ({"views": "rela,ratio=0:1"}, "crop ratio must satisfy 0 < lo"),
    ({"views": "rela,flip=5"}, "flip must be a number in [0, 1]"),
    ({"views": "byol,jitter_p=-0.5"}, "jitter_p must be a number in [0, 1]"),
    ({"views": "byol,blur_sigma=-1:2"}, "blur_sigma must satisfy 0 < lo"),
]


@pytest.mark.parametrize("kw,needle", _PY_BAD, ids=[str(k) for k, _ in _PY_BAD])
def test_out_of_range_loader_arguments_are_refused_in_one_line(kw, needle):
    from rela.data.datasets import ArrayDataset

    ds = ArrayDataset(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int64))
    kw = dict(kw)
    batch_size = kw.pop("batch_size", 2)
    with pytest.raises(RelaError) as e:
        Loader(ds, batch_size, image_size=8, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_set_epoch_and_convert_refuse_out_of_range_values(tmp_path):
    from rela import convert
    from rela.data.datasets import ArrayDataset

    ds = ArrayDataset(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int64))
    with pytest.raises(RelaError, match="epoch must be an integer >= 0"):
        Loader(ds, 2, image_size=8).set_epoch(-1)
    with pytest.raises(RelaError, match="--workers must be in"):
        convert(ds, "random:resnet18", tmp_path / "s", dim=4, num_workers=-1, progress=False)


@pytest.mark.parametrize(
    "skipped,needle", [([-1], r"lists \[-1\]"), ([1000], r"lists \[1000\]"), (["x"], "sample indices")]
)
def test_a_manifest_skipped_list_is_checked_when_the_store_opens(tmp_path, skipped, needle):
    import json

    from rela import convert
    from rela.data.datasets import ArrayDataset
    from rela.data.store import TargetStore
    from rela.errors import StoreError

    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8), np.zeros(24, np.int64))
    store = convert(ds, "random:resnet18", tmp_path / "s", dim=4, input_size=32, progress=False)
    m = json.loads((store.path / "manifest.json").read_text())
    (store.path / "manifest.json").write_text(json.dumps({**m, "skipped": skipped}))
    with pytest.raises(StoreError, match=needle):
        TargetStore.open(store.path)


# --- EXIF orientation: an explicit choice ---------------------------------------------------

def _phone_photos(root):
    """JPEGs stored 48 wide × 32 tall, red left and blue right, tagged EXIF orientation 6 (turn 90°
    clockwise to view): upright they are 32 × 48, red on top."""
    from PIL import Image

    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :24, 0] = 255
    img[:, 24:, 2] = 255
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(img).save(root / f"c{c}" / f"p{i}.jpg", quality=95, exif=exif)
    return root


@pytest.mark.usefixtures("collect_backend_garbage")
@pytest.mark.parametrize("backend,kind", [("torch", "thread"), ("torch", "process"), ("ffcv", "thread"),
                                          ("dali", "thread")])
def test_exif_orientation_is_applied_only_when_asked_in_every_backend(tmp_path, monkeypatch, backend, kind):
    from rela.loading.views import eval_view

    need_backend(backend)
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    root = _phone_photos(tmp_path / "photos")
    kw = dict(image_size=16, views=[eval_view(16)], shuffle=False, num_workers=2, worker_type=kind, backend=backend)

    def red_minus_blue(exif_transpose):
        x = torch.cat([b["views"][0] for b in Loader(str(root), 4, exif_transpose=exif_transpose, **kw)])
        rb = x[:, 0] - x[:, 2]  # [N, H, W]
        return rb[:, :8].mean().item(), rb[:, 8:].mean().item(), rb[:, :, :8].mean().item(), rb[:, :, 8:].mean().item()

    top, bottom, left, right = red_minus_blue(True)
    assert top > 1 and bottom < -1 and abs(left - right) < 0.5  # upright: red on top
    top, bottom, left, right = red_minus_blue(False)  # the default, as torchvision: as stored
    assert left > 1 and right < -1 and abs(top - bottom) < 0.5


def test_exif_transpose_is_a_flag_of_convert_and_train(tmp_path):
    import json

    from rela.data.datasets import open_dataset

    root = _phone_photos(tmp_path / "photos")
    assert open_dataset(str(root), exif_transpose=True).load(0).shape == (48, 32, 3)
    assert open_dataset(str(root)).load(0).shape == (32, 48, 3)
    r = run_cli("convert", "--data", str(root), "--prior", "random:resnet18", "--dim", "4", "--input-size", "32",
                "--workers", "0", "--exif-transpose", "--quiet", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["dataset"]["kind"].endswith("+exif-transpose")
    for cmd in ("convert", "train"):
        assert "--exif-transpose" in run_cli(cmd, "--help").stdout
