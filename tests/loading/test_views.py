"""View specs and their torchvision implementation: the presets say what the method says, and
random views have the intended statistics."""

import numpy as np
import pytest
import torch

from rela.errors import RelaError
from rela.loading.backends.augment import apply_view
from rela.loading.views import (
    ViewSpec,
    byol_views,
    crop_params,
    eval_view,
    geometry,
    geometry_batch,
    rela_view,
    resolve_views,
    sample_generator,
)
from tests.conftest import smooth_image


def test_presets_follow_the_method():
    r = rela_view(32)
    assert (r.scale, r.flip, r.jitter, r.jitter_p, r.gray_p, r.blur_p, r.solarize_p) == \
        ((0.5, 1.0), 0.5, (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.0, 0.0)
    v1, v2 = byol_views(224)
    assert v1.scale == v2.scale == (0.08, 1.0) and v1.jitter == (0.4, 0.4, 0.2, 0.1)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert len(resolve_views("rela", 32)) == 2 and resolve_views("eval", 32)[0].crop == "center"
    with pytest.raises(RelaError, match="unknown views"):
        resolve_views("mae", 32)
    with pytest.raises(RelaError, match="crop scale"):
        ViewSpec(8, scale=(0.0, 1.0))


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_crop_area_stays_in_the_scale_range(scale):
    H, W = 350, 400
    areas = []
    for s in range(3000):
        top, left, h, w = crop_params(torch.Generator().manual_seed(s), H, W, scale, (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        areas.append(h * w / (H * W))
    areas = np.array(areas)
    # Rounding of h and w moves the area a little past the bounds.
    assert areas.min() >= scale[0] * 0.95 and areas.max() <= scale[1] * 1.0001
    # Same distribution as torchvision's RandomResizedCrop (its rejection step favours small crops).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = np.array([(lambda b: b[2] * b[3] / (H * W))(RandomResizedCrop.get_params(torch.empty(3, H, W), list(scale),
                                                                                  [3 / 4, 4 / 3]))
                    for _ in range(3000)])
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(areas, q) - np.quantile(ref, q)) < 0.04


