"""Backend-neutral view specs: what augmentations a training view gets, not how a backend runs them.

Three families are built in:
- `rela`: the RELA phase's view — RandomResizedCrop(scale 0.5–1), flip 0.5,
  ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, normalise; no blur, no solarise.
  The RELA phase uses two of them.
- `byol`: BYOL's two asymmetric views, as lightly's BYOLView1/2Transform: crop 0.08–1, flip 0.5,
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur p 1.0 / 0.1 (σ 0.1–2), solarise p 0 / 0.2.
  Blur follows the resolution, as BYOL's users run it: on at ImageNet sizes, off at ≤ 64 px
  (lightly's CIFAR-10 benchmark and `examples/pytorch/byol.py` use `gaussian_blur=0.0` at 32 px,
  and so does the ReLA reference code at CIFAR size).
- `simclr` (also MoCo's), `dino` (two global views, and with its own arguments
  `"dino,local_crops=6[,local_size=96]"` that many local views: multi-crop) and `supervised` (one
  view): see their functions below; blur follows the resolution in the same way.
- `eval`: resize the shorter side, centre crop, normalise (deterministic).

A preset name may carry overrides, so every knob is settable from the command line:
`"byol,scale=0.2:1"` sets both views' crop scale, `"byol,1.solarize_p=0"` only the second view's
(`K.` picks view K, from 0); tuples are written with `:`. `resolve_views` parses them.

A backend turns a `ViewSpec` into its own operators (the torchvision implementation is
`rela.loading.backends.augment`, used by the `torch` backend); this module holds the specs and the
random draws every backend shares: `geometry` (crop box, flip) and `colour_params`. All random
choices come from an explicit `torch.Generator` (`sample_generator`), so a sample's views depend
only on the seed, the epoch and its index — never on worker count or global RNG state.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from rela import registry
from rela.data.priors import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError


def _role(role: str, default, op: str | None = None):
    """A ViewSpec field and what it is: "geometry" (the crop and flip), "colour" (the probability of
    the colour op `op`, a `ColourParams` op or "jitter": `has_colour` reads these), "colour-param"
    (how a colour op draws) or "normalise"."""
    return field(default=default, metadata={"role": role, "op": op})


@dataclass(frozen=True)
class ViewSpec:
    size: int = field(metadata={"role": "geometry"})
    crop: str = _role("geometry", "random")  # "random": RandomResizedCrop; "center": resize shorter side + centre crop
    scale: tuple[float, float] = _role("geometry", (0.08, 1.0))
    ratio: tuple[float, float] = _role("geometry", (3 / 4, 4 / 3))
    flip: float = _role("geometry", 0.0)
    jitter: tuple[float, float, float, float] = _role("colour-param", (0.0, 0.0, 0.0, 0.0))  # b, c, s, hue
    jitter_p: float = _role("colour", 0.0, op="jitter")
    gray_p: float = _role("colour", 0.0, op="gray")
    blur_p: float = _role("colour", 0.0, op="sigma")
    blur_sigma: tuple[float, float] = _role("colour-param", (0.1, 2.0))
    solarize_p: float = _role("colour", 0.0, op="solarize")
    mean: tuple[float, float, float] = _role("normalise", IMAGENET_MEAN)
    std: tuple[float, float, float] = _role("normalise", IMAGENET_STD)

    @property
    def has_colour(self) -> bool:
        """Whether any colour op may run on this view (else its crops are final pixels): any field
        declared a colour op's probability is non-zero. A new op declares its role, and is counted."""
        return bool(self.colour_ops)

    @property
    def colour_ops(self) -> tuple[str, ...]:
        """The colour ops this view may run ("jitter" or a `ColourParams` op), by their declared role."""
        return tuple(f.metadata["op"] for f in fields(self) if f.metadata["role"] == "colour" and getattr(self, f.name))

    def __post_init__(self) -> None:
        """Every field checked once, here: a view that passes draws finite, in-range numbers."""
        if self.crop not in ("random", "center"):
            raise RelaError(f"crop must be 'random' or 'center', not {self.crop!r}")
        _number("size", self.size, 1, 4096, integer=True)
        for name in ("flip", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            _number(name, getattr(self, name), 0, 1)
        _pair("crop scale", self.scale, 0, 1)
        _pair("crop ratio", self.ratio, 0, 100)
        _pair("blur_sigma", self.blur_sigma, 0, 100)
        jitter = _triple("jitter", self.jitter, 4)
        if any(v < 0 for v in jitter) or jitter[3] > 0.5:
            raise RelaError(f"jitter (brightness, contrast, saturation, hue) must be >= 0 with hue <= 0.5, "
                            f"got {self.jitter}")
        if any(not math.isfinite(v) for v in _triple("mean", self.mean, 3)):
            raise RelaError(f"mean must be three finite numbers, got {self.mean}")
        if any(not (math.isfinite(v) and v > 0) for v in _triple("std", self.std, 3)):
            raise RelaError(f"std must be three finite numbers > 0 (it divides every pixel), got {self.std}")


def _number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (low <= value <= high):
        raise RelaError(f"{name} must be {'an integer' if integer else 'a number'} in [{low}, {high}], got {value!r}")


def _pair(name: str, value, low: float, high: float) -> None:
    """(lo, hi) with low < lo <= hi <= high, both finite."""
    lo, hi = _triple(name, value, 2)
    if not (low < lo <= hi <= high):
        raise RelaError(f"{name} must satisfy {low} < lo <= hi <= {high}, got {value}")


def _triple(name: str, value, n: int) -> tuple[float, ...]:
    """`value` as n finite floats, or a RelaError naming `name`."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RelaError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise RelaError(f"{name} must be {n} finite numbers, got {value!r}")
    return out


def rela_view(size: int, **kw) -> ViewSpec:
    return ViewSpec(size, scale=(0.5, 1.0), flip=0.5, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
                    gray_p=0.2, **kw)


SMALL = 64  # views up to this size are "CIFAR-sized": the presets use their small-image settings


def byol_views(size: int, blur: bool | None = None, **kw) -> tuple[ViewSpec, ViewSpec]:
    """BYOL's two views; `blur=None` chooses by resolution (off at ≤ 64 px, see the module doc)."""
    base = ViewSpec(size, scale=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                    gray_p=0.2, **kw)
    on = size > SMALL if blur is None else blur
    return (replace(base, blur_p=1.0 if on else 0.0, solarize_p=0.0),
            replace(base, blur_p=0.1 if on else 0.0, solarize_p=0.2))


def simclr_views(size: int, blur: bool | None = None, **kw) -> tuple[ViewSpec, ViewSpec]:
    """SimCLR's two identical views (lightly's SimCLRTransform): crop 0.08–1, flip 0.5, jitter
    0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5 (off at ≤ 64 px). MoCo v2 uses them too."""
    on = size > SMALL if blur is None else blur
    v = ViewSpec(size, scale=(0.08, 1.0), flip=0.5, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2,
                 blur_p=0.5 if on else 0.0, **kw)
    return v, v


def dino_views(size: int, blur: bool | None = None, local_crops: int = 0, local_size: int | None = None,
               **kw) -> tuple[ViewSpec, ...]:
    """DINO's views as lightly's DINOTransform makes them (colour-jitter strength 0.5): two global
    views — crop 0.4–1, flip 0.5, jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur p 1.0 /
    0.1, solarise 0 / 0.2 — then `local_crops` local views of `local_size` (default
    `dino_local_size(size)`): crop 0.05–0.4, the same flip and colour, blur p 0.5. Blur is off at
    ≤ 64 px, as elsewhere. Every view gets its own random draw."""
    on = size > SMALL if blur is None else blur
    base = ViewSpec(size, scale=(0.4, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, **kw)
    views = (replace(base, blur_p=1.0 if on else 0.0), replace(base, blur_p=0.1 if on else 0.0, solarize_p=0.2))
    local = replace(base, size=local_size or dino_local_size(size), scale=(0.05, 0.4), blur_p=0.5 if on else 0.0)
    return views + (local,) * int(local_crops)


def dino_local_size(size: int) -> int:
    """DINO's local crop size at global size `size`: 96/224 of it (DINO's and lightly's 96 px at
    224), at least 8 px."""
    return max(8, round(size * 96 / 224))


def supervised_view(size: int, **kw) -> ViewSpec:
    """Supervised training's one view: RandomResizedCrop 0.08–1 and flip (torchvision's recipe)."""
    return ViewSpec(size, scale=(0.08, 1.0), flip=0.5, **kw)


def eval_view(size: int, **kw) -> ViewSpec:
    return ViewSpec(size, crop="center", **kw)


def rela_views(size: int, **kw) -> tuple[ViewSpec, ViewSpec]:
    """The RELA phase's two views (`rela_view` twice)."""
    return rela_view(size, **kw), rela_view(size, **kw)


def supervised_views(size: int, **kw) -> tuple[ViewSpec]:
    return (supervised_view(size, **kw),)


def eval_views(size: int, **kw) -> tuple[ViewSpec]:
    return (eval_view(size, **kw),)


def preset_arguments(preset) -> tuple[str, ...]:
    """A preset function's own arguments, set as `"name,arg=N"` (dino's `local_crops`,
    `local_size`): its named parameters other than `size` and `blur` (the ViewSpec fields it passes
    on arrive through `**kw`, not as named parameters)."""
    return tuple(name for name, p in inspect.signature(preset).parameters.items()
                 if name not in ("size", "blur") and p.kind is p.POSITIONAL_OR_KEYWORD)


def resolve_views(views: str | ViewSpec | Sequence[ViewSpec] | Callable[[int], Sequence[ViewSpec]],
                  size: int | None = None,
                  mean=None, std=None) -> tuple[ViewSpec, ...]:
    """Turn 'rela' / 'byol' / 'eval' (with an image size), a spec, a list of specs, or a function
    of the image size that returns them (a method's own views) into a tuple."""
    if isinstance(views, ViewSpec):
        return (views,)
    if inspect.isfunction(views) or inspect.ismethod(views) or isinstance(views, functools.partial):
        if size is None:
            raise RelaError(f"views={getattr(views, '__name__', views)!r} is a function of the image size: "
                            "give image_size=...")
        return resolve_views(views(size))
    if isinstance(views, str):
        if size is None:
            raise RelaError(f"views={views!r} needs an image size (image_size=...)")
        kw = {}
        if mean is not None:
            kw["mean"] = tuple(mean)
        if std is not None:
            kw["std"] = tuple(std)
        name, *overrides = [part.strip() for part in views.split(",")]
        if name not in registry.VIEWS:
            raise RelaError(f"unknown views {name!r}: use one of {', '.join(registry.VIEWS)} (with ,key=value "
                            "overrides) or ViewSpec objects")
        preset = registry.VIEWS[name].load()
        # the preset's own arguments; another preset's override of these names is refused by _override
        args, overrides = _preset_args(overrides, preset_arguments(preset), views)
        return _override(tuple(preset(size, **kw, **args)), [o for o in overrides if o], views)
    specs = tuple(views)
    if not specs or not all(isinstance(v, ViewSpec) for v in specs):
        raise RelaError("views must be 'rela', 'byol', 'eval', a ViewSpec or a non-empty list of ViewSpecs")
    return specs


def _preset_args(overrides: list[str], names: tuple[str, ...], text: str) -> tuple[dict, list[str]]:
    """A preset's own integer arguments among the overrides ("dino,local_crops=6,local_size=16"),
    and the overrides left for the views' fields."""
    args, rest = {}, []
    for item in overrides:
        key, _, value = (s.strip() for s in item.partition("="))
        if key not in names:
            rest.append(item)
        elif not value.isdigit():
            raise RelaError(f"views {text!r}: {key} takes a whole number, got {value!r}")
        else:
            args[key] = int(value)
    return args, rest


def _override(specs: tuple[ViewSpec, ...], overrides: list[str], text: str) -> tuple[ViewSpec, ...]:
    """Apply `key=value` (every view) and `K.key=value` (view K) overrides to preset specs."""
    defaults = {f.name: f.default for f in fields(ViewSpec) if f.name != "size"}
    specs = list(specs)
    for item in overrides:
        key, eq, value = item.partition("=")
        view, dot, key = key.strip().rpartition(".")
        if not eq or key not in defaults:
            raise RelaError(f"views {text!r}: cannot read {item!r}; write key=value or K.key=value with a key "
                            f"among {', '.join(defaults)}")
        which = range(len(specs))
        if dot:
            if not view.isdigit() or int(view) >= len(specs):
                raise RelaError(f"views {text!r}: {item!r} names view {view}, the preset has views 0..{len(specs) - 1}")
            which = [int(view)]
        default = defaults[key]
        try:
            parsed = (tuple(float(v) for v in value.split(":")) if isinstance(default, tuple)
                      else value.strip() if isinstance(default, str) else float(value))
        except ValueError:
            raise RelaError(
                f"views {text!r}: {item!r} needs a number{'s separated by :' if isinstance(default, tuple) else ''}"
            ) from None
        if isinstance(default, tuple) and len(parsed) != len(default):
            raise RelaError(f"views {text!r}: {key} takes {len(default)} numbers separated by ':', got {value!r}")
        for k in which:
            specs[k] = replace(specs[k], **{key: parsed})
    return tuple(specs)


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


@dataclass(frozen=True)
class ColourParams:
    """One view's drawn colour choices — the one declaration of the colour ops. The jitter
    factors (hue as a fraction of a turn) apply in `order` (ColorJitter's random order); every
    other field is one op, applied after them in field order.

    Adding an op touches three source files: a field here and its draw in `colour_params`; its
    slot, layout entry and function in csrc/views.cpp (`rela._C.colour_layout()` exports the slots
    and `rela._ext.pack_colour` fills them by name); its reference in `augment.colour_reference`
    and the batched device path beside it (`augment.BATCHED_OPS`). tests/loading/test_colour_kernel.py
    fails until all three have it. DALI's pipeline is an optional fourth: a view with an op outside
    `dali.DALI_OPS` is built by the torch builder (the same draws), correct but not DALI-fast."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[str, ...] = ()
    gray: bool = False
    sigma: float = 0.0  # blur, 0 = none
    solarize: bool = False

    @classmethod
    def ops(cls) -> tuple[str, ...]:
        """The ops after the jitter, by name (every field but the jitter factors and their order)."""
        return tuple(f.name for f in fields(cls) if f.name not in JITTER and f.name != "order")


def blur_radius(sigma: float, height: int, width: int) -> int:
    """The Gaussian blur's radius: 3 sigma rounded up, at most what fits in the image (the kernel is
    2 radius + 1 wide) — the rule of the reference, the batched path and csrc/views.cpp."""
    return min(math.ceil(3 * sigma), (min(height, width) - 1) // 2)


def colour_params(spec: ViewSpec, g: torch.Generator) -> ColourParams:
    """The view's colour choices as numbers drawn from `g`, so that backends with colour operators
    of their own (DALI) make the same choices as `colour`."""
    factors, order = {}, []
    if spec.jitter_p and float(torch.rand((), generator=g)) < spec.jitter_p:
        present = [(name, v) for name, v in zip(JITTER, spec.jitter, strict=True) if v]
        for k in torch.randperm(len(present), generator=g).tolist():
            name, v = present[k]
            factors[name] = _uniform(g, -v, v) if name == "hue" else _uniform(g, max(0.0, 1 - v), 1 + v)
            order.append(name)
    gray = bool(spec.gray_p) and float(torch.rand((), generator=g)) < spec.gray_p
    sigma = _uniform(g, *spec.blur_sigma) if spec.blur_p and float(torch.rand((), generator=g)) < spec.blur_p else 0.0
    solarize = bool(spec.solarize_p) and float(torch.rand((), generator=g)) < spec.solarize_p
    return ColourParams(**factors, order=tuple(order), gray=gray, sigma=sigma, solarize=solarize)


_VIEW_STREAM = 0x7E1A  # the views' key among rela's random streams (subset.stream_seed)


def sample_generator(seed: int, epoch: int, index: int, view: int = 0) -> torch.Generator:
    """The generator for one view of one sample in one epoch (one per view, so a backend may draw
    every view's crop box before decoding and its colours after, on the same streams)."""
    from rela.loading.subset import stream_seed

    return torch.Generator().manual_seed(stream_seed(seed, epoch, index, view, _VIEW_STREAM) & (2**63 - 1))


def geometry_batch(spec: ViewSpec, seed: int, epoch: int, indices: Sequence[int], view: int,
                   heights: Sequence[int], widths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`geometry` of view `view` for many samples: boxes [N, 4] (top, left, h, w) and flips [N],
    the same numbers from the same streams. In C++ when rela._C is built (a torch.Generator and
    ~10 torch calls per sample and view cost ~40 µs, 5–8% of a plain crop's CPU time)."""
    from rela import _ext

    if _ext.has_extension():
        return _ext.draw_geometry([seed & (2**64 - 1), epoch], indices, [view, _VIEW_STREAM], heights, widths,
                                  spec.crop != "center", spec.scale, spec.ratio, spec.flip)
    drawn = [geometry(spec, h, w, sample_generator(seed, epoch, i, view))
             for i, h, w in zip(indices, heights, widths, strict=True)]
    return (np.asarray([d[:4] for d in drawn], np.int32).reshape(-1, 4),
            np.asarray([d[4] for d in drawn], np.uint8))
