"""Access to the compiled helpers in `rela._C`, with a pure-Python fallback.

The fallback runs the same algorithms on the same portable RNG stream, so results do not
depend on whether the extension was built; it is only slower, and says so once.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np

from rela.errors import RelaWarning

try:  # pragma: no cover - exercised by whichever build is installed
    from rela import _C
except ImportError:  # pragma: no cover
    _C = None

_MASK = (1 << 64) - 1
_warned = False


def has_extension() -> bool:
    return _C is not None


def has_jpeg_decoder() -> bool:
    """True if rela._C was built against libjpeg-turbo (crop-while-decoding JPEGs)."""
    return _C is not None and hasattr(_C, "decode_resized_crops")


def draw_geometry(prefix, indices, suffix, heights, widths, random: bool, scale, ratio, flip: float):
    """One view's crop boxes [N, 4] and flips [N] for a batch (see csrc/geometry.h); only with
    has_extension(). Sample i's stream is SeedSequence([*prefix, indices[i], *suffix])."""
    return _C.draw_geometry([int(v) for v in prefix], np.asarray(indices, np.int64), [int(v) for v in suffix],
                            np.asarray(heights, np.int32), np.asarray(widths, np.int32), bool(random),
                            tuple(map(float, scale)), tuple(map(float, ratio)), float(flip))


def jpeg_header(data) -> tuple[int, int, int, bool]:
    """(width, height, components, cmyk) from libjpeg's header read; ValueError otherwise. Only
    with has_jpeg_decoder()."""
    return _C.jpeg_header(data)


def decode_resized_crops(jpegs, boxes, flips, out_size, threads: int = 1, outs=None, rows=None, scale=None,
                         bias=None, fit: float = 1.0):
    """See csrc/jpeg.h; only with has_jpeg_decoder(). `out_size`: one size, or one per view
    (multi-crop). `threads` images are decoded at a time. With `outs` (one [N, 3, S_k, S_k] array
    per view), JPEG i's views land in row `rows[i]`; with `scale` and `bias` ([views, 3] float32)
    those are float32 views normalised as x · scale + bias. `fit` > 0: decode at 1/2 or 1/4 (DCT
    domain) where every view's box still covers `fit` times its output; 0: full resolution."""
    sizes = int(out_size) if isinstance(out_size, int | np.integer) else [int(s) for s in out_size]
    return _C.decode_resized_crops(jpegs, boxes, flips, sizes, int(threads), outs, rows, scale, bias, float(fit))


def has_colour_kernel() -> bool:
    """True if rela._C has the C++ view colour operations (`colour_batch`)."""
    return _C is not None and hasattr(_C, "colour_batch")


def colour_batch(images: np.ndarray, params: np.ndarray, threads: int = 1) -> None:
    """See csrc/views.h: colour operations on each row of uint8 [N, 3, H, W], in place."""
    _C.colour_batch(images, np.ascontiguousarray(params, dtype=np.float64), int(threads))


def pack_colour(p) -> list[float]:
    """A `ColourParams` as the numbers `colour_batch` reads, each at the slot the extension names
    (`rela._C.colour_layout()`): the slot layout is defined in csrc/views.h only."""
    layout = _layout()
    out = [0.0] * layout["size"]
    out[layout["jitter_count"]] = float(len(p.order))
    for j, name in enumerate(p.order):
        out[layout["jitter_ops"] + 2 * j] = float(layout["jitter"][name])
        out[layout["jitter_ops"] + 2 * j + 1] = float(getattr(p, name))
    for name, at in layout["slots"].items():
        out[at] = float(getattr(p, name))
    return out


@functools.cache
def _layout() -> dict:
    return _C.colour_layout()


def _warn_once() -> None:
    global _warned
    if not _warned:
        warnings.warn(
            "rela._C (the compiled extension) is not built; using the slow Python fallback. "
            "Reinstall with `pip install -e .` on a machine with a C++17 compiler.",
            RelaWarning,
            stacklevel=3,
        )
        _warned = True


class _Xoshiro256:
    """Python twin of csrc/rng.h (xoshiro256** seeded by splitmix64)."""

    def __init__(self, seed: int) -> None:
        sm = seed & _MASK
        self.s = []
        for _ in range(4):
            sm = (sm + 0x9E3779B97F4A7C15) & _MASK
            z = sm
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
            self.s.append(z ^ (z >> 31))

    @staticmethod
    def _rotl(x: int, k: int) -> int:
        return ((x << k) | (x >> (64 - k))) & _MASK

    def next(self) -> int:
        s = self.s
        result = (self._rotl((s[1] * 5) & _MASK, 7) * 9) & _MASK
        t = (s[1] << 17) & _MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self._rotl(s[3], 45)
        return result

    def below(self, bound: int) -> int:
        m = self.next() * bound
        low = m & _MASK
        if low < bound:
            threshold = ((1 << 64) - bound) % bound
            while low < threshold:
                m = self.next() * bound
                low = m & _MASK
        return m >> 64


def permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n); identical with or without the extension."""
    if n < 0:
        raise ValueError("permutation: n must be >= 0")
    if _C is not None:
        return _C.permutation(int(n), int(seed) & _MASK)
    _warn_once()
    out = list(range(n))
    rng = _Xoshiro256(seed)
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        out[i], out[j] = out[j], out[i]
    return np.asarray(out, dtype=np.int64)


def uniform_subset(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct items of range(n), uniformly, in draw order; identical with or without the extension."""
    if not 0 <= k <= n:
        raise ValueError(f"uniform_subset: need 0 <= k <= n, got n={n}, k={k}")
    if _C is not None:
        return _C.uniform_subset(int(n), int(k), int(seed) & _MASK)
    _warn_once()
    pool = list(range(n))
    rng = _Xoshiro256(seed)
    for i in range(k):
        j = i + rng.below(n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return np.asarray(pool[:k], dtype=np.int64)


def _splitmix_at(seed: int, counters: np.ndarray) -> np.ndarray:
    """splitmix64 output at each counter (vectorised twin of csrc/sampling.cpp's exp_variate)."""
    with np.errstate(over="ignore"):
        # state after (counter + 1) steps of splitmix64 started at `seed`
        z = np.uint64(seed) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def weighted_subset(weights: np.ndarray, k: int, seed: int, threads: int | None = None) -> np.ndarray:
    """k distinct indices drawn without replacement with probability ∝ weights (successive
    sampling), sorted. O(N) in the extension; the numpy fallback runs the same key stream."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 1 or not 0 <= k <= len(w):
        raise ValueError("weighted_subset: weights must be 1-d and 0 <= k <= len(weights)")
    if _C is not None:
        threads = threads or min(8, os.cpu_count() or 1)  # the result does not depend on it
        return _C.weighted_subset(w, int(k), int(seed) & _MASK, int(threads))
    _warn_once()
    mixed = int(_splitmix_at(int(seed) & _MASK, np.zeros(1, np.int64))[0])  # one splitmix64 step
    ok = (w > 0) & np.isfinite(w)
    if int(ok.sum()) < k:
        raise ValueError("weighted_subset: fewer than k weights are positive and finite")
    x = _splitmix_at(mixed, np.arange(len(w)))
    u = ((x >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    with np.errstate(divide="ignore", over="ignore"):
        keys = ((-np.log(u)).astype(np.float32) + np.float32(0)) / np.where(ok, w, np.float32(1))
    code = keys.view(np.uint32).copy()
    code[~ok] = 0xFFFFFFFF
    chosen = np.lexsort((np.arange(len(w)), code))[:k]
    return np.sort(chosen).astype(np.int64)
