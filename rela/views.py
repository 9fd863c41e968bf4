"""Backend-neutral view specs: what augmentations a training view gets, not how a backend runs them.

Three families are built in:
- `rela`: the RELA phase's view — RandomResizedCrop(scale 0.5–1), flip 0.5,
  ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, normalise; no blur, no solarise.
  The RELA phase uses two of them.
- `byol`: BYOL's two asymmetric views, as lightly's BYOLView1/2Transform: crop 0.08–1, flip 0.5,
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur p 1.0 / 0.1 (σ 0.1–2), solarise p 0 / 0.2.
- `eval`: resize the shorter side, centre crop, normalise (deterministic).

A backend turns a `ViewSpec` into its own operators; `apply_view` here is the torchvision
(transforms.v2 functional, uint8 tensors) implementation used by the `torch` backend. All random
choices come from an explicit `torch.Generator`, so a sample's views depend only on the seed,
the epoch and its index — never on worker count or global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from rela.errors import RelaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# --- the torchvision implementation ---------------------------------------------------------

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


def apply_view(spec: ViewSpec, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 C×H×W (C = 1 or 3) → normalised float32 3×S×S, all randomness from `g`."""
    return normalize_batch(spec, augment(spec, image, g)[None])[0]


def normalize_batch(spec: ViewSpec, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S] → float32 (x/255 − mean)/std in two passes over the batch (into `out`)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std]).view(1, 3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std, strict=True)]).view(1, 3, 1, 1)
    if out is None:
        out = torch.empty(batch.shape, dtype=torch.float32)
    return out.copy_(batch).mul_(scale).add_(bias)  # in place: ~6x faster than a promoting mul


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


def augment(spec: ViewSpec, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The view's geometry and colour operations: uint8 C×H×W → uint8 3×S×S."""
    from torchvision.transforms.v2 import functional as F

    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    s = spec.size
    top, left, h, w, flip = geometry(spec, image.shape[1], image.shape[2], g)
    x = F.resized_crop(image, top, left, h, w, [s, s], antialias=True)
    if flip:
        x = F.horizontal_flip(x)
    return colour(spec, x, g)


def colour(spec: ViewSpec, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The view's colour operations on a uint8 3×S×S crop, after `geometry` drew from `g`."""
    from torchvision.transforms.v2 import functional as F

    p = colour_params(spec, g)
    adjust = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
              "saturation": F.adjust_saturation, "hue": F.adjust_hue}
    for name in p["order"]:  # ColorJitter's random order
        x = adjust[name](x, p[name])
    if p["gray"]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p["sigma"]:
        k = min(2 * math.ceil(3 * p["sigma"]) + 1, (min(x.shape[-2:]) - 1) | 1)
        x = F.gaussian_blur(x, [k, k], [p["sigma"], p["sigma"]])
    if p["solarize"]:
        x = F.solarize(x, 128)
    return x


_JITTER = ("brightness", "contrast", "saturation", "hue")


def colour_params(spec: ViewSpec, g: torch.Generator) -> dict:
    """The view's colour choices as numbers drawn from `g`, so that backends with colour operators
    of their own (DALI) make the same choices as `colour`: brightness/contrast/saturation factors,
    hue as a fraction of a turn, the jitter order, gray, blur sigma (0 = none) and solarize."""
    p = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "order": [],
         "gray": False, "sigma": 0.0, "solarize": False}
    if spec.jitter_p and float(torch.rand((), generator=g)) < spec.jitter_p:
        present = [(name, v) for name, v in zip(_JITTER, spec.jitter, strict=True) if v]
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
    from rela.subset import stream_seed

    return torch.Generator().manual_seed(stream_seed(seed, epoch, index, view, 0x7E1A) & (2**63 - 1))


# --- the batched implementation (in-memory datasets: many small images of one size) ----------

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] * _GRAY[0] + x[:, 1] * _GRAY[1] + x[:, 2] * _GRAY[2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] → hue rotated by `shift` (fractions of a turn, per row) → RGB."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h.unsqueeze(1) * 6) % 6
    return maxc.unsqueeze(1) - (maxc * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-row Gaussian blur (separable, reflect padding) as one grouped convolution."""
    n, c, h, w = x.shape
    radius = min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, K]
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def augment_batch(spec: ViewSpec, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """`augment` for a batch of same-size uint8 images [B, C, H, W] → uint8 [B, 3, S, S], with the
    same random choices (row i draws from gens[i]) but vectorised: crops and resizes in one
    `roi_align` (bilinear, averaging ⌈box/S⌉² samples per pixel as antialiasing), colour
    operations as masked whole-batch tensor ops. Pixels differ from `augment` only by
    interpolation and rounding; it exists because per-image torchvision calls cost ~1 ms each,
    which dominated training on 28×28 data."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    s = spec.size
    geo = [geometry(spec, height, width, g) for g in gens]
    if len({b[:4] for b in geo}) == 1:  # one box for all (centre crops): torchvision's exact resize
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = geo[0][:4]
        u8 = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = F.resized_crop(u8, top, left, h, w, [s, s], antialias=True).float()
    else:
        boxes = torch.tensor([[i, left, top, left + w, top + h] for i, (top, left, h, w, _) in enumerate(geo)],
                             dtype=torch.float32)
        ratio = max(1, math.ceil(max(max(b[2], b[3]) for b in geo) / s))
        x = roi_align(x.contiguous(), boxes, (s, s), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)
    flip = torch.tensor([b[4] for b in geo])
    if flip.any():
        x[flip] = x[flip].flip(-1)
    params = [colour_params(spec, g) for g in gens]
    x = x.clamp_(0, 255)
    for slot in range(4):  # ColorJitter's per-row random order: apply slot by slot
        for name in _JITTER:
            rows = torch.tensor([i for i, p in enumerate(params) if len(p["order"]) > slot and p["order"][slot] == name],
                                dtype=torch.int64)
            if not len(rows):
                continue
            f = torch.tensor([params[i][name] for i in rows.tolist()], dtype=x.dtype).view(-1, 1, 1, 1)
            v = x[rows]
            if name == "brightness":
                v = v * f
            elif name == "contrast":
                m = _gray(v).mean((1, 2, 3), keepdim=True)
                v = (v - m) * f + m
            elif name == "saturation":
                gr = _gray(v)
                v = (v - gr) * f + gr
            else:
                v = _shift_hue(v / 255.0, f.view(-1)) * 255.0
            x[rows] = v.clamp_(0, 255)
    gray = torch.tensor([p["gray"] for p in params])
    if gray.any():
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    sig = torch.tensor([p["sigma"] for p in params])
    if (sig > 0).any():
        rows = sig > 0
        x[rows] = _blur(x[rows], sig[rows])
    sol = torch.tensor([p["solarize"] for p in params])
    if sol.any():
        v = x[sol].round()
        x[sol] = torch.where(v >= 128, 255 - v, v)
    return x.round_().clamp_(0, 255).to(torch.uint8)
