"""Datasets with a stable index order and a cheap fingerprint, one idea per module.

- `base`: the protocol (`RelaDataset`: `load`, `label`, `fingerprint`, `head`) and the pixel limit.
- `decode`: image bytes to uint8 HWC arrays (libjpeg's header read, the JPEG fast path, PIL).
- `exif`: EXIF orientation and the `ExifTransposed` wrapper.
- `arrays`: in-memory data (`ArrayDataset`, `FashionMNIST`, `.npz` files).
- `folder`: `ImageFolder`.  `webdataset` + `tar_index`: tar shards and their member indexes.
- `map`: `MapDataset`, any map-style dataset (torchvision's, Hugging Face `datasets`').
- `spec`: `open_dataset`, what a dataset spec (a name, a path, an object) opens.
"""

from rela.data.datasets.arrays import FASHION_MNIST_ROOT, ArrayDataset, FashionMNIST
from rela.data.datasets.base import MAX_PIXELS, RelaDataset
from rela.data.datasets.decode import as_rgb, check_size, decode_bytes, decode_image, jpeg_header
from rela.data.datasets.exif import ExifTransposed, exif_orientation, upright
from rela.data.datasets.folder import ImageFolder
from rela.data.datasets.map import MapDataset
from rela.data.datasets.spec import open_dataset
from rela.data.datasets.webdataset import WebDataset

__all__ = ["FASHION_MNIST_ROOT", "MAX_PIXELS", "ArrayDataset", "ExifTransposed", "FashionMNIST", "ImageFolder",
           "MapDataset", "RelaDataset", "WebDataset", "as_rgb", "check_size", "decode_bytes", "decode_image",
           "exif_orientation", "jpeg_header", "open_dataset", "upright"]