def test_flip_rate_is_one_half():
    img = torch.arange(16, dtype=torch.uint8).repeat(3, 16, 1) * 16  # brightness rises left → right
    spec = ViewSpec(16, crop="center", flip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    flips = sum(int(apply_view(spec, img, torch.Generator().manual_seed(s))[0, 0, 0] > 0.5) for s in range(2000))
    assert abs(flips / 2000 - 0.5) < 0.04


def test_eval_view_is_deterministic_and_normalised():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 28, 28), dtype=np.uint8))
    a = apply_view(eval_view(32), img, torch.Generator().manual_seed(1))
    b = apply_view(eval_view(32), img, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    ones = apply_view(eval_view(8, mean=(0.5,) * 3, std=(0.5,) * 3), torch.full((3, 8, 8), 255, dtype=torch.uint8),
                      torch.Generator())
    torch.testing.assert_close(ones, torch.ones(3, 8, 8))


def test_strong_views_stay_finite_and_vary():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 40, 48), dtype=np.uint8))
    outs = [torch.stack([apply_view(s, img, torch.Generator().manual_seed(k)) for s in byol_views(24)])
            for k in range(20)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("which", ["eval", "rela", "byol0", "byol1"])
def test_batched_views_match_per_image_views(which):
    """augment_batch (in-memory data) makes the same random choices as augment; pixels differ by
    interpolation and rounding only, and not at all for the deterministic eval view."""
    from rela.loading.backends.augment import augment, augment_batch
    from rela.loading.views import byol_views, eval_view, rela_view, sample_generator

    spec = {
        "eval": eval_view(24),
        "rela": rela_view(24),
        "byol0": byol_views(24, blur=True)[0],
        "byol1": byol_views(24, blur=True)[1],
    }[which]
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(np.stack([smooth_image(rng, 40, 40) for _ in range(64)])).permute(0, 3, 1, 2)
    gens = [sample_generator(1, 2, i, 0) for i in range(64)]
    got = augment_batch(spec, imgs.contiguous(), gens)
    ref = torch.stack([augment(spec, imgs[i], sample_generator(1, 2, i, 0)) for i in range(64)])
    diff = (got.float() - ref.float()).abs()
    if which == "eval":
        assert torch.equal(got, ref)
    else:
        assert diff.mean() < 3.0, diff.mean()  # grey levels; a wrong flip, crop or colour choice gives ~30+
        assert (diff.flatten(1).mean(1) < 12).all()


def test_presets_follow_each_method_at_its_resolution():
    # ≤ 64 px: lightly's CIFAR settings (no blur); 224 px: the ImageNet settings.
    for small, big in ((byol_views(32), byol_views(224)), (resolve_views("dino", 32), resolve_views("dino", 224)),
                       (resolve_views("simclr", 32), resolve_views("simclr", 224))):
        assert all(v.blur_p == 0 for v in small) and any(v.blur_p > 0 for v in big)
        assert [v.solarize_p for v in small] == [v.solarize_p for v in big]
    assert [v.blur_p for v in resolve_views("dino", 224)] == [1.0, 0.1]
    d = resolve_views("dino", 32)
    assert d[0].scale == (0.4, 1.0) and d[0].jitter == (0.4, 0.4, 0.2, 0.1) and [v.solarize_p for v in d] == [0, 0.2]
    s = resolve_views("simclr", 224)
    assert s[0] == s[1] and s[0].jitter == (0.8, 0.8, 0.8, 0.2) and s[0].blur_p == 0.5
    (sup,) = resolve_views("supervised", 32)
    assert sup.scale == (0.08, 1.0) and sup.flip == 0.5 and sup.jitter_p == sup.gray_p == sup.blur_p == 0
    assert [v.blur_p for v in byol_views(32, blur=True)] == [1.0, 0.1]


def test_preset_overrides_set_every_knob():
    v = resolve_views("byol,scale=0.2:1,1.solarize_p=0,blur_p=0.5", 32)
    assert v[0].scale == v[1].scale == (0.2, 1.0) and v[1].solarize_p == 0 and v[0].blur_p == v[1].blur_p == 0.5
    assert resolve_views("rela, flip = 0", 16)[1].flip == 0  # spaces are fine
    assert resolve_views("eval,crop=random", 16)[0].crop == "random"
    dino = resolve_views("dino,local_crops=2,local_size=12,1.solarize_p=0", 32)  # the dino preset's own arguments
    assert [v.size for v in dino] == [32, 32, 12, 12] and dino[1].solarize_p == 0 and dino[2].scale == (0.05, 0.4)
    for bad, msg in (
        ("byol,zoom=2", "key among"),
        ("byol,2.flip=0", "views 0..1"),
        ("byol,scale=0.2", "2 numbers"),
        ("byol,flip=often", "needs a number"),
        ("byol,scale=0:1", "crop scale"),
        ("byol,flip", "key=value"),
        ("byol,local_crops=6", "key among"),
        ("dino,local_crops=six", "whole number"),
    ):
        with pytest.raises(RelaError, match=msg):
            resolve_views(bad, 32)


@pytest.mark.parametrize("compiled", [True, False])
def test_batched_geometry_draws_what_geometry_draws(compiled, monkeypatch):
    """The fast path's boxes and flips (C++, or the Python fallback without rela._C) are the
    general path's, sample for sample: odd seeds (negative, above 2^32 or 2^64's mask), epochs,
    indices, tiny and lopsided images (the central-crop fallback), centre crops, no flip."""
    from rela import _ext

    if compiled and not _ext.has_extension():
        pytest.skip("rela._C not built")
    monkeypatch.setattr(_ext, "has_extension", lambda: compiled)
    rng = np.random.default_rng(1)
    specs = [ViewSpec(32), ViewSpec(32, crop="center"), ViewSpec(32, scale=(0.01, 0.1), ratio=(0.2, 5.0), flip=0.0),
             ViewSpec(32, scale=(0.9, 1.0), ratio=(2.0, 3.0), flip=1.0)]
    for seed, epoch in [(0, 0), (-3, 1), (2**32 + 7, 2**32), (2**64 + 5, 9), (12345, 3)]:
        for view, spec in enumerate(specs):
            idx = rng.integers(0, 2**40, 40)
            hs = np.concatenate([[1, 2, 5, 600, 3], rng.integers(1, 700, 35)])
            ws = np.concatenate([[1, 900, 2, 4, 3], rng.integers(1, 700, 35)])
            boxes, flips = geometry_batch(spec, seed, epoch, idx.tolist(), view, hs.tolist(), ws.tolist())
            for j in range(len(idx)):
                want = geometry(spec, int(hs[j]), int(ws[j]), sample_generator(seed, epoch, int(idx[j]), view))
                assert (*boxes[j].tolist(), bool(flips[j])) == tuple(want), (seed, epoch, view, j)


def test_has_colour_is_derived_from_every_declared_colour_op():
    # the plain-crop fast path skips colour when has_colour is False: an op it did not count would be
    # dropped silently. Every field declares its role; the colour ops are exactly ColourParams' ops.
    from dataclasses import fields, replace

    from rela.loading.views import ColourParams, ViewSpec

    roles = {f.name: f.metadata.get("role") for f in fields(ViewSpec)}
    assert set(roles.values()) == {"geometry", "colour", "colour-param", "normalise"}, roles
    ops = {f.metadata["op"]: f.name for f in fields(ViewSpec) if f.metadata["role"] == "colour"}
    assert set(ops) == {"jitter", *ColourParams.ops()}
    rng = np.random.default_rng(0)
    image = torch.from_numpy(smooth_image(rng, 24, 24)).permute(2, 0, 1).contiguous()
    plain = ViewSpec(16, crop="center", jitter=(0.4, 0.4, 0.4, 0.1), blur_sigma=(1.0, 2.0))
    assert not plain.has_colour  # strengths alone: no op runs
    base = apply_view(plain, image, torch.Generator().manual_seed(0))
    for op, name in ops.items():
        spec = replace(plain, **{name: 1.0})
        assert spec.has_colour, op
        assert not torch.equal(apply_view(spec, image, torch.Generator().manual_seed(0)), base), op  # it acts


def test_a_method_carries_its_views_as_a_function_of_the_image_size():
    # a method with new views defines them in its own module: no edit of the loading floor
    from rela import Loader
    from rela.data.datasets import ArrayDataset
    from rela.training.methods.base import SSLMethod

    class TwoScales(SSLMethod):
        def views(self, size: int) -> tuple[ViewSpec, ViewSpec]:
            return ViewSpec(size, flip=0.5), ViewSpec(size // 2, crop="center")

    method = TwoScales()
    assert resolve_views(method.views, 32) == (ViewSpec(32, flip=0.5), ViewSpec(16, crop="center"))
    with pytest.raises(RelaError, match="function of the image size"):
        resolve_views(method.views)
    rng = np.random.default_rng(0)
    ds = ArrayDataset(np.stack([smooth_image(rng, 40, 40) for _ in range(8)]), np.arange(8))
    batch = next(iter(Loader(ds, 4, views=method.views, image_size=32, num_workers=0)))
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 3, 32, 32), (4, 3, 16, 16)]
