"""Priors from the libraries users take pretrained encoders from: timm, open_clip, transformers.

Each builder loads the library's model from local files (no network needed), keeps the image
encoder only, and reads the preprocessing from the library — timm's `resolve_model_data_config`,
open_clip's pretrained-tag config, the Hugging Face image processor — never a guess. Each
records library, name, version and the weights' sha256 in the store's manifest.

- `timm:NAME --weights FILE` (or `timm:local-dir:DIR`, or `timm:NAME` to download): the pooled
  features (`num_classes=0`). timm's overlay keeps the registry tag's preprocessing, so name the
  architecture whose weights the file holds.
- `open_clip:NAME[:TAG] --weights FILE` (or `open_clip:local-dir:DIR`): the image tower's
  embedding. With a file, open_clip itself falls back to OpenAI CLIP's mean/std and skips its
  QuickGELU check (open_clip #1068); rela takes both from the pretrained tag instead — the one
  named, or the model's only one, or all of its tags when they agree; otherwise it asks for the
  tag. `open_clip:RN50:openai` is the paper's CLIP-RN50 prior.
- `hf:DIR` (transformers `AutoModel` + `AutoImageProcessor`, local files only): CLIP/SigLIP
  image features (`get_image_features`), else the pooler output (DINOv2: the final CLS token),
  else the mean of the last hidden states.

The libraries are optional extras: `pip install 'rela-accel[timm]'` (`[open_clip]`, `[hf]`).
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from rela.data.prior import Prior, _prior, sha256_file, sha256_state_dict
from rela.data.prior_options import PriorOptions
from rela.errors import PriorError

EXTRAS = {
    "timm": ("timm", "timm"),
    "open_clip": ("open_clip", "open_clip_torch"),
    "hf": ("transformers", "transformers"),
}


def _library(kind: str):
    module, package = EXTRAS[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PriorError(f"{kind}: priors need {package}: pip install 'rela-accel[{kind}]' "
                         f"(or pip install {package})") from None


def _interpolation(name) -> str:
    """'bicubic' from timm's/open_clip's strings, PIL's enum values or torchvision's modes."""
    text = str(getattr(name, "value", name)).lower()
    text = {"3": "bicubic", "2": "bilinear", "0": "nearest", "1": "lanczos"}.get(text, text)
    for known in ("bicubic", "bilinear", "nearest"):
        if known in text:
            return known
    raise PriorError(f"the library asks for {name!r} interpolation, which rela's preprocessing does not have; "
                     "choose one with --interpolation")


def _mismatch(e: Exception, weights, name: str) -> PriorError:
    """One line from torch's multi-line load_state_dict error: counts and the first key of each kind."""
    text = str(e)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} keys (e.g. {keys[0] if keys else '?'})")
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (\S+ \S+) from checkpoint, "
                        r"the shape in current model is (\S+ \S+)", text)
    if shapes:
        key, theirs, ours = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {key}: file {theirs.rstrip('.,')} vs model "
                     f"{ours.rstrip('.,')})")
    detail = "; ".join(parts) or text.strip().splitlines()[0][:200]
    return PriorError(f"weights in {weights} do not match {name}: {detail}")


def _sha(weights, model: nn.Module) -> str:
    return sha256_file(weights) if weights else sha256_state_dict(model)


