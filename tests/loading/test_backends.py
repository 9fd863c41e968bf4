"""The dali and ffcv backends against the torch one: same batches, same eval pixels, intended
random-view statistics, determinism, view switching, bad input, no leaked threads."""

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from rela import Loader, registry
from rela.data.datasets import ArrayDataset, ImageFolder
from rela.errors import CorruptImageError, RelaError
from rela.loading.views import ViewSpec, byol_views, eval_view
from tests.conftest import make_folder, need_backend


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))  # .beton files per test


@pytest.fixture
def folder(tmp_path):
    return ImageFolder(make_folder(tmp_path / "imgs", classes=2, per_class=6))

# every registered backend but the reference one (rela.registry.BACKENDS): a new backend joins these tests
OTHERS = [name for name in registry.BACKENDS if name != "torch"]


def _ramps(n: int = 96, size: int = 64) -> ArrayDataset:
    """R rises left → right and G top → bottom: a crop's extent and flip can be read off its pixels."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), np.full_like(x, 128)], -1).astype(np.uint8)
    return ArrayDataset(np.repeat(img[None], n, 0), np.arange(n) % 3, name="ramps")


def _epoch(loader):
    return list(loader)


@pytest.mark.parametrize("backend", OTHERS)
def test_eval_view_pixels_match_the_torch_backend(folder, backend):
    need_backend(backend)
    ref = _epoch(Loader(folder, 4, views="eval", image_size=24, shuffle=False, drop_last=False, num_workers=1))
    got = _epoch(Loader(folder, 4, views="eval", image_size=24, shuffle=False, drop_last=False, num_workers=1,
                        backend=backend))
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got, strict=True):
        assert sorted(a) == sorted(b)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert b["views"][0].dtype == torch.float32 and b["views"][0].shape == a["views"][0].shape
        diff = (a["views"][0] - b["views"][0]).abs()
        # Normalised units (1 grey level ≈ 0.017): DALI resamples the same decode with the same
        # filter; FFCV re-encodes the JPEG (q95) and resizes with OpenCV's INTER_AREA.
        assert diff.mean() < (0.02 if backend == "dali" else 0.1), diff.mean()


@pytest.mark.parametrize("backend", list(registry.BACKENDS))
def test_random_views_have_the_intended_statistics(backend):
    need_backend(backend)
    spec = ViewSpec(32, scale=(0.25, 1.0), flip=0.5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    loader = Loader(_ramps(), 32, views=[spec], num_workers=1, backend=backend)
    x = torch.cat([b["views"][0] for b in loader])  # [N, 3, 32, 32] in [0, 1]
    r, g = x[:, 0], x[:, 1]
    width = (r[:, :, -1] - r[:, :, 0]).mean(1).abs() * 32 / 31  # crop width / image width
    height = (g[:, -1, :] - g[:, 0, :]).mean(1) * 32 / 31
    area = width * height
    assert area.min() > 0.25 - 0.05 and area.max() < 1.0 + 0.05, (area.min(), area.max())
    assert area.min() < 0.45 and area.max() > 0.8  # the range is used, not one fixed scale
    flips = (r[:, :, -1] < r[:, :, 0]).float().mean(1) > 0.5
    assert 0.3 < flips.float().mean() < 0.7, flips.float().mean()


@pytest.mark.parametrize("backend", OTHERS)
def test_same_batch_structure_and_targets(tmp_path, folder, backend):
    need_backend(backend)
    from rela import convert

    store = convert(folder, "random:resnet18", tmp_path / "store", dim=4, input_size=32)
    b = next(iter(Loader(folder, 4, targets=store, views="rela", image_size=16, num_workers=1, backend=backend)))
    assert set(b) == {"views", "target", "label", "index"}
    assert len(b["views"]) == 2 and all(v.shape == (4, 3, 16, 16) for v in b["views"])
    assert torch.equal(b["target"], torch.from_numpy(store[b["index"].numpy()]))
    assert torch.equal(b["label"], torch.tensor([folder.label(i) for i in b["index"].tolist()]))


def test_dali_builds_views_with_a_colour_op_it_lacks_through_rela_s_kernel(folder, monkeypatch):
    """An op added to ColourParams before DALI implements it: DALI's batches of such views are
    the torch backend's, pixel for pixel (the same draws), not silently missing the op."""
    need_backend("dali")
    from rela.loading.backends import dali

    monkeypatch.setattr(dali, "DALI_OPS", ("gray", "sigma"))  # as if solarize were new
    views = [dataclasses.replace(v, solarize_p=1.0) for v in byol_views(16)]
    assert not dali.runs_in_dali(tuple(views)) and dali.runs_in_dali(tuple(byol_views(16)[:1]))
    kw = dict(views=views, num_workers=1, seed=3, shuffle=False)
    ours = next(iter(Loader(folder, 4, backend="dali", **kw)))
    ref = next(iter(Loader(folder, 4, backend="torch", **kw)))
    assert all(torch.equal(a, b) for a, b in zip(ours["views"], ref["views"], strict=True))


