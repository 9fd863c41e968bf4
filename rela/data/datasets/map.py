"""`MapDataset`: any map-style dataset (torchvision's, Hugging Face `datasets`', a list) as a RelaDataset."""

from __future__ import annotations

import hashlib
import operator
from pathlib import Path

import numpy as np

from rela.data.datasets.base import RelaDataset
from rela.errors import CorruptImageError, DatasetError

_IMAGE_KEYS, _LABEL_KEYS = ("image", "img", "pixel_values"), ("label", "labels", "target", "class")


class MapDataset(RelaDataset):
    """Any map-style dataset (`__len__` + `__getitem__`: torchvision's, Hugging Face `datasets`'
    with an image column, the user's own class) as a
    rela dataset. An item may be a PIL image, an H×W(×C) uint8 array, a C×H×W uint8 tensor, an
    `(image, label, ...)` tuple or a dict (`image_key=` / `label_key=`, found by name otherwise).

    Fingerprint: the class, the length and a hash of 16 items at fixed, evenly spaced positions
    (their pixels and labels) — cheap, and it catches another dataset, another order of a sorted
    one or changed files among those 16; it cannot see a change elsewhere. `fingerprint=` (e.g. a
    dataset version) replaces that hash: the class, the length and your string are then the identity.

    A dataset whose transform already turns items into float tensors is refused: rela applies the
    views itself. `as_is=True` (what `rela.Loader(views="as-is")` sets) takes such items as they
    are — a tensor, or a list of tensors, one per view — and stacks them into the batch; rela then
    draws no views, and since random views can't be hashed, a store is matched by `fingerprint=`."""

    kind = "map-dataset"
    runs_user_code = True  # the dataset's own __getitem__ (and transform) per sample

    @classmethod
    def claims(cls, spec) -> bool:
        """Any object with `__getitem__` that is not a path (torchvision's, Hugging Face `datasets`')."""
        return not isinstance(spec, (str, Path, RelaDataset)) and hasattr(spec, "__getitem__")

    def __init__(self, dataset, image_key: str | None = None, label_key: str | None = None,
                 fingerprint: str | None = None, as_is: bool = False) -> None:
        try:
            n = len(dataset)
        except TypeError:
            raise DatasetError(f"{type(dataset).__name__} has no len(): rela needs a map-style dataset "
                               "(an IterableDataset can't be indexed for subsets and exact resume)") from None
        self.dataset, self.n, self.image_key, self.label_key = dataset, n, image_key, label_key
        self.name, self.user_fingerprint = f"{type(dataset).__module__}.{type(dataset).__qualname__}", fingerprint
        self.kind = f"map-dataset:{self.name}"  # compared when a store is opened: another class is other data
        self.as_is = as_is
        self._last_label: tuple[int, int] | None = None
        if n == 0:
            raise DatasetError(f"{self.name} is empty")
        self._probe()

    def _probe(self) -> None:
        """Read item 0 once, so a dataset rela can't use (one whose transform already made tensors
        or views — or, used as-is, didn't — or whose dict items hold no image) is refused here, in
        the caller's process, not in a worker. A broken item 0 itself is left to on_error, like any
        other sample."""
        try:
            item = self._item(0)
        except CorruptImageError:  # its __getitem__ failed: one bad sample, left to on_error
            return
        try:
            image = self._split(item, 0)[0]
        except CorruptImageError as e:
            if isinstance(item, dict):  # no image key: the layout, not one bad item
                raise DatasetError(f"{self.name}: {e.reason}") from None
            return
        why = _not_views(image) if self.as_is else _made_by_a_transform(image)
        if why:
            raise DatasetError(f"{self.name}: {why}")

    def used_as_is(self) -> MapDataset:
        """The same dataset with its items taken as they are (see the class doc)."""
        return self if self.as_is else MapDataset(self.dataset, self.image_key, self.label_key,
                                                  self.user_fingerprint, as_is=True)

    def __len__(self) -> int:
        return self.n

    def _item(self, index: int):
        try:
            return self.dataset[index]
        except Exception as e:  # the user's __getitem__: name the sample, keep the reason
            raise CorruptImageError(index, self.describe(index), f"{type(e).__name__}: {e}") from None

    def _split(self, item, index: int) -> tuple[object, object]:
        """(image, label) of one item; a label column, when there is one, is the label's source."""
        if isinstance(item, dict):
            key = self.image_key or next((k for k in _IMAGE_KEYS if k in item), None)
            if key is None or key not in item:
                raise self._bad(index, f"the item is a dict with keys {sorted(item)} and no image; pass image_key=")
            lkey = self.label_key or next((k for k in _LABEL_KEYS if k in item), None)
            image, label = item[key], item.get(lkey, -1) if lkey else -1
        elif isinstance(item, (tuple, list)) and item:
            image, label = item[0], item[1] if len(item) > 1 else -1
        else:
            image, label = item, -1
        column = self._label_column()
        return image, self._class_index(column[index] if column is not None else label, index)

    def _bad(self, index: int, reason: str) -> CorruptImageError:
        return CorruptImageError(index, self.describe(index), reason)

    def load(self, index: int) -> np.ndarray:
        """The item's image as uint8 H×W×C; an item rela can't read (None, the wrong shape or dtype,
        zero-sized, a bad label) raises CorruptImageError with its index, so on_error='skip' covers it."""
        if self.as_is:
            raise DatasetError(f"{self.name} is used as-is (its own transform makes the views): rela can't "
                               "decode its items. Convert and evaluate from the dataset without its transform")
        image, label = self._split(self._item(index), index)
        try:
            out = _as_uint8_hwc(image)
        except ValueError as e:
            raise self._bad(index, str(e)) from None
        self._last_label = (index, label)  # label(index) right after: no second __getitem__
        return out

    def item_views(self, index: int) -> tuple[list, int]:
        """As-is: the item's views (its tensor, or its list of tensors) and its label."""
        image, label = self._split(self._item(index), index)
        why = _not_views(image)
        if why:
            raise self._bad(index, why)
        return list(image) if isinstance(image, (list, tuple)) else [image], label

    def _class_index(self, value, index: int) -> int:
        """An integer class index >= 0, or -1 for unlabeled; anything else is a bad sample."""
        try:
            label = operator.index(value)  # ints, numpy ints, one-element integer tensors; not 3.5 or "cat"
        except TypeError:
            raise self._bad(index, f"its label {value!r} is not an integer class index") from None
        if label < -1:
            raise self._bad(index, f"its label {label} is negative (class indices are >= 0; -1 means unlabeled)")
        return label

    def _label_column(self) -> np.ndarray | None:
        """All labels without decoding an image: torchvision's `.targets`, or a Hugging Face
        `datasets` label column (read once)."""
        if not hasattr(self, "_labels"):
            self._labels = None
            targets = getattr(self.dataset, "targets", None)
            columns = getattr(self.dataset, "column_names", None)
            key = self.label_key or next((k for k in _LABEL_KEYS if k in (columns or ())), None)
            if targets is not None and len(targets) == self.n:
                column = np.asarray(targets)
            elif columns is not None and key in columns:
                column = np.asarray(self.dataset[key])
            else:
                return None
            # Integer columns only; anything else (strings, floats) is read per item and refused there.
            self._labels = column.astype(np.int64) if np.issubdtype(column.dtype, np.integer) else None
        return self._labels

    def labels(self) -> np.ndarray:
        column = self._label_column()
        return column.copy() if column is not None else super().labels()

    def label(self, index: int) -> int:
        last = self._last_label  # set by load(index): one read of the item serves both
        if last is not None and last[0] == index:
            return last[1]
        column = self._label_column()
        if column is not None:
            return self._class_index(column[index], index)
        return self._split(self._item(index), index)[1]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _record(self, index: int, deep: bool) -> bytes:
        return self.load(index).tobytes() + self.label(index).to_bytes(8, "little", signed=True)

    def fingerprint(self, deep: bool = False) -> dict:
        h = hashlib.sha256()
        if self.user_fingerprint is not None:
            h.update(b"user:" + str(self.user_fingerprint).encode())
        elif self.as_is:
            raise DatasetError(f"{self.name} is used as-is: its items are random views, so rela can't "
                               "fingerprint them to match a target store. Pass the same fingerprint= (e.g. a "
                               "dataset version) to rela.data.datasets.MapDataset when converting and when training")
        else:
            for i in sorted(set(np.linspace(0, self.n - 1, min(16, self.n)).astype(int).tolist())):
                rec = self._record(i, deep)
                h.update(len(rec).to_bytes(8, "little") + rec)
        return self._fingerprint(h.hexdigest(), deep)

    def info(self) -> dict:
        return {"name": self.name, "fingerprint": self.user_fingerprint}


