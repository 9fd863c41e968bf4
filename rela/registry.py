"""Every extension point of rela, one table each: a name → where its code lives and what it needs.

Torch-free, so `rela --help` stays light: `rela.choices` derives its name tuples from these tables
(the CLI's choices and `--help`, config validation), the consumers import an entry's code only when
it is used, and the tests derive their lists from them. Adding a method, a prior kind, a loader
backend, a dataset format or a view preset is its own module plus one line here:

- `METHODS`: an `SSLMethod` subclass (`rela.training.methods.base`).
- `PRIORS`: a builder `(rest, PriorOptions) -> Prior` for the spec `kind[:rest]`.
- `BACKENDS`: a `Backend` class (`rela.loading.backends`), built as `cls(rules, options)`.
- `DATASETS`: a `RelaDataset` class with `claims(spec)` and `from_spec(spec)`; asked in table order
  (the image folder, which claims any path, comes last).
- `VIEWS`: a preset function `(size, **ViewSpec fields) -> tuple of ViewSpec`; its extra keyword
  parameters are the preset's own arguments (`"dino,local_crops=6"`).

Objects are accepted where names are: `rela.Loader(backend=MyBackend)`, `build_method(MyMethod, ...)`,
`rela.Loader(views=my_views_function)`, a `RelaDataset` for `data=`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """Where an extension's code is ("module:attr"), and the module it needs to run here."""

    code: str
    requires: str = ""  # an importable module it needs (checked without importing it)
    install: str = ""  # how to get `requires`
    form: str = ""  # how a user writes it, for --help (prior specs, dataset specs)

    def load(self):
        module, _, attr = self.code.partition(":")
        return getattr(importlib.import_module(module), attr)

    def available(self) -> bool:
        if not self.requires:
            return True
        top = self.requires.split(".")[0]
        return importlib.util.find_spec(top) is not None and importlib.util.find_spec(self.requires) is not None


METHODS = {
    "byol": Entry("rela.training.methods.byol:BYOL"),
    "simclr": Entry("rela.training.methods.simclr:SimCLR"),
    "moco": Entry("rela.training.methods.moco:MoCo"),
    "barlowtwins": Entry("rela.training.methods.barlowtwins:BarlowTwins"),
    "vicreg": Entry("rela.training.methods.vicreg:VICReg"),
    "dino": Entry("rela.training.methods.dino:DINO"),
    "supervised": Entry("rela.training.methods.supervised:Supervised"),
}

PRIORS = {  # each builder says how to install what it lacks when it is used
    "efficientnet-lite0": Entry("rela.data.priors:_efficientnet_lite0", form="efficientnet-lite0"),
    "random": Entry("rela.data.priors:_random", form="random:<arch>"),
    "torchvision": Entry("rela.data.priors:_torchvision", form="torchvision:<arch>"),
    "torchscript": Entry("rela.data.priors:_torchscript", form="torchscript:<path>"),
    "state_dict": Entry("rela.data.priors:_state_dict", form="state_dict:<path>"),
    "student": Entry("rela.data.priors:_student", form="student:<file>"),
    "timm": Entry("rela.data.library_priors:timm_prior", form="timm:<name>"),
    "open_clip": Entry("rela.data.library_priors:open_clip_prior", form="open_clip:<name>[:<tag>]"),
    "hf": Entry("rela.data.library_priors:hf_prior", form="hf:<dir>"),
}

BACKENDS = {
    # The torch backend's module is not called `torch`: a submodule of that name would replace the
    # backends package's `torch` (the library) once imported.
    "torch": Entry("rela.loading.backends.torch_backend:TorchBackend"),
    "dali": Entry("rela.loading.backends.dali:DaliBackend", "nvidia.dali",
                  "pip install nvidia-dali-cuda130 (or rela-accel[dali])"),
    "ffcv": Entry("rela.loading.backends.ffcv:FfcvBackend", "ffcv",
                  "FFCV's system libraries, then pip install ffcv numba (scripts/setup.sh does both)"),
}

DATASETS = {  # asked in this order: the first that claims a spec opens it
    "dataset": Entry("rela.data.datasets.base:RelaDataset"),  # a RelaDataset object, as it is
    "webdataset": Entry("rela.data.datasets.webdataset:WebDataset",
                        form="WebDataset shards ('shards/{000000..000009}.tar', a glob, or s3://bucket/prefix/)"),
    "map": Entry("rela.data.datasets.map:MapDataset"),  # an object (Python API): no command-line form
    "fashion-mnist": Entry("rela.data.datasets.arrays:FashionMNIST", form="fashion-mnist[:train|:test]"),
    "npz": Entry("rela.data.datasets.arrays:ArrayDataset", form="an .npz"),
    "folder": Entry("rela.data.datasets.folder:ImageFolder", form="an image folder"),
}

VIEWS = {
    "rela": Entry("rela.loading.views:rela_views"),
    "byol": Entry("rela.loading.views:byol_views"),
    "simclr": Entry("rela.loading.views:simclr_views"),
    "dino": Entry("rela.loading.views:dino_views"),
    "supervised": Entry("rela.loading.views:supervised_views"),
    "eval": Entry("rela.loading.views:eval_views"),
}


def forms(table: dict[str, Entry]) -> str:
    """How the table's entries are written, for --help: "a | b | c"."""
    return " | ".join(entry.form for entry in table.values() if entry.form)
