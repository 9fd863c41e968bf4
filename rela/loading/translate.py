"""Transforms people already have, as view specs: a torchvision `Compose` (v1 or v2) of the usual
SSL operations, or a lightly multi-view transform (`BYOLTransform`, `SimCLRTransform`, ...).

rela runs views itself (decode once, draw every random number from its own per-sample streams),
so a transform is translated into `ViewSpec`s rather than called. What maps: RandomResizedCrop
(square), Resize + CenterCrop, horizontal flip, ColorJitter (alone or in RandomApply), grayscale,
Gaussian blur (kernel size from σ, as rela's views), solarise at the uint8 midpoint, Normalize;
tensor conversions are dropped. Anything else — or the same operations in another order than
crop → flip → jitter → grayscale → blur → solarise — is refused by name: build a `ViewSpec`.
"""

from __future__ import annotations

from rela.errors import RelaError
from rela.loading.views import ViewSpec

_ORDER = ("crop", "flip", "jitter", "gray", "blur", "solarize", "normalize")
_DROPPED = {"ToTensor", "PILToTensor", "ToImage", "ToDtype", "ConvertImageDtype", "ToPureTensor"}


def from_lightly(transform) -> tuple[ViewSpec, ...]:
    """A lightly `MultiViewTransform` (BYOLTransform, SimCLRTransform, DINOTransform without local
    views, ...) → one ViewSpec per view."""
    views = getattr(transform, "transforms", None)
    if not isinstance(views, (list, tuple)) or not views:
        raise RelaError(f"{type(transform).__name__} is not a lightly multi-view transform (no .transforms)")
    return tuple(from_torchvision(getattr(v, "transform", v)) for v in views)


def from_torchvision(transform) -> ViewSpec:
    """A torchvision Compose (or one operation) → a ViewSpec; refuses what doesn't map, by name."""
    ops = list(getattr(transform, "transforms", [transform]))
    fields: dict = {}
    last = -1
    for op in ops:
        name = type(op).__name__
        if name in _DROPPED:
            continue
        kind, values = _translate(op, name, fields)
        if kind is None:
            continue
        rank = _ORDER.index(kind)
        if rank < last:
            raise RelaError(f"{name} comes after an operation rela applies later ({_ORDER[last]}); rela's views run "
                            f"{' → '.join(_ORDER)}: reorder the transform or build a ViewSpec")
        last = rank
        fields.update(values)
    if "size" not in fields:
        raise RelaError("the transform has no RandomResizedCrop or Resize + CenterCrop: rela needs the view size")
    return ViewSpec(**fields)


def _square(size, name: str) -> int:
    s = (size, size) if isinstance(size, int) else tuple(size)
    if len(s) == 1:
        s = (s[0], s[0])
    if s[0] != s[1]:
        raise RelaError(f"{name} makes {s[0]}x{s[1]} views; rela's views are square")
    return int(s[0])


def _jitter(op) -> dict:
    """ColorJitter's stored ranges back to its arguments (brightness b ↔ [max(0, 1 − b), 1 + b])."""
    out = []
    for attr in ("brightness", "contrast", "saturation", "hue"):
        r = getattr(op, attr)
        if r is None:
            out.append(0.0)
            continue
        lo, hi = (float(x) for x in r)
        v = round(hi if attr == "hue" else hi - 1, 12)  # (1 + b) - 1 is b up to rounding
        want = -v if attr == "hue" else max(0.0, 1 - v)
        if abs(lo - want) > 1e-9:
            raise RelaError(f"ColorJitter {attr} range ({lo}, {hi}) is not symmetric; rela's jitter draws "
                            f"{'(-h, h)' if attr == 'hue' else '(max(0, 1 - v), 1 + v)'}")
        out.append(v)
    return {"jitter": tuple(out)}


def _blur_sigma(op) -> tuple[float, float]:
    sigma = getattr(op, "sigmas", None) or op.sigma
    sigma = (sigma, sigma) if isinstance(sigma, (int, float)) else tuple(sigma)
    return float(sigma[0]), float(sigma[-1])


def _translate(op, name: str, fields: dict):
    """(kind, ViewSpec fields) for one operation; (None, {}) for a no-op."""
    if name == "RandomResizedCrop":
        return "crop", {"size": _square(op.size, name), "scale": tuple(map(float, op.scale)),
                        "ratio": tuple(map(float, op.ratio)), "crop": "random"}
    if name == "Resize":
        return "crop", {"size": _square(op.size, name), "crop": "center"}
    if name == "CenterCrop":
        size = _square(op.size, name)
        if fields.get("crop") != "center" or fields.get("size") != size:
            raise RelaError("CenterCrop maps only after Resize to the same size (rela's eval view)")
        return "crop", {}
    if name == "RandomHorizontalFlip":
        return "flip", {"flip": float(op.p)}
    if name in ("RandomVerticalFlip", "RandomRotate") and not float(getattr(op, "p", getattr(op, "prob", 1))):
        return None, {}  # lightly adds these with probability 0
    if name == "ColorJitter":
        return "jitter", {**_jitter(op), "jitter_p": 1.0}
    if name == "RandomApply":
        inner = list(op.transforms)
        if len(inner) != 1:
            raise RelaError("RandomApply maps only around a single ColorJitter or GaussianBlur")
        kind, values = _translate(inner[0], type(inner[0]).__name__, fields)
        p = float(op.p)
        if kind == "jitter":
            return kind, {**values, "jitter_p": p}
        if kind == "blur":
            return kind, {**values, "blur_p": p}
        raise RelaError(f"RandomApply around {type(inner[0]).__name__} does not map to a view")
    if name == "RandomGrayscale":
        return "gray", {"gray_p": float(op.p)}
    if name == "Grayscale":
        return "gray", {"gray_p": 1.0}
    if name == "GaussianBlur":
        return "blur", {"blur_p": float(getattr(op, "prob", 1.0)), "blur_sigma": _blur_sigma(op)}
    if name in ("RandomSolarize", "RandomSolarization"):
        threshold = float(op.threshold)
        if threshold not in (128.0, 0.5):
            raise RelaError(f"{name} at threshold {threshold}: rela solarises at the midpoint (128, or 0.5 on floats)")
        return "solarize", {"solarize_p": float(getattr(op, "p", getattr(op, "prob", 1.0)))}
    if name == "Normalize":
        return "normalize", {"mean": tuple(map(float, op.mean)), "std": tuple(map(float, op.std))}
    raise RelaError(f"cannot translate {name} into a rela view: supported are RandomResizedCrop, Resize + CenterCrop, "
                    "RandomHorizontalFlip, ColorJitter / RandomApply(ColorJitter), RandomGrayscale, GaussianBlur, "
                    "RandomSolarize, Normalize; build a ViewSpec for anything else")


def as_views(views):
    """What `rela.Loader(views=...)` accepts beyond presets and ViewSpecs: a lightly multi-view
    transform or a torchvision Compose, translated; everything else is returned unchanged."""
    if isinstance(views, (str, ViewSpec)) or (
        isinstance(views, (list, tuple)) and all(isinstance(v, ViewSpec) for v in views)
    ):
        return views
    inner = getattr(views, "transforms", None)
    if isinstance(inner, (list, tuple)) and inner and all(hasattr(v, "transform") for v in inner):
        return from_lightly(views)  # lightly: a list of per-view transforms, each holding a Compose
    if hasattr(views, "transforms") or type(views).__module__.startswith("torchvision"):
        return (from_torchvision(views),)
    return views