# --- timm ------------------------------------------------------------------------------------
def timm_prior(rest: str, opts: PriorOptions) -> Prior:
    timm = _library("timm")
    kwargs: dict = {"pretrained": True, "num_classes": 0}
    if opts.weights and not rest.startswith("local-dir:"):
        if not Path(opts.weights).exists():
            raise PriorError(f"weights file {opts.weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(opts.weights)}
    try:
        with _TimmLoadLog() as log:
            model = timm.create_model(rest, **kwargs)
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise _mismatch(e, opts.weights or rest, f"timm model {rest!r}") from None
        hint = "" if opts.weights else "; without network pass --weights FILE"
        raise PriorError(f"timm could not build {rest!r}: {str(e).splitlines()[0]}{hint}") from None
    except (OSError, ValueError) as e:
        raise PriorError(f"timm could not load {rest!r} ({str(e).splitlines()[0][:200]}); "
                         "pass --weights FILE (or timm:local-dir:DIR) when there is no network") from None
    except Exception as e:  # a garbage weights file: safetensors' and pickle's own errors
        if not opts.weights:
            raise
        raise PriorError(f"{opts.weights} is not a weights file timm can read ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if log.keys:  # timm loads non-strictly when it drops the classifier, and only logs what did not fit
        raise PriorError(f"weights in {opts.weights or rest} do not match timm model {rest!r}: "
                         + "; ".join(f"{len(keys)} {what} keys (e.g. {keys[0]})" for what, keys in log.keys.items()))
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    if cfg["input_size"][-1] != cfg["input_size"][-2]:
        raise PriorError(f"timm model {rest!r} takes {cfg['input_size'][1:]} inputs; rela's preprocessing is square")
    if cfg.get("crop_mode", "center") not in ("center", "squash"):
        raise PriorError(f"timm model {rest!r} uses crop_mode={cfg['crop_mode']!r}; rela crops centre or squash")
    resize = int(size / cfg.get("crop_pct", 1.0))  # timm's eval transform: floor(size / crop_pct)
    ident = {"name": f"timm:{rest}", "library": "timm", "library_version": timm.__version__, "model": rest,
             "arch": model.default_cfg.get("architecture", rest), "source": str(opts.weights or rest),
             "weights_sha256": _sha(opts.weights, model)}
    return _prior(opts, _Pooled(model), size, cfg["mean"], cfg["std"], ident, resize=resize,
                  interpolation=_interpolation(cfg["interpolation"]), squash=cfg.get("crop_mode") == "squash")


class _TimmLoadLog(logging.Handler):
    """Collects the keys timm's load_pretrained reports as missing or unexpected (it logs them,
    at INFO for missing ones, instead of failing)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: dict[str, list[str]] = {}
        self.logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"(Missing|Unexpected) keys \((.*?)\) (?:discovered|found)", record.getMessage())
        if m and m.group(2):
            self.keys[m.group(1).lower()] = m.group(2).split(", ")

    def __enter__(self) -> _TimmLoadLog:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


class _Pooled(nn.Module):
    """A timm model built with num_classes=0: its forward is already the pooled feature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)


# --- open_clip -------------------------------------------------------------------------------
def open_clip_prior(rest: str, opts: PriorOptions) -> Prior:
    oc = _library("open_clip")
    local = rest.startswith("local-dir:")
    name, _, tag = (rest, "", "") if local else rest.partition(":")
    kwargs: dict = {}
    if not local:
        tag_cfg = _open_clip_tag(oc, name, tag)
        if tag_cfg:  # what open_clip applies for a tag, applied for a file too
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                              if k in tag_cfg}
        if opts.weights:
            if not Path(opts.weights).exists():
                raise PriorError(f"weights file {opts.weights} does not exist")
            kwargs["pretrained"] = str(opts.weights)
        elif tag:
            kwargs["pretrained"] = tag  # downloads
    try:
        model = oc.create_model(name, **kwargs)
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise _mismatch(e, opts.weights, f"open_clip model {name!r}") from None
        raise PriorError(f"open_clip could not build {rest!r}: {str(e).splitlines()[0][:200]}") from None
    except (OSError, ValueError, KeyError) as e:
        raise PriorError(f"open_clip could not load {rest!r} ({str(e).splitlines()[0][:200]}); pass --weights FILE "
                         "(or open_clip:local-dir:DIR) when there is no network") from None
    if not local and not opts.weights and not tag:
        raise PriorError(f"open_clip:{name} without --weights or a pretrained tag would be randomly initialised; "
                         f"pass --weights FILE or name a tag ({', '.join(oc.list_pretrained_tags_by_model(name))})")
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise PriorError(f"open_clip model {rest!r} resizes with resize_mode={pp['resize_mode']!r} (padding); "
                         "rela's preprocessing resizes the shorter side or squashes")
    ident = {"name": f"open_clip:{rest}", "library": "open_clip", "library_version": oc.__version__,
             "model": name, "tag": tag or None, "quick_gelu": kwargs.get("force_quick_gelu"),
             "source": str(opts.weights or rest), "weights_sha256": _sha(opts.weights, model.visual)}
    return _prior(opts, model.visual, int(size), pp["mean"], pp["std"], ident,
                  interpolation=_interpolation(pp["interpolation"]), squash=pp.get("resize_mode") == "squash")


