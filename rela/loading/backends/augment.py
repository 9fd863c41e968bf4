"""The torchvision implementation of the view specs (transforms.v2 functional on uint8 tensors).

The `torch` backend runs views with these functions, the `ffcv` backend runs its colour
operations with `colour`, and they are the reference the other backends are tested against. The
random choices come from `rela.loading.views` (`geometry`, `colour_params`) on the caller's
generator, so every implementation makes the same choices.

- `augment` = `crop` + `colour`: one image, per-image torchvision calls (the reference),
- `colour_rows`: the colour operations of many rows in rela._C's C++ kernel (the torch
  backend's path; torchvision per row without the extension),
- `augment_batch` = `crop_batch` + colour: many same-size images (in-memory datasets), vectorised,
- `colour_batch_tensor`: colour as batched tensor ops on any device (the GPU-side stage),
- `normalize_batch`: uint8 batch → normalised float32.
"""

from __future__ import annotations

import math

import torch

from rela import _ext
from rela.loading.views import JITTER, ColourParams, ViewSpec, blur_radius, colour_params, geometry


def apply_view(spec: ViewSpec, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 C×H×W (C = 1 or 3) → normalised float32 3×S×S, all randomness from `g`."""
    return normalize_batch(spec, augment(spec, image, g)[None])[0]


def normalisation(spec: ViewSpec) -> tuple[list[float], list[float]]:
    """(x / 255 − mean) / std as x · scale + bias: the per-channel (scale, bias) that
    `normalize_batch` and the C++ resampler's fused output both apply (the same float32 numbers)."""
    return [1.0 / (255.0 * s) for s in spec.std], [-m / s for m, s in zip(spec.mean, spec.std, strict=True)]


def normalize_batch(spec: ViewSpec, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S] → float32 (x/255 − mean)/std in two passes over the batch (into `out`),
    on the batch's device (the loader's uint8 hand-off normalises on the GPU)."""
    scale, bias = (torch.tensor(t).view(1, 3, 1, 1).to(batch.device) for t in normalisation(spec))
    if out is None:
        out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
    return out.copy_(batch).mul_(scale).add_(bias)  # in place: ~6x faster than a promoting mul


def augment(spec: ViewSpec, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The view's geometry and colour operations: uint8 C×H×W → uint8 3×S×S."""
    return colour(spec, crop(spec, image, g), g)


def crop(spec: ViewSpec, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The view's geometry (random resized crop, flip) drawn from `g`: uint8 C×H×W → uint8 3×S×S."""
    from torchvision.transforms.v2 import functional as F

    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    s = spec.size
    top, left, h, w, flip = geometry(spec, image.shape[1], image.shape[2], g)
    x = F.resized_crop(image, top, left, h, w, [s, s], antialias=True)
    if flip:
        x = F.horizontal_flip(x)
    return x


def colour(spec: ViewSpec, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The view's colour operations on a uint8 3×S×S crop, after `geometry` drew from `g`."""
    return colour_reference(colour_params(spec, g), x)


def colour_rows(specs_params: list[ColourParams], batch: torch.Tensor, rows: list[int], threads: int = 1) -> None:
    """Colour operations on `rows` of a uint8 [N, 3, S, S] batch, in place: one C++ call over the
    rows (threads over them, the GIL released) where rela._C has the kernel, else torchvision's
    ops per row (`colour_reference`, the reference the C++ kernel is tested against)."""
    if not rows:
        return
    if _ext.has_colour_kernel() and batch.is_contiguous():
        sub = batch if len(rows) == len(batch) else batch[rows].contiguous()
        _ext.colour_batch(sub.numpy(), [_ext.pack_colour(p) for p in specs_params], threads)
        if sub is not batch:
            batch[rows] = sub
        return
    for row, p in zip(rows, specs_params, strict=True):
        batch[row] = colour_reference(p, batch[row])


def colour_reference(p: ColourParams, x: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.v2's ops for the drawn choices `p` on a uint8 3×S×S image."""
    from torchvision.transforms.v2 import functional as F

    adjust = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
              "saturation": F.adjust_saturation, "hue": F.adjust_hue}
    for name in p.order:  # ColorJitter's random order
        x = adjust[name](x, getattr(p, name))
    if p.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.sigma:
        k = 2 * blur_radius(p.sigma, *x.shape[-2:]) + 1
        if k > 1:
            x = F.gaussian_blur(x, [k, k], [p.sigma, p.sigma])
    if p.solarize:
        x = F.solarize(x, 128)
    return x


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
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h.unsqueeze(1) * 6) % 6
    return maxc.unsqueeze(1) - (maxc * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _blur(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Per-row Gaussian blur (separable, reflect padding) as one grouped convolution."""
    n, c, h, w = x.shape
    radius = blur_radius(max(sigmas), h, w)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    sigma = torch.tensor(sigmas, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, K]
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def augment_batch(spec: ViewSpec, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """`augment` for a batch of same-size uint8 images: `crop_batch`, then `colour_rows` — what the
    torch backend runs for in-memory data."""
    u8 = crop_batch(spec, images, gens)
    colour_rows([colour_params(spec, g) for g in gens], u8, list(range(len(gens))))
    return u8


def crop_batch(spec: ViewSpec, images: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """`crop` for a batch of same-size uint8 images [B, C, H, W] → uint8 [B, 3, S, S], with the
    same random choices (row i draws from gens[i]) but vectorised: crops and resizes in
    one `roi_align` (bilinear, averaging ⌈box/S⌉² samples per pixel as antialiasing). Pixels
    differ from `crop` only by interpolation; it exists because per-image torchvision calls cost
    ~1 ms each, which dominated training on 28×28 data."""
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
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


BATCHED_OPS = ("gray", "sigma", "solarize")  # the ColourParams ops colour_batch_tensor applies


def colour_batch_tensor(x: torch.Tensor, params: list[ColourParams]) -> torch.Tensor:
    """The colour operations of a float [B, 3, S, S] batch in 0..255 as masked whole-batch tensor
    ops on its own device (row i takes params[i]): the loader's device-side stage. Float
    arithmetic throughout, so pixels differ from torchvision's uint8 ops by rounding only."""
    dev = x.device
    x = x.clamp_(0, 255)
    for slot in range(4):  # ColorJitter's per-row random order: apply slot by slot
        for name in JITTER:
            picked = [i for i, p in enumerate(params) if len(p.order) > slot and p.order[slot] == name]
            if not picked:
                continue
            rows = torch.tensor(picked, dtype=torch.int64, device=dev)
            f = torch.tensor([getattr(params[i], name) for i in picked], dtype=x.dtype, device=dev).view(-1, 1, 1, 1)
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
    def rows_where(key):  # index tensors from host-side choices: no boolean-mask sync on a GPU
        picked = [i for i, p in enumerate(params) if getattr(p, key)]
        return torch.tensor(picked, dtype=torch.int64, device=dev) if picked else None

    if (rows := rows_where("gray")) is not None:
        x[rows] = _gray(x[rows]).expand(-1, 3, -1, -1)
    if (rows := rows_where("sigma")) is not None:
        x[rows] = _blur(x[rows], [p.sigma for p in params if p.sigma])
    if (rows := rows_where("solarize")) is not None:
        v = x[rows].round()
        x[rows] = torch.where(v >= 128, 255 - v, v)
    return x

