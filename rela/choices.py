"""Every closed set of names rela's options take, declared once, torch-free.

`--help`, argparse's validation (`option(..., choices=...)`) and config validation read these
tuples. The extension points' names (methods, backends, prior kinds) are their tables' keys in
`rela.registry`, so a new one is one line there. Kept free of torch so `rela --help` stays light.
"""

from __future__ import annotations

from rela import registry

# The extension points' names come from their tables (rela.registry): one line there adds a name here.
METHODS = tuple(registry.METHODS)
BACKENDS = tuple(registry.BACKENDS)  # `auto` picks one of them
POLICIES = ("uniform", "scored")
HANDOFFS = ("float32", "uint8", "device-colour")
SWITCH_RULES = ("evidence", "scaled", "reference")  # rela.training.accelerate: what decides the adaptive switch
METHOD_CLOCKS = ("switch", "run")  # the method's schedules count from the switch, or from the run's first step
BATCH_FORMATS = ("dict", "tuple", "lightly")
OPTIMIZERS = ("adamw", "sgd", "lars")
SCHEDULES = ("constant", "cosine")
LR_SCALES = ("none", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
PROBES = ("lbfgs", "adam")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"  # --device; torch.device() would take more, none of it useful here
DEVICE_FORMS = "auto | cpu | cuda[:N] | mps"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
PRIOR_KINDS = tuple(registry.PRIORS)
PRIOR_FORMS = registry.forms(registry.PRIORS)
DATA_FORMS = registry.forms(registry.DATASETS)  # --data: every dataset format with a command-line form


def check_registry(name: str, table, declared: tuple[str, ...]) -> None:
    """A table's keys must be its declared choices (called where the table is built)."""
    if set(table) != set(declared) or len(table) != len(declared):
        raise RuntimeError(f"{name} {tuple(table)} differs from rela.choices {declared}: declare a new name in both")
