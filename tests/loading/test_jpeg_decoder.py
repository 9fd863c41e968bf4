"""rela._C's crop-while-decoding JPEG path against the torchvision path it replaces."""

import numpy as np
import pytest
import torch
from PIL import Image

from rela import Loader, _ext
from rela.data.datasets import ImageFolder
from rela.errors import CorruptImageError
from rela.loading.views import ViewSpec, byol_views, eval_view
from tests.conftest import smooth_image

pytestmark = pytest.mark.skipif(not _ext.has_jpeg_decoder(), reason="rela._C built without libjpeg")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "c").mkdir()
    for i in range(24):
        h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        Image.fromarray(smooth_image(rng, h, w)).save(root / "c" / f"{i:03d}.jpg", quality=90)
    return ImageFolder(root)


def _views(ds, views, fast, monkeypatch, scaled_decode=True):
    monkeypatch.setattr(_ext, "has_jpeg_decoder", lambda: fast)
    return list(Loader(ds, 8, views=views, num_workers=0, drop_last=False, seed=4, scaled_decode=scaled_decode))


@pytest.mark.parametrize("scaled_decode", [False, True])
@pytest.mark.parametrize(
    "views", [[ViewSpec(48, scale=(0.08, 1.0), flip=0.5)], list(byol_views(40, blur=True)), [eval_view(32)]]
)
def test_same_views_as_the_torchvision_path(photos, views, scaled_decode, monkeypatch):
    fast = _views(photos, views, True, monkeypatch, scaled_decode)
    slow = _views(photos, views, False, monkeypatch)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"], strict=True):
            # Same boxes, flips and colour draws; the decoded pixels are libjpeg-turbo's in both,
            # and at full resolution only the resampler differs (ours vs torchvision's antialiased
            # bilinear): about one grey level on average (normalised units: 1/255/0.225 ≈ 0.017
            # per level), a thin tail up to ~15 levels. The scaled decode (1/2, 1/4 where every
            # view's box covers 1.5x its output) adds its own: ~0.5 level on real photos
            # (bench/scaled_decode.py), on these synthetic ones at 32 px (mostly 1/4 scale) 1.8
            # levels on average with a 99th percentile of 18 levels.
            diff = (va - vb).abs()
            assert diff.mean() < (0.035 if scaled_decode else 0.02)
            assert torch.quantile(diff.flatten(), 0.99) < (0.35 if scaled_decode else 0.25)