# The fast path first (rela decodes and makes the views itself, in C++), the as-is path second
# (the dataset's own transform per item, in Python: measured x0.96 of a plain DataLoader).
_TRANSFORM_ADVICE = ("Fast: give rela.Loader the data without its transform (the folder path, or the dataset made "
                     "without transform=) and the transform as views= (e.g. views=BYOLTransform(...): lightly's and "
                     "torchvision's transforms are translated into rela's views). Slower: keep it and pass "
                     "views='as-is' to train on the items as they are")


def _made_by_a_transform(image) -> str | None:
    """Why an item looks like a transform's output (float tensors, a list of views), or None."""
    if hasattr(image, "dim") and getattr(image, "dtype", None) is not None and image.dtype.is_floating_point:
        return f"items are float tensors — its transform (e.g. ToTensor/Normalize) already ran. {_TRANSFORM_ADVICE}"
    if isinstance(image, (list, tuple)) and image and all(hasattr(v, "size") for v in image):
        return f"items hold a list of {len(image)} images — its transform already makes views. {_TRANSFORM_ADVICE}"
    return None


def _not_views(image) -> str | None:
    """Why an as-is item is not views (a tensor, or a list of tensors, one per view), or None."""
    views = list(image) if isinstance(image, (list, tuple)) else [image]
    if views and all(hasattr(v, "dim") and hasattr(v, "dtype") for v in views):
        return None
    got = type(views[0]).__name__ if views else "an empty list"
    return (f"as-is items must be tensors (or a list of them, one per view), got {got}; without a transform, "
            "let rela make the views (views='rela', 'byol', ...)")


def _as_uint8_hwc(image) -> np.ndarray:
    """A PIL image, uint8 array (H×W, H×W×C) or uint8 tensor (C×H×W) → uint8 H×W×C, C = 1 or 3.
    ValueError with the reason for anything else."""
    if image is None:
        raise ValueError("the item's image is None")
    why = _made_by_a_transform(image)
    if why:
        raise ValueError(why)
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL
        image = image if image.mode in ("L", "RGB") else image.convert("RGB")
        a = np.asarray(image, dtype=np.uint8)
    elif hasattr(image, "numpy") and hasattr(image, "dim"):  # torch tensor: C×H×W
        a = image.numpy()
        a = a.transpose(1, 2, 0) if a.ndim == 3 else a
    else:
        a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"its image is {a.dtype}, not uint8 (PIL images or 0..255 arrays); drop the dataset's "
                         "transform (rela applies the views) or pass views='as-is' to rela.Loader")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot read an image of shape {a.shape}; expected H×W, H×W×C or C×H×W with C in 1, 3, 4")
    if 0 in a.shape:
        raise ValueError(f"the image is empty (shape {a.shape})")
    return a[..., :3] if a.shape[2] == 4 else a