def _open_clip_tag(oc, name: str, tag: str) -> dict:
    """The pretrained config to take preprocessing and QuickGELU from (see the module doc)."""
    tags = oc.list_pretrained_tags_by_model(name)
    if tag:
        if tag not in tags:
            raise PriorError(
                f"open_clip has no pretrained tag {tag!r} for {name!r} (it has: {', '.join(tags) or 'none'})"
            )
        return oc.get_pretrained_cfg(name, tag)
    keys = ("mean", "std", "interpolation", "resize_mode", "quick_gelu")
    cfgs = [oc.get_pretrained_cfg(name, t) for t in tags]
    if cfgs and any({k: c.get(k) for k in keys} != {k: cfgs[0].get(k) for k in keys} for c in cfgs):
        raise PriorError(f"open_clip's pretrained tags for {name!r} ({', '.join(tags)}) preprocess differently: "
                         f"name the one your weights come from, e.g. open_clip:{name}:{tags[0]}")
    return cfgs[0] if cfgs else {}


# --- Hugging Face transformers ---------------------------------------------------------------
def hf_prior(rest: str, opts: PriorOptions) -> Prior:
    tf = _library("hf")
    path = Path(rest)
    if not (path / "config.json").exists():
        raise PriorError(f"hf:{rest} needs a local model folder with config.json (save_pretrained / "
                         "huggingface-cli download --local-dir); rela does not download")
    if opts.weights:
        raise PriorError("hf: priors take their weights from the folder; drop --weights")
    try:
        model = tf.AutoModel.from_pretrained(rest, local_files_only=True)
        processor = tf.AutoImageProcessor.from_pretrained(rest, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PriorError(f"transformers could not load {rest} ({str(e).strip().splitlines()[0][:200]})") from None
    size, resize, squash = _hf_geometry(processor, rest)
    ident = {"name": f"hf:{rest}", "library": "transformers", "library_version": tf.__version__,
             "model": type(model).__name__, "model_type": model.config.model_type,
             "source": str(path.resolve()), "weights_sha256": sha256_state_dict(model)}
    return _prior(opts, _HFImageFeatures(model), size, processor.image_mean, processor.image_std, ident,
                  resize=resize, interpolation=_interpolation(processor.resample), squash=squash)


def _hf_geometry(processor, rest: str) -> tuple[int, int, bool]:
    """(crop size, resize, squash) from an image processor's size / crop_size settings."""
    def get(d, key):
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    size, crop = processor.size, getattr(processor, "crop_size", None)
    if get(size, "shortest_edge"):
        resize, squash = int(get(size, "shortest_edge")), False
    elif get(size, "height") and get(size, "height") == get(size, "width"):
        resize, squash = int(get(size, "height")), True
    else:
        raise PriorError(f"hf:{rest}: its image processor resizes to {size}; rela supports a shortest edge or a "
                         "square size")
    if getattr(processor, "do_center_crop", False) and crop is not None:
        c = get(crop, "height")
        if c != get(crop, "width"):
            raise PriorError(f"hf:{rest}: non-square crop {crop}")
        return int(c), resize, squash
    return resize, resize, squash


class _HFImageFeatures(nn.Module):
    """CLIP/SigLIP: the projected image features; others: pooler output, else mean hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
        else:
            out = self.model(pixel_values=x)
        if isinstance(out, torch.Tensor):  # transformers 4.x returned the tensor itself
            return out
        for key in ("image_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if value is not None:
                return value.flatten(1)
        return out.last_hidden_state.mean(dim=1)


BUILDERS = {"timm": timm_prior, "open_clip": open_clip_prior, "hf": hf_prior}
