"""rela: RELA (Representation Learning Accelerator) for cheaper self-supervised learning.

Data flows one way, and so do the subpackages: `rela.data` (dataset → target store, `rela.convert`)
→ `rela.loading` (subsets, views, `rela.Loader` and its backends) → `rela.training` (the
`Accelerator`, SSL methods, `rela train` / `rela eval`). A floor imports only from the floors
below it and from the leaves (`rela.errors`, `rela.options`, `rela.distributed`, `rela.kernels`, the
C++ core `rela._C`). Public names are imported lazily, so `import rela.data.pca` or `rela --help`
does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # rela.data: dataset → target store (ReLA-D)
    "convert": "rela.data.convert",
    "ArrayDataset": "rela.data.datasets",
    "FashionMNIST": "rela.data.datasets",
    "ImageFolder": "rela.data.datasets",
    "RelaDataset": "rela.data.datasets",
    "open_dataset": "rela.data.datasets",
    "Prior": "rela.data.priors",
    "load_prior": "rela.data.priors",
    "TargetStore": "rela.data.store",
    # rela.loading: subsets, views, the loader
    "Loader": "rela.loading.loader",
    "Subset": "rela.loading.subset",
    "ViewSpec": "rela.loading.views",
    # rela.training: the accelerator (ReLA-F) and the `rela train` loop
    "Accelerator": "rela.training.accelerate",
    "TrainConfig": "rela.training.run",
    "train": "rela.training.train",
    "LoaderState": "rela.training.lightning",  # Lightning callbacks: exact mid-epoch resume,
    "RelaCallback": "rela.training.lightning",  # and the RELA phase for any LightningModule
    # the RELA loss kernel
    "rela_loss": "rela.kernels.rela_loss",
    "RelaLoss": "rela.kernels.rela_loss",
    # errors
    "CorruptImageError": "rela.errors",
    "DatasetError": "rela.errors",
    "PriorError": "rela.errors",
    "RelaError": "rela.errors",
    "StoreError": "rela.errors",
    "StoreMismatchError": "rela.errors",
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