def test_dali_views_are_deterministic_and_resume_exactly(folder):
    need_backend("dali")

    def make():
        return Loader(folder, 4, views=list(byol_views(16, blur=True)), num_workers=1, backend="dali", seed=3)

    full = _epoch(make())
    assert torch.equal(full[0]["views"][1], _epoch(make())[0]["views"][1])
    first = make()
    it = iter(first)
    next(it)
    state = first.state_dict()
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest, strict=True):
        assert torch.equal(a["index"], b["index"]) and all(
            torch.equal(u, v) for u, v in zip(a["views"], b["views"], strict=True)
        )


@pytest.mark.parametrize("backend", OTHERS)
def test_set_views_takes_effect_at_the_next_batch(backend):
    need_backend(backend)
    loader = Loader(_ramps(48), 8, views="rela", image_size=16, num_workers=1, backend=backend)
    it = iter(loader)
    assert len(next(it)["views"]) == 2
    loader.set_views([eval_view(12)])
    rest = list(it)
    assert rest and all(len(b["views"]) == 1 and b["views"][0].shape[-1] == 12 for b in rest)


@pytest.mark.parametrize("backend", OTHERS)
def test_corrupt_images_raise_or_are_skipped(tmp_path, backend):
    need_backend(backend)
    root = make_folder(tmp_path / "bad", classes=1, per_class=12)
    p = root / "class_0" / "img_005.jpg"
    p.write_bytes(p.read_bytes()[:300])  # a sane header, truncated data: the decoder itself fails
    (root / "class_0" / "img_008.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="img_005.jpg"):
        _epoch(Loader(ImageFolder(root), 4, image_size=16, shuffle=False, num_workers=1, backend=backend))
    loader = Loader(ImageFolder(root), 4, image_size=16, shuffle=False, num_workers=1, backend=backend,
                    on_error="skip")
    with pytest.warns(RuntimeWarning, match="2 undecodable samples"):
        idx = sum((b["index"].tolist() for b in loader), [])
    assert len(idx) == 12 and 5 not in idx and 8 not in idx


def test_ffcv_batches_held_by_the_loop_are_never_overwritten(tmp_path):
    """FFCV rotates batches_ahead + 2 output buffers; rela's batches are the user's: a loop that
    keeps every batch of a pass (more batches than FFCV has buffers) sees each one as it came,
    in either memory format (FFCV's HWC normalise for channels_last, the planar one otherwise:
    the same lookup table, so the same values)."""
    need_backend("ffcv")
    data = ImageFolder(make_folder(tmp_path / "imgs", classes=2, per_class=48))
    kw = dict(views="eval", image_size=16, shuffle=False, drop_last=False, num_workers=1)
    ref = _epoch(Loader(data, 4, **kw))
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = _epoch(Loader(data, 4, backend="ffcv", memory_format=fmt, **kw))
        assert len(got) == len(ref) == 24
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a["index"], b["index"])
            assert b["views"][0].is_contiguous(memory_format=fmt)
            assert (a["views"][0] - b["views"][0]).abs().mean() < 0.1  # as test_eval_view_pixels_…
        if fmt is torch.contiguous_format:
            planar = got
    for a, b in zip(planar, got, strict=True):
        assert torch.equal(a["views"][0], b["views"][0])
    coloured = _epoch(Loader(_ramps(96), 4, views="rela", image_size=16, num_workers=1, backend="ffcv"))
    ptrs = {v.data_ptr() for b in coloured for v in b["views"]}
    assert len(ptrs) == 2 * len(coloured)  # every view of every batch in memory of its own


def test_ffcv_iterators_do_not_leak_threads():
    need_backend("ffcv")
    loader = Loader(_ramps(64), 8, views="eval", image_size=16, num_workers=1, backend="ffcv")
    _epoch(loader)  # compile and write the .beton first
    before = threading.active_count()
    for _ in range(3):
        it = iter(loader)
        next(it)
        it.close()  # a loop that breaks early
    assert threading.active_count() <= before + 1


def test_unknown_backend_is_refused(folder):
    with pytest.raises(RelaError, match="unknown backend 'tf'"):
        Loader(folder, 4, image_size=16, backend="tf")


def test_auto_picks_the_torch_backend_on_the_cpu(folder):
    # Measured fastest here (bench/loader.py); on CUDA devices auto prefers DALI's GPU decode.
    assert Loader(folder, 4, image_size=16, backend="auto").backend == "torch"