def test_dct_downscaled_decode_matches_within_interpolation(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    Image.fromarray(smooth_image(np.random.default_rng(1), 600, 800)).save(tmp_path / "c" / "big.jpg", quality=95)
    ds = ImageFolder(tmp_path)
    spec = [ViewSpec(64, scale=(0.9, 1.0))]  # big crops → 1/2 DCT scale (keeps 2× resolution)
    monkeypatch.setattr(_ext, "has_jpeg_decoder", lambda: True)
    a = next(iter(Loader(ds, 1, views=spec, num_workers=0, drop_last=False)))["views"][0]
    monkeypatch.setattr(_ext, "has_jpeg_decoder", lambda: False)
    b = next(iter(Loader(ds, 1, views=spec, num_workers=0, drop_last=False)))["views"][0]
    assert (a - b).abs().mean() < 0.03


def test_scaled_decode_on_real_photos_stays_within_its_stated_tolerance():
    # scikit-image's photographs at their own size, RandomResizedCrop boxes: over the crops the
    # scaled decode takes, mean |difference| from the full decode under 1 grey level and the 99th
    # percentile under 8 (docs: measured 0.5-0.7 and 3-7); 224-px views of boxes under 672 px are
    # the full decode's own pixels
    import io

    import skimage.data

    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "retina", "hubble_deep_field"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(buf, "JPEG", quality=90)
        h, w = getattr(skimage.data, name)().shape[:2]
        for size in (96, 160, 224):
            side = int(rng.integers(size, min(h, w) + 1))
            boxes = np.array([[[int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, side]]],
                             np.int32)
            flips = np.zeros((1, 1), np.uint8)
            full = _ext.decode_resized_crops([buf.getvalue()], boxes, flips, size, fit=0.0)[0][0].astype(int)
            scaled = _ext.decode_resized_crops([buf.getvalue()], boxes, flips, size, fit=1.5)[0][0].astype(int)
            diff = np.abs(full - scaled)
            if side < 3 * size:  # 1.5x its output at 1/2 scale: not taken
                assert diff.max() == 0
            else:
                assert diff.mean() < 1.0 and np.percentile(diff, 99) < 8, (name, size, side)


def test_multi_size_views_take_the_fast_path_with_their_own_sizes(photos, monkeypatch):
    from rela.loading.views import dino_views

    views = list(dino_views(48, local_crops=3, local_size=24))
    fast = _views(photos, views, True, monkeypatch)
    slow = _views(photos, views, False, monkeypatch)
    calls = []
    real = _ext.decode_resized_crops
    monkeypatch.setattr(_ext, "decode_resized_crops", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _views(photos, views, True, monkeypatch)
    assert calls and all(c == [48, 48, 24, 24, 24] for c in calls)  # one decode per image for all five views
    for a, b in zip(fast, slow, strict=True):
        assert [v.shape[-1] for v in a["views"]] == [48, 48, 24, 24, 24]
        for va, vb in zip(a["views"], b["views"], strict=True):
            assert (va - vb).abs().mean() < 0.025


def test_cmyk_grayscale_and_broken_files_fall_back(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    (tmp_path / "c").mkdir()
    Image.fromarray(smooth_image(rng, 50, 60)).save(tmp_path / "c" / "a_rgb.jpg")
    Image.fromarray(smooth_image(rng, 50, 60)).convert("CMYK").save(tmp_path / "c" / "b_cmyk.jpg")
    Image.fromarray(smooth_image(rng, 50, 60)).convert("L").save(tmp_path / "c" / "c_gray.jpg")
    good = (tmp_path / "c" / "a_rgb.jpg").read_bytes()
    (tmp_path / "c" / "d_trunc.jpg").write_bytes(good[: len(good) // 2])
    ds = ImageFolder(tmp_path)
    monkeypatch.setattr(_ext, "has_jpeg_decoder", lambda: True)
    with pytest.raises(CorruptImageError, match="sample 3 .*d_trunc.jpg"):
        list(Loader(ds, 4, views=[eval_view(16)], num_workers=0, shuffle=False, drop_last=False))
    loader = Loader(ds, 4, views=[eval_view(16)], num_workers=0, shuffle=False, drop_last=False, on_error="skip")
    with pytest.warns(RuntimeWarning, match="replaced"):
        (batch,) = list(loader)
    assert batch["index"].tolist() == [0, 1, 2, 0] and torch.isfinite(batch["views"][0]).all()


def test_a_limited_folder_keeps_the_fast_path(photos, monkeypatch):
    # `--limit N` wraps the folder; its samples still come from files the C++ decoder may read.
    from rela.data.datasets import open_dataset

    head = open_dataset(photos.root, limit=10)
    assert head.path(3) == photos.path(3)
    with pytest.raises(IndexError):
        head.path(10)
    calls = []
    real = _ext.decode_resized_crops
    monkeypatch.setattr(_ext, "decode_resized_crops", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    batches = list(Loader(head, 5, views=[eval_view(24)], num_workers=0, shuffle=False))
    assert sum(calls) == 10 and [b["index"].tolist() for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_fused_normalise_matches_uint8_then_normalise(photos, worker_type):
    # Plain crops handed over as float32 are normalised inside the C++ resampler; the uint8
    # hand-off normalised on the "device" (here the CPU) must give exactly the same numbers.
    views = [ViewSpec(40, scale=(0.08, 1.0), flip=0.5), ViewSpec(40, scale=(0.5, 1.0), mean=(0.5, 0.4, 0.3),
                                                                  std=(0.2, 0.3, 0.25))]
    kw = dict(views=views, num_workers=2, worker_type=worker_type, drop_last=False, seed=7)
    fused = list(Loader(photos, 8, **kw))
    split = list(Loader(photos, 8, handoff="uint8", **kw))
    for a, b in zip(fused, split, strict=True):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"], strict=True):
            assert va.dtype == vb.dtype == torch.float32 and torch.equal(va, vb)


def test_decoder_writes_into_given_rows(photos):
    # outs + rows: each JPEG's crop lands in its batch row; untouched rows keep their bytes.
    jpegs = [photos.path(i).read_bytes() for i in range(3)]
    boxes = np.array([[[0, 0, 40, 40]]] * 3, np.int32)
    alone, errors = _ext.decode_resized_crops(jpegs, boxes, np.zeros((3, 1), np.uint8), 16)
    out = np.full((5, 3, 16, 16), 7, np.uint8)
    _ext.decode_resized_crops(jpegs, boxes, np.zeros((3, 1), np.uint8), 16, outs=[out], rows=np.array([4, 0, 2]))
    assert errors == ["", "", ""]
    assert np.array_equal(out[[4, 0, 2]], alone[0]) and (out[[1, 3]] == 7).all()
    with pytest.raises(ValueError, match="float32"):
        _ext.decode_resized_crops(jpegs, boxes, np.zeros((3, 1), np.uint8), 16, outs=[out], rows=np.arange(3),
                                  scale=np.ones((1, 3), np.float32), bias=np.zeros((1, 3), np.float32))


_RESAMPLE_SCRIPT = """
import io, sys
import numpy as np, skimage.data, torch
from PIL import Image
from rela import _ext
rng = np.random.default_rng(0)
buf = io.BytesIO()
Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", quality=90)
out = []
for size in (7, 8, 31, 96, 160, 224):
    for flip in (0, 1):
        side = int(rng.integers(size // 2 + 1, 512))
        boxes = np.array([[[int(rng.integers(0, 512 - side)), int(rng.integers(0, 512 - side)), side, side]]], np.int32)
        flips = np.full((1, 1), flip, np.uint8)
        out.append(_ext.decode_resized_crops([buf.getvalue()], boxes, flips, size, fit=0.0)[0][0])
        # numpy's buffer (16-byte aligned) and torch's (64: whole-line non-temporal stores where
        # the size is a multiple of 16) must hold the same numbers
        for f32 in ([np.zeros((1, 3, size, size), np.float32)], [torch.zeros(1, 3, size, size).numpy()]):
            _ext.decode_resized_crops([buf.getvalue()], boxes, flips, size, outs=f32,
                                      scale=np.full((1, 3), 0.0174, np.float32),
                                      bias=np.full((1, 3), -2.1, np.float32), fit=0.0)
            out.append(f32[0])
        assert np.array_equal(out[-1], out[-2])
sys.stdout.buffer.write(b"".join(a.tobytes() for a in out))
"""


def test_the_resamplers_vector_and_scalar_stores_write_the_same_bytes():
    # the transposed stores run as 8x8 AVX2 register transposes where the CPU has them (RELA_SCALAR=1:
    # one value at a time, as on a CPU without): uint8 and normalised float32, flipped or not, sizes on
    # and off the 8-pixel blocks, byte for byte
    import os
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _RESAMPLE_SCRIPT], capture_output=True, timeout=120,
                           env={**os.environ, "RELA_SCALAR": scalar}) for scalar in ("0", "1")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert len(runs[0].stdout) > 100_000 and runs[0].stdout == runs[1].stdout


def _coeffs(in0: float, in1: float, insize: int, outsize: int) -> tuple[list[int], list[np.ndarray]]:
    """csrc/jpeg.cpp's make_coeffs in float64, weights rounded to float32 as it stores them."""
    scale = (in1 - in0) / outsize
    filterscale = max(scale, 1.0)
    starts, weights = [], []
    for xx in range(outsize):
        center = in0 + (xx + 0.5) * scale
        lo, hi = max(int(center - filterscale + 0.5), 0), min(int(center + filterscale + 0.5), insize)
        k = np.array([max(0.0, 1.0 - abs((x + lo - center + 0.5) / filterscale)) for x in range(hi - lo)])
        starts.append(lo)
        weights.append((k / k.sum() if k.sum() > 0 else k).astype(np.float32))
    return starts, weights


def _resample_reference(src: np.ndarray, h: int, out: int, flip: bool, scale=None, bias=None) -> np.ndarray:
    """The resampler's float32 expression, one operation at a time: rows [0, h) of `src` (H x W x 3)
    to out x out, vertical sums in tap order, then horizontal sums in tap order, rounded half to
    even, clamped, mirrored; uint8, or x * scale + bias in float32."""
    w = src.shape[1]
    vs, vw = _coeffs(0.0, float(h), h, out)
    hs, hw = _coeffs(0.0, float(w), w, out)
    rows = np.zeros((out, w, 3), np.float32)
    for yy in range(out):
        for i, wt in enumerate(vw[yy]):
            rows[yy] = rows[yy] + wt * src[vs[yy] + i].astype(np.float32)
    cols = np.zeros((out, out, 3), np.float32)
    for xx in range(out):
        for i, wt in enumerate(hw[xx]):
            cols[:, xx] = cols[:, xx] + wt * rows[:, hs[xx] + i]
    px = np.clip(np.rint(cols), 0, 255).transpose(2, 0, 1)[:, :, ::-1 if flip else 1]
    if scale is None:
        return px.astype(np.uint8)
    return (px * scale[:, None, None]).astype(np.float32) + bias[:, None, None]


def test_the_resampler_computes_its_stated_float32_expression_exactly():
    # Every output value is one float32 expression (csrc/jpeg.cpp: vertical then horizontal sums in
    # tap order, round half to even): however the passes are tiled, vectorised or stored, the pixels
    # are these, byte for byte. Boxes start at the top-left and span the full width, so the decoded
    # region is rows of the full decode (its pixels: an identity resample, exact).
    import io

    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, "JPEG", quality=90)  # 600 x 400
    jpeg = buf.getvalue()
    H, W = 400, 600
    # the decoded pixels: a square box resampled to its own size is the identity (weights 1 and 0).
    # Each square is a cropped decode, whose chroma upsampling differs from the full frame's next to
    # the crop's inner edge, so the seam is at W / 2, a hundred columns from either crop edge.
    def square(left: int) -> np.ndarray:
        box = np.array([[[0, left, H, H]]], np.int32)
        return _ext.decode_resized_crops([jpeg], box, np.zeros((1, 1), np.uint8), [H], fit=0.0)[0][0][0]

    seam = W // 2
    src = np.concatenate([square(0)[:, :, :seam], square(W - H)[:, :, seam - (W - H):]], axis=2).transpose(1, 2, 0)
    assert src.shape == (H, W, 3)
    rng = np.random.default_rng(3)
    scale, bias = np.float32([0.0171, 0.0175, 0.0174]), np.float32([-2.118, -2.036, -1.804])
    for out in (7, 16, 96, 160, 224, 250):
        h, flip = int(rng.integers(out // 2 + 1, H + 1)), bool(rng.integers(0, 2))
        box, flips = np.array([[[0, 0, h, W]]], np.int32), np.full((1, 1), flip, np.uint8)
        u8 = _ext.decode_resized_crops([jpeg], box, flips, [out], fit=0.0)[0][0][0]
        assert np.array_equal(u8, _resample_reference(src, h, out, flip)), out
        f32 = torch.zeros(1, 3, out, out).numpy()  # 64-byte aligned: the streamed stores where out % 16 == 0
        _ext.decode_resized_crops([jpeg], box, flips, [out], outs=[f32], scale=scale[None], bias=bias[None], fit=0.0)
        assert np.array_equal(f32[0], _resample_reference(src, h, out, flip, scale, bias)), out
