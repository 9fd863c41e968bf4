"""`rela eval`'s options: the flags and `evaluate_run()`'s keyword defaults, declared once (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from rela import choices
from rela.options import option, positive_int


@dataclass(frozen=True)
class EvalOptions:
    probe: str = option("lbfgs", "linear probe protocol", choices=choices.PROBES)
    C: float = option(1.0, "lbfgs: inverse L2 strength, as scikit-learn's", flag="--C", low=0, low_open=True)
    probe_epochs: int = option(100, "adam: epochs", type=positive_int)
    k: int = option(20, "kNN neighbours (cosine, votes weighted by exp(sim / 0.07))", type=positive_int)
    test_data: str | None = option(None, "test split (default: the run's, or fashion-mnist:test)")
    skip_corrupt: bool | None = option(None, "leave undecodable images out of both splits (default: as the run was "
                                       "trained)", cli=False)
