"""Choices are declared once (rela.choices): every registry holds exactly its names, every name
reaches --help, and the Python API refuses what the flags refuse; options' defaults are the
functions' defaults."""

import dataclasses
import inspect

import pytest

from rela import choices
from rela.cli import build_parser
from rela.errors import RelaError


def help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def test_registries_hold_exactly_the_declared_names():
    from rela import registry
    from rela.loading import backends
    from rela.loading.loader import BATCH_FORMATS, HANDOFFS
    from rela.loading.subset import POLICIES
    from rela.training.methods import METHODS
    from rela.training.optim import OPTIMIZERS, SCHEDULES
    from rela.training.precision import DTYPES

    # the extension points' names are their registry tables' keys, and every entry's code loads
    assert tuple(METHODS) == choices.METHODS == tuple(registry.METHODS)
    assert choices.PRIOR_KINDS == tuple(registry.PRIORS)
    assert backends.NAMES == choices.BACKENDS == tuple(registry.BACKENDS)
    for table in (registry.METHODS, registry.PRIORS, registry.BACKENDS, registry.DATASETS, registry.VIEWS):
        for name, entry in table.items():
            if entry.available():
                assert callable(entry.load()), name
    assert tuple(DTYPES) == choices.PRECISIONS
    assert (POLICIES, HANDOFFS, BATCH_FORMATS, OPTIMIZERS, SCHEDULES) == (
        choices.POLICIES, choices.HANDOFFS, choices.BATCH_FORMATS, choices.OPTIMIZERS, choices.SCHEDULES)
    with pytest.raises(RuntimeError, match="declare a new name in both"):
        choices.check_registry("METHODS", {**METHODS, "new": None}, choices.METHODS)


@pytest.mark.parametrize("command,names", [
    ("train", choices.METHODS + choices.BACKENDS + choices.POLICIES + choices.HANDOFFS + choices.OPTIMIZERS
     + choices.SCHEDULES + choices.LR_SCALES + choices.PRECISIONS),
    ("convert", choices.PRIOR_KINDS + choices.INTERPOLATIONS),
    ("eval", choices.PROBES),
])
def test_every_name_reaches_help(command, names):
    text = help_of(command)
    assert not [n for n in names if n not in text]


def test_the_python_api_refuses_what_the_flags_refuse():
    from rela.data.prior_options import PriorOptions
    from rela.training.run import TrainConfig

    with pytest.raises(RelaError, match="--method must be one of byol"):
        TrainConfig(out="x", method="byl")
    with pytest.raises(RelaError, match="--backend must be one of auto, torch"):
        TrainConfig(out="x", backend="fastest")
    with pytest.raises(RelaError, match="--interpolation must be one of"):
        PriorOptions(interpolation="lanczos")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--method", "byl"])


@pytest.mark.parametrize("options,function,skip", [
    ("rela.data.convert_options:ConvertOptions", "rela.data.convert:convert", {"data", "prior", "out", "resume"}),
    ("rela.training.eval_options:EvalOptions", "rela.training.evaluate:evaluate_run", set()),
])
def test_option_defaults_are_the_functions_defaults(options, function, skip):
    import importlib

    def load(spec):
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    params = inspect.signature(load(function)).parameters
    for f in dataclasses.fields(load(options)):
        if f.name not in skip:
            assert params[f.name].default == f.default, f.name
