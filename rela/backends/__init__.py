"""Decode backends for `rela.Loader` other than its own torch one.

Each backend is a batch builder with the same `build(task) -> batch dict` contract as the torch
builder in `rela.loader`, so ordering, subsets, sharding, `set_views`, resume and error handling
stay in one place (the loader) and a backend only turns a task into pixels:

- `dali`: an NVIDIA DALI pipeline (CPU pipeline, or mixed GPU decode with `device="cuda"`); every
  random number is drawn by rela and fed in, so views are as deterministic as the torch backend's.
- `ffcv`: FFCV's `.beton` storage and JIT-compiled decoders, crops from FFCV's own RNG.
"""

from __future__ import annotations

import importlib.util


def available() -> dict[str, bool]:
    """Which backends can run here (without importing the heavy libraries)."""
    return {
        "torch": True,
        "dali": importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None,
        "ffcv": importlib.util.find_spec("ffcv") is not None,
    }
