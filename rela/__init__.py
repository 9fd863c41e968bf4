"""rela: RELA (Representation Learning Accelerator) for cheaper self-supervised learning.

Data flows one way: dataset → target store (`rela.convert`) → loader → training step.
"""

__version__ = "0.1.0"

from rela.convert import convert  # noqa: E402
from rela.datasets import ArrayDataset, FashionMNIST, ImageFolder, RelaDataset, open_dataset  # noqa: E402
from rela.errors import (  # noqa: E402
    CorruptImageError,
    DatasetError,
    PriorError,
    RelaError,
    StoreError,
    StoreMismatchError,
)
from rela.priors import Prior, load_prior  # noqa: E402
from rela.store import TargetStore  # noqa: E402

__all__ = [
    "ArrayDataset", "CorruptImageError", "DatasetError", "FashionMNIST", "ImageFolder", "Prior",
    "PriorError", "RelaDataset", "RelaError", "StoreError", "StoreMismatchError", "TargetStore",
    "convert", "load_prior", "open_dataset",
]
