"""A prior: a frozen encoder plus the preprocessing it expects, and how its weights are hashed.

Shared by the builders in `rela.data.priors` (torchvision, EfficientNet-Lite, files, students)
and `rela.data.library_priors` (timm, open_clip, transformers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rela import choices
from rela.data.prior_options import PriorOptions
from rela.errors import PriorError

INTERPOLATIONS = choices.INTERPOLATIONS


@dataclass
class Prior:
    """A frozen encoder plus the preprocessing it expects: resize the shorter side to `resize`
    (both sides with `squash`, as SigLIP's processors do) with `interpolation`, centre-crop
    `input_size`, scale to [0, 1], normalise with mean/std. Priors from libraries (timm,
    open_clip, transformers) fill these from the library's own eval transform."""

    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: dict = field(default_factory=dict)
    dim: int = 0
    resize: int | None = None  # None: input_size (no margin cropped away)
    interpolation: str = "bilinear"
    squash: bool = False

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        # Convolutional priors infer in channels_last: EfficientNet-Lite0 on 2 CPU cores ×1.24 at
        # 32 px, ×1.67 at 64 px. Forward only, so oneDNN #6035 (a weight-gradient bug) cannot apply.
        self.memory_format = torch.contiguous_format
        if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self.memory_format = torch.channels_last
            self.model.to(memory_format=self.memory_format)
        if not self.dim:
            with torch.inference_mode():
                self.dim = int(self.model(torch.zeros(2, 3, self.input_size, self.input_size)).shape[1])

    def preprocessing(self) -> dict:
        resize = "shorter side to input_size, bilinear, antialias"  # what every store before timm said
        if self.resize not in (None, self.input_size) or self.interpolation != "bilinear" or self.squash:
            resize = (f"{'both sides' if self.squash else 'shorter side'} to {self.resize or self.input_size}, "
                      f"{self.interpolation}, antialias")
        return {
            "input_size": self.input_size,
            "resize": resize,
            "crop": "center",
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": "grayscale repeated to RGB",
        }

    def resize_crop(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 H×W×C images → uint8 [B, 3, S, S]: shorter side resized to S (antialiased), centre crop.

        Same-sized images (MNIST-like arrays, pre-resized folders) are resized as one batch, which
        is several times cheaper than one call per image. Output stays uint8 so decode workers
        ship a quarter of the bytes; `normalize` finishes the job in the main process.
        """
        from torchvision.transforms.v2 import functional as F

        size = self.resize or self.input_size
        mode = F.InterpolationMode(self.interpolation)

        def prep(batch: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] uint8
            batch = F.resize(batch, [size, size] if self.squash else size, interpolation=mode, antialias=True)
            batch = F.center_crop(batch, [self.input_size, self.input_size])
            return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch

        tensors = [torch.from_numpy(_writable(im)).permute(2, 0, 1) for im in images]
        if len({t.shape for t in tensors}) == 1:
            return prep(torch.stack(tensors)).contiguous()
        return torch.cat([prep(t[None]) for t in tensors]).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] → float32 scaled to [0, 1] and normalised with the prior's mean/std
        (on the batch's device)."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return batch.float().div_(255.0).sub_(mean).div_(std)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> Prior:
        """Run the prior on `device` (the conversion moves uint8 batches there, features back)."""
        self.model.to(device)
        return self

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 H×W×C → normalised float32 3×S×S (resize_crop + normalize for one image)."""
        return self.normalize(self.resize_crop([image]))[0]

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a normalised batch, float32 on the CPU (computed on the prior's device)."""
        with torch.inference_mode():  # targets: no graph, no version counters
            return self.model(batch.to(self.device).contiguous(memory_format=self.memory_format)).float().cpu()


def _writable(image: np.ndarray) -> np.ndarray:
    """A C-contiguous array torch may wrap (PIL and memory maps hand out read-only ones)."""
    image = np.ascontiguousarray(image)
    return image if image.flags.writeable else image.copy()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, bytes), independent of how they were saved."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prior(opts: PriorOptions, model: nn.Module, size: int, mean, std, identity: dict, resize: int | None = None,
           interpolation: str = "bilinear", squash: bool = False) -> Prior:
    """The Prior for `model` with its own preprocessing, where the options don't override it
    (an --input-size without --resize crops no margin)."""
    if opts.input_size:
        size, resize = opts.input_size, None
    resize = opts.resize or resize
    if size < 8:
        raise PriorError(f"input size {size} is too small")
    if resize is not None and resize < size:
        raise PriorError(f"--resize {resize} is below the input size {size}: the centre crop would not fit")
    return Prior(model, size, tuple(opts.mean or mean), tuple(opts.std or std), identity=identity, resize=resize,
                 interpolation=opts.interpolation or interpolation, squash=squash and not opts.resize)


