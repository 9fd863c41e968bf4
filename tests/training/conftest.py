"""Fixtures of the training tests."""

import numpy as np
import pytest

from rela import convert
from tests.conftest import smooth_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """160 small images in an .npz, with a random-prior store made once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    images = np.stack([smooth_image(rng, 20, 20) for _ in range(160)])
    path = root / "tiny.npz"
    np.savez(path, images=images, labels=rng.integers(0, 4, len(images)))
    store = convert(str(path), "random:resnet18", root / "store", dim=16, input_size=32, progress=False)
    return {"data": str(path), "store": str(store.path), "root": root}