pytestmark = pytest.mark.usefixtures("collect_backend_garbage")


def _webdataset(root):
    """Two WebDataset shards of JPEGs (key.jpg + key.cls)."""
    import io
    import tarfile

    from PIL import Image

    from tests.conftest import smooth_image

    rng = np.random.default_rng(0)
    root.mkdir()
    for s in range(2):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for k in range(5):
                buf = io.BytesIO()
                Image.fromarray(smooth_image(rng, 30, 40)).save(buf, format="JPEG")
                for name, data in ((f"{s}_{k}.jpg", buf.getvalue()), (f"{s}_{k}.cls", str(k % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / "{000000..000001}.tar")


class _Photos(torch.utils.data.Dataset):
    """A user's own map-style dataset: (PIL image, label) items of smooth, photo-like pixels."""

    def __init__(self) -> None:
        from tests.conftest import smooth_image

        rng = np.random.default_rng(1)
        self.images = [smooth_image(rng, 30, 40) for _ in range(10)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.images[i]), i % 2


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("kind", ["map-dataset", "webdataset"])
def test_dataset_objects_and_shards_through_every_backend(tmp_path, backend, kind):
    """A dataset object and WebDataset shards give the torch backend's batches."""
    need_backend(backend)
    data = _Photos() if kind == "map-dataset" else _webdataset(tmp_path / "shards")
    kw = dict(views="eval", image_size=24, shuffle=False, drop_last=False, num_workers=1)
    ref, got = list(Loader(data, 4, **kw)), list(Loader(data, 4, backend=backend, **kw))
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        diff = (a["views"][0] - b["views"][0]).abs()
        assert diff.mean() < (0.02 if backend == "dali" else 0.1), diff.mean()  # as test_eval_view_pixels_…
    epoch = [Loader(data, 4, views="rela", image_size=24, num_workers=1, backend=backend, seed=s) for s in (0, 0)]
    a, b = (torch.cat([x["index"] for x in e]) for e in epoch)
    assert torch.equal(a, b) and len(set(a.tolist())) == len(a)


def test_a_cached_beton_is_used_only_when_this_data_and_these_options_wrote_it(tmp_path, monkeypatch):
    """The .beton cache once reused any file at the expected path."""
    need_backend("ffcv")
    from rela.loading.backends import ffcv as ffcv_backend

    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    a = ImageFolder(make_folder(tmp_path / "a", classes=2, per_class=4, seed=1))
    b = ImageFolder(make_folder(tmp_path / "b", classes=2, per_class=4, seed=2))
    path = ffcv_backend.write_beton(a)
    stamp = path.stat().st_ino, path.stat().st_mtime_ns
    assert ffcv_backend.write_beton(a) == path and (path.stat().st_ino, path.stat().st_mtime_ns) == stamp  # reused
    other = ffcv_backend.write_beton(b)
    path.unlink()
    os.link(other, path)  # another data set's .beton planted at a's name
    assert ffcv_backend.write_beton(a) == path and path.stat().st_ino != other.stat().st_ino  # written anew
    kw = dict(image_size=16, shuffle=False, num_workers=1, backend="ffcv", views=[eval_view(16)])
    got = torch.cat([x["views"][0] for x in Loader(a, 4, **kw)])
    want = torch.cat([x["views"][0] for x in Loader(a, 4, **{**kw, "backend": "torch"})])
    assert (got - want).abs().mean() < 0.1  # a's own pixels (q95 JPEG in the .beton), not b's


def test_ffcv_colours_through_the_torch_backends_colour_kernel(monkeypatch):
    # FFCV crops; the colour ops run in rela._C's kernel, as in the torch backend: each coloured view
    # equals the kernel's output on FFCV's crops with the drawn choices (not torchvision's ops per row)
    need_backend("ffcv")
    from rela import _ext
    from rela.loading.backends import augment
    from rela.loading.backends import ffcv as ffcv_backend

    assert _ext.has_colour_kernel()
    seen = []

    def spy(params, batch, rows, threads=1):
        before = batch.clone()
        augment.colour_rows(params, batch, rows, threads)
        seen.append((params, before, batch.clone()))

    monkeypatch.setattr(ffcv_backend, "colour_rows", spy)
    batches = _epoch(Loader(_ramps(32), 4, views="rela", image_size=16, num_workers=1, backend="ffcv", shuffle=False))
    assert len(seen) == 2 * len(batches)  # both views of every batch
    for params, before, after in seen:
        kernel = before.clone()
        _ext.colour_batch(kernel.numpy(), [_ext.pack_colour(p) for p in params], 1)
        assert torch.equal(after, kernel)
    assert any(p.gray or p.order for params, _, _ in seen for p in params)  # colour choices were drawn and run
