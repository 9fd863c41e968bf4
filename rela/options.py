"""Options declared once, as dataclass fields, with the command line derived from them.

    @dataclass
    class TrainConfig:
        epochs: int = option(20, "passes over the data", type=positive_int)

`add_arguments(parser, TrainConfig)` then adds `--epochs` with that help, type and default;
`from_args(TrainConfig, namespace)` builds the config back. A field's flag is `--field-name`
unless `flag=` says otherwise; `cli=False` keeps a field off the command line.

A number's allowed range is declared on its field too (`low=`, `high=`, `low_open=`, `high_open=`;
NaN and ±inf are never allowed) and `check_options(config)` — called by each config's
`__post_init__`, so the CLI and Python get the same one-line refusal — enforces it with
`choices=`. Upper bounds stand where a typo would exhaust the machine (an input size, a worker count).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from typing import Any

from rela.errors import RelaError


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def floats3(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return tuple(parts)


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with a default and its command-line description (help, and optionally
    flag=, type=, required=, metavar=, cli=False)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def _base_type(hint: Any) -> Any:
    """`int | None` → int; `str` → str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One argument per field of `cls` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        base = _base_type(hints[f.name])
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            kw["default"] = f.default
        else:
            kw["type"] = meta.get("type", base)
            kw["default"] = None if meta.get("required") else f.default
            for key in ("required", "metavar", "choices"):
                if key in meta:
                    kw[key] = meta[key]
            if "low" in meta or "high" in meta:
                kw["help"] += f"; in {allowed_range(meta)}"
            if f.default is not None and not meta.get("required") and "(default" not in kw["help"]:
                kw["help"] += f" (default {f.default})"
        parser.add_argument(flag, **kw)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def allowed_range(meta: dict) -> str:
    """A field's declared range in interval notation, e.g. "(0, inf)" or "[0, 1]"."""
    low, high = meta.get("low"), meta.get("high")
    return (("(" if meta.get("low_open") else "[") + ("-inf" if low is None else f"{low:g}") + ", "
            + ("inf)" if high is None else f"{high:g}" + (")" if meta.get("high_open") else "]")))


def check_value(name: str, value: Any, meta: dict) -> None:
    """`value` meets the `choices=` and range that `meta` (a field's metadata) declares, or a
    RelaError names `name` and what is allowed. None passes (an unset optional)."""
    if value is None:
        return
    allowed = meta.get("choices")
    if allowed is not None and value not in allowed:
        raise RelaError(f"unknown {name.lstrip('-').replace('-', ' ')} {value!r}: {name} must be one of "
                        f"{', '.join(map(str, allowed))}")
    pattern = meta.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, str(value)):
        raise RelaError(f"{name} {value!r} is not one of {meta.get('pattern_help', pattern)}")
    if "low" not in meta and "high" not in meta:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RelaError(f"{name} must be a number in {allowed_range(meta)}, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if meta.get("low_open") else value < low)
    bad |= high is not None and (value >= high if meta.get("high_open") else value > high)
    if bad:
        raise RelaError(f"{name} must be in {allowed_range(meta)}, got {value!r}")


def check_options(config: Any) -> None:
    """A config, built by argparse or in Python, meets its fields' `choices=` and ranges."""
    for f in dataclasses.fields(config):
        check_value(_flag(f), getattr(config, f.name), f.metadata)




def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """`cls` built from the parsed arguments of its fields, with `overrides` on top."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls)}
    return cls(**{**values, **overrides})
