"""A training run and its directory: the configuration, the student it builds, checkpoints, logs.

Both `train` (which writes a run) and `evaluate` (which reads one) stand on this module. One run
directory holds everything: `config.json`, `store/` (when the prior had to be converted),
`checkpoint.pt` (every epoch; written atomically; loaded with `weights_only=True`), `steps.csv`
(per step: loss, RELA and SSL losses, phase, λ, ρ, seconds), `epochs.csv`, `switch.json` (ρ and a
kNN probe at the switch), `summary.json` and, after `rela eval`, `eval.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rela import choices
from rela.errors import RelaError
from rela.options import check_options, option, positive_int

# torch is imported where it is used: `rela train --help` builds its flags from TrainConfig.

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a run is made of; `rela train`'s flags are these fields (rela.options)."""

    data: str = option("fashion-mnist", choices.DATA_FORMS)
    out: str = option("runs/train", "run directory", required=True)
    prior: str | None = option("efficientnet-lite0", "a prior spec (efficientnet-lite0, random:<arch>, ...) "
                               "converted into RUN/store, or a STORE directory")  # None = no RELA
    budget: float = option(1.0, "fraction of the data visited per epoch (0, 1]")
    method: str = option("byol", "what the RELA phase hands over to (rela.training.methods)", choices=choices.METHODS)
    arch: str = option("resnet18-cifar", "resnet18|34|50[-cifar]")
    width: float = option(0.125, "width multiplier of the student", low=0, low_open=True, high=16)
    epochs: int = option(20, "passes over the (budgeted) data", type=positive_int, low=1)
    batch_size: int = option(128, "global batch; under torchrun each rank takes an equal share",
                             type=positive_int, low=1)
    lr: float = option(1e-3, "base learning rate (see --lr-scale)", low=0, low_open=True)
    weight_decay: float = option(0.01, "weight decay (sgd/lars: not on biases and norm weights)", low=0, high=10)
    optimizer: str = option("adamw", "lars is lightly's (momentum 0.9, for large batches)", choices=choices.OPTIMIZERS)
    lr_schedule: str = option("constant", "cosine goes to 0 at the last step; per optimizer step",
                              choices=choices.SCHEDULES)
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up over this many epochs", low=0)
    lr_scale: str = option("none", "linear: lr x global batch / 256", choices=choices.LR_SCALES)
    precision: str = option("fp32", "autocast; fp16 with a gradient scaler; losses in fp32", choices=choices.PRECISIONS)
    handoff: str = option("float32", "uint8: views cross to the device as uint8, normalised there (4x less "
                          "host-to-device traffic); device-colour: plain uint8 crops, colour and normalisation as "
                          "batched ops on the device; torch backend", choices=choices.HANDOFFS)
    channels_last: bool = option(False, "channels_last memory format for the student and every view batch")
    compile: bool = option(False, "torch.compile the student (the first steps pay the compilation: "
                           "tens of seconds to minutes)")
    log_every: int = option(10, "read losses on the host, check for NaN, log and take the adaptive decision "
                            "every N steps (1: every step; larger: fewer device syncs)", type=positive_int, low=1)
    phase: str = option("adaptive", "adaptive | fixed:<fraction> | blend (docs/training.md)")  # the best arm at 50%
    image_size: int = option(32, "training view size in pixels", type=positive_int, low=1, high=4096)
    rela_views: str = option("rela", "the RELA phase's views: a preset (rela, byol, eval) with optional overrides, "
                             "e.g. 'rela,scale=0.3:1' or 'byol,1.solarize_p=0' (see rela.loading.views)")
    ssl_views: str | None = option(None, "the SSL method's views, same form (default: the method's own preset "
                                   "at --image-size; byol has no blur at <= 64 px)")
    dim: int | None = option(None, "target dim when converting (default: min(student feature dim, prior dim))",
                             type=positive_int, low=1)
    prior_input_size: int | None = option(None, "prior resolution when converting (default: the data's median "
                                          "shorter side rounded up to a multiple of 32, at most the prior's own: "
                                          "32 for 28-px images)", type=positive_int, low=8, high=2048)
    limit: int | None = option(None, "use only the first N training samples", type=positive_int)
    test_data: str | None = option(None, "test split for the switch probe and eval (default: fashion-mnist:test "
                                   "for fashion-mnist)")
    seed: int = option(0, "seed of the student's initial weights, the subsets and every view", low=0, high=2**63 - 1)
    num_workers: int | None = option(
        None,
        "loader workers per rank (default: 0 for in-memory data, else 2, fewer if the node has fewer cores per rank)",
        flag="--workers",
        metavar="N",
        low=0,
        high=256,
    )
    skip_corrupt: bool = option(False, "an undecodable image is replaced by the next decodable sample (each "
                                "reported once an epoch; conversion records it as skipped) instead of stopping the run")
    exif_transpose: bool = option(
        False,
        "turn each image upright by its EXIF Orientation tag (phone photos); off, as in torchvision's ImageFolder",
    )
    backend: str = option("auto", "loader backend", choices=("auto", *choices.BACKENDS))
    scaled_decode: bool = option(True, "JPEG views: decode at 1/2 or 1/4 scale (DCT domain) where every view's crop "
                                 "still covers 1.5x its output (within ~0.5 grey levels of the full decode on real "
                                 "photos); --no-scaled-decode: always full resolution")
    policy: str = option("uniform", "subset policy", choices=choices.POLICIES)
    freeze_transfer: bool = option(False, "frozen random transfer head (reference code)")
    warm_heads: bool = option(False, "during the RELA phase also train the method's heads on detached backbone "
                              "features (the backbone gets no gradient from it), so the method does not start cold "
                              "at the switch; costs the method's forward in every RELA step")
    local_crops: int | None = option(None, "dino: local crops per sample beside the two global views (default: "
                                     "none at <= 32 px, as lightly's CIFAR-10 benchmark; 6 above, as lightly's "
                                     "DINOTransform)", low=0, high=32)
    local_size: int | None = option(None, "dino: local crop size in pixels (default: 96/224 of --image-size, "
                                    "DINO's 96 px at 224)", type=positive_int, low=8, high=4096)
    method_options: str | None = option(None, "the method's own settings, k=v,... e.g. 'temperature=0.2' for "
                                        "simclr or 'batch_norm=false' for dino (names: the method's constructor "
                                        "in rela.training.methods; an unknown name lists them)")
    momentum: float = option(0.99, "EMA momentum of the momentum teachers (BYOL, MoCo, DINO)", low=0, high=1)
    cosine_momentum: bool = option(False, "cosine momentum schedule up to 1")
    probe_at_switch: bool = option(True, "kNN probe of the student at the switch, written to RUN/switch.json")
    device: str = option("auto", "auto (cuda when available; under torchrun each rank's own GPU) | cpu | cuda[:N]",
                         pattern=choices.DEVICE_PATTERN, pattern_help=choices.DEVICE_FORMS)
    sync_bn: bool = option(False, "SyncBatchNorm across ranks under torchrun (CUDA only, as PyTorch's)")
    switch_rule: str = option(
        "evidence",
        "adaptive: evidence (switch once the RELA loss's measured trend over "
        "the last --switch-evidence steps could fall less than --switch-min-gain more in the "
        "steps left: a still-falling loss keeps RELA), scaled (rho from EMAs started at the first "
        "loss) or reference (the reference code's EMAs: fires only after 528+ steps)",
        choices=choices.SWITCH_RULES,
    )
    switch_evidence: int = option(100, "evidence rule: the trend is measured over at least this many steps (and a "
                                  "tenth of the run); a run with fewer RELA steps keeps RELA throughout",
                                  type=positive_int, low=3)
    switch_min_gain: float = option(0.05, "evidence rule: switch when the RELA loss, at its measured rate (slope + "
                                    "2 standard errors), would fall by less than this share of its level in the "
                                    "steps left",
                                    low=0, high=1, low_open=True, high_open=True)
    switch_threshold: float = option(
        0.995, "scaled/reference rules and blend: switch once rho reaches this (the reference's)"
    )
    switch_window: str = option("0.2:1", "adaptive/blend: MIN:MAX share of the run's steps the RELA phase takes "
                                "(never switch before MIN; switch at MAX at the latest; MAX 1: no forced switch)")
    handover: float = option(0.1, "after the switch the RELA weight falls linearly from 1 to 0 over this share of "
                             "the run's steps (0: a hard switch)")  # the best hand-over candidate (docs/benchmarks.md)
    handover_floor: float = option(
        0.5,
        "the RELA weight falls to this instead of 0 and stays there: a residual RELA "
        "term beside the method for the rest of the run (0: the method alone)",
    )  # docs/training.md
    handover_lr: float = option(1.0, "learning-rate factor at the switch, back to 1 over the hand-over window "
                                "(1: no re-warm-up)")
    method_clock: str = option("switch", "the method's schedules (DINO's teacher temperature and frozen prototypes, "
                               "cosine momentum) count from the switch, or from the run's first step",
                               choices=choices.METHOD_CLOCKS)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise RelaError(f"--budget must be in (0, 1], got {self.budget}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RelaError("--epochs and --batch-size must be positive")
        from rela.training.accelerate import parse_phase
        from rela.training.methods import parse_options

        parse_phase(self.phase)
        check_options(self)
        if self.warmup_epochs < 0:
            raise RelaError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.switch_threshold <= 1:
            raise RelaError(f"--switch-threshold must be in (0, 1], got {self.switch_threshold}")
        self.window()  # a malformed --switch-window fails here
        if not 0 <= self.handover_floor < 1:
            raise RelaError(f"--handover-floor must be in [0, 1), got {self.handover_floor}")
        if not 0 <= self.handover <= 1 or not 0 < self.handover_lr <= 1:
            raise RelaError(f"--handover must be in [0, 1] and --handover-lr in (0, 1], got {self.handover} and "
                            f"{self.handover_lr}")
        parse_options(self.method, self.method_options)  # a typo fails here, not after the conversion
        if self.method != "dino" and (self.local_crops is not None or self.local_size is not None):
            raise RelaError(f"--local-crops and --local-size are DINO's multi-crop; --method {self.method} has "
                            "no local views")
        from rela.loading.views import resolve_views

        for flag, views in (("--rela-views", self.rela_views), ("--ssl-views", self.ssl_views)):
            if views is not None:
                try:
                    resolve_views(views, self.image_size)
                except RelaError as e:
                    raise RelaError(f"{flag}: {e}") from None

    def window(self) -> tuple[float, float]:
        """--switch-window as (min, max) shares of the run's steps."""
        try:
            lo, hi = (float(v) for v in self.switch_window.split(":"))
        except ValueError:
            raise RelaError(f"--switch-window takes MIN:MAX, e.g. 0.2:0.6, got {self.switch_window!r}") from None
        if not 0 <= lo <= hi <= 1:
            raise RelaError(f"--switch-window needs 0 <= MIN <= MAX <= 1, got {self.switch_window!r}")
        return lo, hi

    @property
    def uses_rela(self) -> bool:
        return self.prior is not None and not self.phase.startswith("off")


# Fields added after runs were already saved, whose default changes what a run does: a saved run
# without them ran with these values (the phase rule and hard switch from before the hand-over).
# A resumed old run keeps them, and an old run never passes for one made with today's defaults.
AS_BEFORE = {"switch_rule": "reference", "switch_window": "0:1", "handover": 0.0, "handover_floor": 0.0,
             "method_clock": "run"}


def _with_defaults(raw: dict) -> dict:
    """A saved configuration with the fields added since it was written: at the values the run
    ran with (AS_BEFORE), else at their defaults."""
    known = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in raw.items() if k in known}
    return asdict(TrainConfig(**{**{k: v for k, v in AS_BEFORE.items() if k not in given}, **given}))


