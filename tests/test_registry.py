"""One entry per extension (rela.registry): a line in a table adds a method, prior kind, backend,
dataset format or view preset everywhere its name is read, and objects are taken where names are."""

import numpy as np
import pytest
import torch

from rela import Loader, registry
from rela.data.datasets import ArrayDataset, open_dataset
from rela.errors import RelaError
from tests.conftest import smooth_image


def _images(n: int = 8) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(np.stack([smooth_image(rng, 24, 24) for _ in range(n)]), np.arange(n) % 2)


class ToyFormat(ArrayDataset):
    """A dataset format of its own: "toy:N" opens N images."""

    @classmethod
    def claims(cls, spec) -> bool:
        return isinstance(spec, str) and spec.startswith("toy:")

    @classmethod
    def from_spec(cls, spec):
        ds = _images(int(spec.partition(":")[2]))
        return cls(ds.images, ds.labels(), name="toy")


def toy_views(size: int, **kw):
    from rela.loading.views import ViewSpec

    return ViewSpec(size, flip=1.0, **kw), ViewSpec(size // 2, crop="center", **kw)


def toy_prior(rest: str, opts):
    from rela.data.priors import load_prior

    return load_prior(f"random:{rest}", input_size=opts.input_size)


def _register(monkeypatch, table: dict, name: str, code: str, before: str | None = None) -> None:
    items = list(table.items())
    at = [k for k, _ in items].index(before) if before else len(items)
    monkeypatch.setattr(registry, {id(registry.DATASETS): "DATASETS", id(registry.VIEWS): "VIEWS",
                                   id(registry.PRIORS): "PRIORS"}[id(table)],
                        dict(items[:at] + [(name, registry.Entry(code))] + items[at:]))


def test_a_registry_line_adds_a_dataset_format_a_view_preset_and_a_prior_kind(monkeypatch):
    _register(monkeypatch, registry.DATASETS, "toy", "tests.test_registry:ToyFormat", before="folder")
    _register(monkeypatch, registry.VIEWS, "toy", "tests.test_registry:toy_views")
    _register(monkeypatch, registry.PRIORS, "toy", "tests.test_registry:toy_prior")
    ds = open_dataset("toy:6")
    assert isinstance(ds, ToyFormat) and len(ds) == 6
    batch = next(iter(Loader("toy:6", 3, views="toy", image_size=16, num_workers=0)))
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 3, 16, 16), (3, 3, 8, 8)]
    from rela.data.priors import load_prior

    assert load_prior("toy:resnet18", input_size=32).dim == 512
    with pytest.raises(RelaError, match="unknown views 'toys': use one of .*toy"):
        Loader("toy:6", 3, views="toys", image_size=16)


def test_a_backend_class_and_a_method_class_are_taken_as_they_are():
    from rela.loading.backends.torch_backend import TorchBackend
    from rela.training.methods import BYOL, build_method

    built = []

    class Counting(TorchBackend):
        def batches(self, tasks):
            for b in super().batches(tasks):
                built.append(len(b.index))
                yield b

    batches = list(Loader(_images(), 4, image_size=16, num_workers=0, backend=Counting))
    assert len(batches) == 2 and built == [4, 4]

    class Mine(BYOL):
        pass

    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    method = build_method(Mine, backbone, 16)
    assert type(method) is Mine
    with pytest.raises(RelaError, match="unknown method 'mine'.*or an SSLMethod subclass"):
        build_method("mine", backbone, 16)
