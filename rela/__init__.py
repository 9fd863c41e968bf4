"""rela: RELA (Representation Learning Accelerator) for cheaper self-supervised learning.

Data flows one way: dataset → target store (`rela.convert`) → loader (`rela.Loader`) → training step.
Public names are imported lazily, so `import rela.pca` or `rela --help` does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "convert": "rela.convert",
    "ArrayDataset": "rela.datasets",
    "FashionMNIST": "rela.datasets",
    "ImageFolder": "rela.datasets",
    "RelaDataset": "rela.datasets",
    "open_dataset": "rela.datasets",
    "CorruptImageError": "rela.errors",
    "DatasetError": "rela.errors",
    "PriorError": "rela.errors",
    "RelaError": "rela.errors",
    "StoreError": "rela.errors",
    "StoreMismatchError": "rela.errors",
    "Prior": "rela.priors",
    "load_prior": "rela.priors",
    "TargetStore": "rela.store",
    "Loader": "rela.loader",
    "Subset": "rela.subset",
    "ViewSpec": "rela.views",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rela' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
