"""Image bytes to uint8 HWC arrays: libjpeg's header read, the JPEG fast path, PIL for the rest."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from rela.data.datasets.base import MAX_PIXELS

# torchvision 0.29 deprecates its image codecs (warning on every call) in favour of TorchCodec;
# they are still the fastest JPEG decoder installed here. Silence exactly that message; move to
# TorchCodec once its image decoding is available to us.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A `load()` result (uint8 H×W×C, C = 1 or 3) as a contiguous H×W×3 array, for libraries
    that take only RGB (DALI's external source, FFCV's RGBImageField)."""
    image = np.asarray(image)
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


def jpeg_header(data) -> tuple[int, int]:
    """(width, height) of a JPEG as its decoder reads them: libjpeg's own `jpeg_read_header` in
    rela._C (PIL's header parse without the extension). The only size rela uses for a JPEG — crop
    boxes, the pixel limit — so no second parser can disagree with the decoder. ValueError with the
    reason when there is none (not a JPEG, a cut header, a zero width or height)."""
    from rela import _ext

    if _ext.has_jpeg_decoder():
        w, h = _ext.jpeg_header(data)[:2]
    else:
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
    check_size(w, h)
    return w, h


def check_size(width: int, height: int) -> None:
    """Refuse an image size before anything is allocated for it: empty, or over MAX_PIXELS."""
    if width < 1 or height < 1:
        raise ValueError(f"its header says {width}x{height} pixels (an empty image)")
    if width * height > MAX_PIXELS:
        raise ValueError(f"declared size {width}x{height} exceeds the {MAX_PIXELS:,}-pixel limit")


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """libjpeg-turbo through torchvision (faster than PIL); None for what it doesn't handle (CMYK).
    The size is read (and refused) before torchvision allocates anything."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    w, h = jpeg_header(data)
    try:
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise ValueError(str(e).strip().splitlines()[-1]) from None
    if t.shape[0] not in (1, 3):
        return None
    if tuple(t.shape[1:]) != (h, w):  # two libjpeg copies that disagree: trust neither
        raise ValueError(f"decoded {t.shape[2]}x{t.shape[1]} pixels where its header says {w}x{h}")
    return t.permute(1, 2, 0).numpy()  # H×W×C view of the C×H×W buffer: no copy


def decode_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 H×W×C (C = 1 or 3); raises ValueError with the reason."""
    if str(path).lower().endswith((".jpg", ".jpeg")):  # read once; libjpeg-turbo first, PIL for the rest
        try:
            return decode_bytes(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(str(e)) from None
    return _decode_pil(path)


def decode_bytes(data: bytes) -> np.ndarray:
    """`decode_image` for an encoded image held in memory (e.g. a tar member)."""
    import io

    if not data:
        raise ValueError("empty file")
    if data[:2] == b"\xff\xd8":
        out = _decode_jpeg(data)
        if out is not None:
            return out
    return _decode_pil(io.BytesIO(data))


def _decode_pil(source) -> np.ndarray:
    """PIL's decode of a path or file object to uint8 H×W×C; ValueError with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            check_size(*im.size)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                return np.clip(np.rint(a * (255.0 / _full_scale(im.mode, a))), 0, 255).astype(np.uint8)[..., None]
            if im.mode == "L":
                return np.asarray(im, dtype=np.uint8)[..., None]
            if im.mode != "RGB":
                im = im.convert("RGB")  # CMYK, P, RGBA, LA, YCbCr ...
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(str(e) or type(e).__name__) from e


def _full_scale(mode: str, a: np.ndarray) -> float:
    """The white of a high-bit-depth greyscale image: its bit depth, never its own brightest pixel
    (a dark 16-bit image must stay dark). PIL opens 16-bit PNG/PGM/TIFF as I;16* or I (32-bit
    container of 16-bit data); an I image with values past 16 bits is taken as 32-bit. F keeps its
    earlier rule (16-bit values past 255, else 8-bit)."""
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "I":
        return 65535.0 if a.size == 0 or a.max() <= 65535 else 4294967295.0
    return 65535.0 if a.size and a.max() > 255 else 255.0