def config_from_run(run: str | Path) -> TrainConfig:
    path = Path(run) / "config.json"
    if not path.is_file():
        what = "does not exist" if not Path(run).exists() else "is not a run directory (no config.json)"
        raise RelaError(f"{run} {what}: pass the --out folder of a rela train run")
    return TrainConfig(**_with_defaults(json.loads(path.read_text())))


def default_test_data(data: str) -> str | None:
    return "fashion-mnist:test" if str(data).split(":")[0] == "fashion-mnist" else None


def per_rank_batch(batch_size: int, world: int) -> int:
    """--batch-size is the global batch; every rank takes an equal share of each one.

    The loader deals each epoch's order to the ranks by stride, so global batch j is the same
    samples under any world size that divides it: a run resumes under another number of ranks
    on the same sample sequence. A world size that does not divide it is refused."""
    if batch_size % world:
        raise RelaError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                        f"{world} ranks (a run resumes under a different number of ranks only where it does): "
                        f"use a number of ranks that divides {batch_size}, or start a new run with another "
                        "--batch-size")
    return batch_size // world


def build_student(cfg: TrainConfig, classes: int = 0):
    """The backbone and the method (with its heads and target networks), seeded by cfg.seed;
    `classes`: the dataset's number of classes (the supervised method's classifier)."""
    import torch

    from rela.models import build_backbone
    from rela.training.methods import build_method

    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed, whatever ran before
    backbone = build_backbone(cfg.arch, cfg.width)
    method = build_method(cfg.method, backbone, backbone.feature_dim, momentum=cfg.momentum,
                          cosine_momentum=cfg.cosine_momentum, classes=classes, image_size=cfg.image_size,
                          local_crops=cfg.local_crops, local_size=cfg.local_size, options=cfg.method_options)
    return backbone, method


