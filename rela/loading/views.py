"""Backend-neutral view specs: what augmentations a training view gets, not how a backend runs them.

Three families are built in:
- `rela`: the RELA phase's view — RandomResizedCrop(scale 0.5–1), flip 0.5,
  ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, normalise; no blur, no solarise.
  The RELA phase uses two of them.
- `byol`: BYOL's two asymmetric views, as lightly's BYOLView1/2Transform: crop 0.08–1, flip 0.5,
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur p 1.0 / 0.1 (σ 0.1–2), solarise p 0 / 0.2.
- `eval`: resize the shorter side, centre crop, normalise (deterministic).

A backend turns a `ViewSpec` into its own operators (the torchvision implementation is
`rela.loading.backends.augment`, used by the `torch` backend); this module holds the specs and the
random draws every backend shares: `geometry` (crop box, flip) and `colour_params`. All random
choices come from an explicit `torch.Generator` (`sample_generator`), so a sample's views depend
only on the seed, the epoch and its index — never on worker count or global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from rela.data.priors import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError


@dataclass(frozen=True)
class ViewSpec:
    size: int
    crop: str = "random"  # "random": RandomResizedCrop; "center": resize shorter side + centre crop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise RelaError(f"crop must be 'random' or 'center', not {self.crop!r}")
        if self.size < 1:
            raise RelaError(f"view size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise RelaError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")


def rela_view(size: int, **kw) -> ViewSpec:
    return ViewSpec(size, scale=(0.5, 1.0), flip=0.5, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
                    gray_p=0.2, **kw)


def byol_views(size: int, **kw) -> tuple[ViewSpec, ViewSpec]:
    base = ViewSpec(size, scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                    gray_p=0.2, **kw)
    return replace(base, blur_p=1.0, solarize_p=0.0), replace(base, blur_p=0.1, solarize_p=0.2)


def eval_view(size: int, **kw) -> ViewSpec:
    return ViewSpec(size, crop="center", **kw)


def resolve_views(views: str | ViewSpec | Sequence[ViewSpec], size: int | None = None,
                  mean=None, std=None) -> tuple[ViewSpec, ...]:
    """Turn 'rela' / 'byol' / 'eval' (with an image size), a spec or a list of specs into a tuple."""
    if isinstance(views, ViewSpec):
        return (views,)
    if isinstance(views, str):
        if size is None:
            raise RelaError(f"views={views!r} needs an image size (image_size=...)")
        kw = {}
        if mean is not None:
            kw["mean"] = tuple(mean)
        if std is not None:
            kw["std"] = tuple(std)
        if views == "rela":
            return (rela_view(size, **kw), rela_view(size, **kw))
        if views == "byol":
            return byol_views(size, **kw)
        if views == "eval":
            return (eval_view(size, **kw),)
        raise RelaError(f"unknown views {views!r}: use 'rela', 'byol', 'eval' or ViewSpec objects")
    specs = tuple(views)
    if not specs or not all(isinstance(v, ViewSpec) for v in specs):
        raise RelaError("views must be 'rela', 'byol', 'eval', a ViewSpec or a non-empty list of ViewSpecs")
    return specs


# --- the random draws (every backend makes the same choices from them) ------------------

def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def crop_params(g: torch.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): torchvision's algorithm on our generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def geometry(spec: ViewSpec, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int, bool]:
    """The view's crop box (top, left, h, w) in source pixels and its flip, drawn from `g`.

    A backend that decodes only part of an image (rela._C.decode_resized_crops) needs the box
    before decoding; drawing it here first keeps every backend on the same random stream.
    """
    if spec.crop == "center":
        m = min(height, width)
        top, left, h, w = (height - m) // 2, (width - m) // 2, m, m
    else:
        top, left, h, w = crop_params(g, height, width, spec.scale, spec.ratio)
    flip = bool(spec.flip) and float(torch.rand((), generator=g)) < spec.flip
    return top, left, h, w, flip


JITTER = ("brightness", "contrast", "saturation", "hue")


def colour_params(spec: ViewSpec, g: torch.Generator) -> dict:
    """The view's colour choices as numbers drawn from `g`, so that backends with colour operators
    of their own (DALI) make the same choices as `colour`: brightness/contrast/saturation factors,
    hue as a fraction of a turn, the jitter order, gray, blur sigma (0 = none) and solarize."""
    p = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "order": [],
         "gray": False, "sigma": 0.0, "solarize": False}
    if spec.jitter_p and float(torch.rand((), generator=g)) < spec.jitter_p:
        present = [(name, v) for name, v in zip(JITTER, spec.jitter, strict=True) if v]
        for k in torch.randperm(len(present), generator=g).tolist():
            name, v = present[k]
            p[name] = _uniform(g, -v, v) if name == "hue" else _uniform(g, max(0.0, 1 - v), 1 + v)
            p["order"].append(name)
    p["gray"] = bool(spec.gray_p) and float(torch.rand((), generator=g)) < spec.gray_p
    if spec.blur_p and float(torch.rand((), generator=g)) < spec.blur_p:
        p["sigma"] = _uniform(g, *spec.blur_sigma)
    p["solarize"] = bool(spec.solarize_p) and float(torch.rand((), generator=g)) < spec.solarize_p
    return p


def sample_generator(seed: int, epoch: int, index: int, view: int = 0) -> torch.Generator:
    """The generator for one view of one sample in one epoch (one per view, so a backend may draw
    every view's crop box before decoding and its colours after, on the same streams)."""
    from rela.loading.subset import stream_seed

    return torch.Generator().manual_seed(stream_seed(seed, epoch, index, view, 0x7E1A) & (2**63 - 1))
