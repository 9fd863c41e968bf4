"""Transforms users already have (lightly's, torchvision's) translated into rela's view specs."""

import pytest
import torch
from torchvision.transforms import v2

from rela import Loader
from rela.data.datasets import ArrayDataset
from rela.errors import RelaError
from rela.loading.translate import from_lightly, from_torchvision
from rela.loading.views import byol_views, eval_view, resolve_views


def test_lightly_transforms_are_the_presets():
    from lightly.transforms import SimCLRTransform
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )

    assert from_lightly(BYOLTransform()) == byol_views(224)
    small = BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                          BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    assert from_lightly(small) == byol_views(32)  # lightly's CIFAR settings = rela's 32-px preset
    assert from_lightly(SimCLRTransform(input_size=224)) == resolve_views("simclr", 224)


def test_a_torchvision_compose_translates_op_by_op():
    t = v2.Compose([v2.RandomResizedCrop(48, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(0.3),
                    v2.RandomApply([v2.ColorJitter(0.4, 0.3, 0.2, 0.1)], p=0.7), v2.RandomGrayscale(0.1),
                    v2.RandomApply([v2.GaussianBlur(5, sigma=(0.5, 1.5))], p=0.4), v2.RandomSolarize(128, p=0.05),
                    v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    s = from_torchvision(t)
    assert (s.size, s.crop, s.scale, s.flip, s.jitter, s.jitter_p, s.gray_p) == \
        (48, "random", (0.2, 1.0), 0.3, (0.4, 0.3, 0.2, 0.1), 0.7, 0.1)
    assert (s.blur_p, s.blur_sigma, s.solarize_p, s.mean, s.std) == (0.4, (0.5, 1.5), 0.05, (0.5,) * 3, (0.25,) * 3)
    assert from_torchvision(v2.Compose([v2.Resize(32), v2.CenterCrop(32), v2.ToImage()])) == eval_view(32)


@pytest.mark.parametrize("bad,match", [
    (v2.Compose([v2.RandomResizedCrop(32), v2.RandomErasing()]), "cannot translate RandomErasing"),
    (v2.Compose([v2.RandomResizedCrop((32, 24))]), "square"),
    (v2.Compose([v2.RandomResizedCrop(32), v2.RandomGrayscale(0.2), v2.ColorJitter(0.4)]), "reorder"),
    (v2.Compose([v2.RandomResizedCrop(32), v2.RandomSolarize(100)]), "midpoint"),
    (v2.Compose([v2.RandomHorizontalFlip()]), "view size"),
])
def test_what_does_not_map_is_refused_by_name(bad, match):
    with pytest.raises(RelaError, match=match):
        from_torchvision(bad)


def test_the_loader_takes_a_lightly_transform_as_views():
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )

    images = torch.randint(0, 255, (16, 20, 20, 3), dtype=torch.uint8).numpy()
    t = BYOLTransform(BYOLView1Transform(input_size=16, gaussian_blur=0.0),
                      BYOLView2Transform(input_size=16, gaussian_blur=0.0))
    loader = Loader(ArrayDataset(images), 8, views=t, num_workers=0, batch_format="tuple")
    assert loader.views == byol_views(16)
    (x0, x1), _ = next(iter(loader))
    assert x0.shape == x1.shape == (8, 3, 16, 16)