def check_out(out: Path, resume: bool | str, overwrite: bool) -> bool:
    """Whether to resume (resume="auto": when there is a checkpoint); refuses to clobber a run."""
    ckpt_path = out / CHECKPOINT
    if resume == "auto":
        if overwrite:
            raise RelaError("--auto-resume and --overwrite contradict each other: pick one")
        resume = ckpt_path.exists()
    if ckpt_path.exists() and not (resume or overwrite):
        raise RelaError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and not ckpt_path.exists():
        raise RelaError(f"--resume: no checkpoint in {out} (nothing to resume; drop --resume to start)")
    out.mkdir(parents=True, exist_ok=True)
    return bool(resume)


# Fields a resumed run may change: where it lives, and skipping a corrupt image the run stopped at
# (nothing trained so far depends on it).
_RESUME_MAY_CHANGE = ("out", "skip_corrupt")


def check_resumable(state: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint under another configuration (the run directory may differ)."""
    saved = {k: v for k, v in _with_defaults(state["config"]).items() if k not in _RESUME_MAY_CHANGE}
    now = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_MAY_CHANGE}
    diff = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
    if diff:
        raise RelaError(f"--resume with a different configuration: {diff}; resume with the original arguments")


# --- checkpoints: one pair of functions ---------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write-to-temp then rename: a run killed while saving keeps its previous checkpoint."""
    import torch

    from rela.data.store import atomic_write

    atomic_write(path, lambda f: torch.save(state, f))  # fsynced, renamed, folder fsynced; a full disk leaves
    # the previous checkpoint and no temp file


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold tensors, numbers, strings and view specs only: loaded with weights_only."""
    import torch

    from rela.loading.views import ViewSpec

    with torch.serialization.safe_globals([ViewSpec]):
        return torch.load(path, map_location="cpu", weights_only=True)


def export_student(run: str | Path, out: str | Path) -> Path:
    """A run's final backbone as a prior for `rela convert` (`student:OUT`): its weights in a
    safetensors file whose metadata holds the architecture, width and the preprocessing the
    student was trained with (view size, mean, std), so the prior sees images as it did."""
    run, out = Path(run), Path(out)
    if not (run / CHECKPOINT).exists():
        raise RelaError(f"{run} has no {CHECKPOINT}: train it first (rela train --out {run})")
    cfg = config_from_run(run)
    state = load_checkpoint(run / CHECKPOINT)
    view = state["loader"]["views"][0]
    view = view if isinstance(view, dict) else vars(view)  # plain dicts since the loader saves them so
    meta = {"format": "rela-student", "arch": cfg.arch, "width": repr(cfg.width), "input_size": str(cfg.image_size),
            "mean": json.dumps(list(view["mean"])), "std": json.dumps(list(view["std"])), "run": str(run.resolve()),
            "method": cfg.method, "epochs_trained": str(state["epoch"] + 1)}
    from safetensors.torch import save

    from rela.data.store import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    blob = save({k: v.contiguous() for k, v in state["backbone"].items()}, metadata=meta)
    atomic_write(out, lambda f: f.write(blob))
    return out


# --- logs ---------------------------------------------------------------------------------------

class StepLog:
    """CSV per step (and TensorBoard when installed); on resume, rows after the checkpoint go."""

    COLUMNS = ("step", "epoch", "phase", "lam", "rho", "loss", "rela_loss", "ssl_loss", "seconds")

    def __init__(self, path: Path, keep_steps: int) -> None:
        from rela.data.store import atomic_write_bytes

        rows = []
        if keep_steps and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) < keep_steps]
        # The kept rows replace the file in one rename before anything is appended: a resumed run
        # killed before its first checkpoint still has every row up to the checkpoint it resumed.
        head = io.StringIO()
        writer = csv.DictWriter(head, self.COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, head.getvalue().encode())
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=keep_steps)
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        if self.tb is not None:
            for key in ("loss", "rela_loss", "ssl_loss", "lam", "rho"):
                if isinstance(row[key], float) and not math.isnan(row[key]):
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def flush(self) -> None:
        """Before each checkpoint: a resumed run keeps exactly the rows up to the checkpoint."""
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class EpochLog:
    """RUN/epochs.csv: one row per finished epoch; on resume, rows of epochs after the checkpoint
    (a crash between the row and the checkpoint) go."""

    HEADER = "epoch,seconds,steps,images,phase"

    def __init__(self, path: Path, start_epoch: int, resumed: bool) -> None:
        self.path = path
        kept = path.read_text().splitlines()[1:] if resumed and path.exists() else []
        kept = [row for row in kept if int(row.split(",")[0]) < start_epoch]
        path.write_text("\n".join([self.HEADER, *kept]) + "\n")

    def write(self, epoch: int, seconds: float, steps: int, images: int, phase: str) -> None:
        with self.path.open("a") as f:
            f.write(f"{epoch},{seconds:.3f},{steps},{images},{phase}\n")


def phase_name(lam: float) -> str:
    """What a step with RELA weight λ is, for the logs."""
    return "rela" if lam == 1 else "ssl" if lam == 0 else "blend"
