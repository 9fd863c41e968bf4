"""Every closed set of names rela's options take, declared once, torch-free.

`--help`, argparse's validation (`option(..., choices=...)`), config validation and the
registries that map a name to code all read these tuples; each registry checks at import that
its keys are exactly its tuple (so a new method, backend or prior kind is added here and in its
registry, and the two can't drift). Kept free of torch so `rela --help` stays light.
"""

from __future__ import annotations

METHODS = ("byol", "simclr", "moco", "barlowtwins", "vicreg", "dino", "supervised")
BACKENDS = ("torch", "dali", "ffcv")  # `auto` picks one of them
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
PRIOR_KINDS = ("efficientnet-lite0", "random", "torchvision", "torchscript", "state_dict", "student", "timm",
               "open_clip", "hf")
PRIOR_FORMS = ("efficientnet-lite0 | random:<arch> | torchvision:<arch> | torchscript:<path> | state_dict:<path> | "
               "student:<file> | timm:<name> | open_clip:<name>[:<tag>] | hf:<dir>")


def check_registry(name: str, registry, declared: tuple[str, ...]) -> None:
    """A registry's keys must be its declared choices (called where the registry is built)."""
    if set(registry) != set(declared) or len(registry) != len(declared):
        raise RuntimeError(f"{name} {tuple(registry)} differs from rela.choices {declared}: declare a new name in both")
