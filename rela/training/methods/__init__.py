"""The methods the RELA phase hands over to, one module each, on lightly's heads and losses:
`byol`, `simclr`, `moco` (v2), `barlowtwins`, `vicreg`, `dino`, `supervised`. Adding a method is
one module with an `SSLMethod` subclass (`base`) and one line in `rela.registry.METHODS`; a class
is also taken as it is (`build_method(MyMethod, ...)`)."""

from __future__ import annotations

import inspect

from torch import nn

from rela import choices, registry
from rela.errors import RelaError
from rela.training.methods.base import MomentumTeacher, SSLMethod

METHODS: dict[str, type[SSLMethod]] = {name: entry.load() for name, entry in registry.METHODS.items()}
globals().update({cls.__name__: cls for cls in METHODS.values()})  # rela.training.methods.BYOL, ...
NAMES = choices.METHODS
__all__ = ["METHODS", "MomentumTeacher", "SSLMethod", "build_method", *(c.__name__ for c in METHODS.values())]


# What the trainer gives every method; each takes those its constructor declares.
CONTEXT = ("momentum", "cosine_momentum", "classes", "image_size", "local_crops", "local_size")


def method_class(name: str | type[SSLMethod]) -> type[SSLMethod]:
    """The class registered as `name` (`rela.registry.METHODS`), or `name` itself when it is an
    `SSLMethod` subclass (a method of your own, used without registering it)."""
    if isinstance(name, type) and issubclass(name, SSLMethod):
        return name
    if name not in METHODS:
        raise RelaError(f"unknown method {name!r}; available: {', '.join(METHODS)} (or an SSLMethod subclass)")
    return METHODS[name]


def build_method(name: str | type[SSLMethod], backbone: nn.Module, feature_dim: int, options: str | None = None,
                 **kw) -> SSLMethod:
    """The method `name` (a registered name or an `SSLMethod` subclass) for `backbone`. Of the
    trainer's settings (`CONTEXT`) it gets those it declares; every other keyword and `options`
    (the user's `--method-options`, see `parse_options`) must name its own options, or this fails
    listing them."""
    cls = method_class(name)
    name = getattr(name, "__name__", name)
    declared = inspect.signature(cls.__init__).parameters
    given = {**kw, **parse_options(cls, options)}
    unknown = [k for k in given if k not in declared and k not in CONTEXT]
    if unknown:
        takes = ", ".join(f"{k}={p.default!r}" for k, p in method_parameters(cls).items()) or "no options"
        raise RelaError(f"{name} has no option {', '.join(unknown)}: it takes {takes}")
    return cls(backbone, feature_dim, **{k: v for k, v in given.items() if k in declared})


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The constructor options of method `name` a user may set: not the backbone or its width, the
    class count (from the data), or what has its own flag (--momentum, --cosine-momentum,
    --image-size, --local-crops, --local-size)."""
    params = inspect.signature(method_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k not in _NOT_OPTIONS and p.kind is p.POSITIONAL_OR_KEYWORD}


_NOT_OPTIONS = ("self", "backbone", "feature_dim", *CONTEXT)


def parse_options(name: str, text: str | None) -> dict:
    """'out_dim=1024,batch_norm=false' → {'out_dim': 1024, 'batch_norm': False}, each value parsed
    as its default's type (a tuple default takes 'a:b'); an unknown name or a bad value is an error
    that lists what the method takes."""
    if not text:
        return {}
    params, out = method_parameters(name), {}
    for item in text.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in params:
            takes = ", ".join(f"{k}={p.default!r}" for k, p in params.items()) or "no options"
            raise RelaError(f"--method-options {item!r}: {name} takes {takes}")
        out[key] = _parse_value(value, params[key].default, f"--method-options {key}")
    return out


def _parse_value(value: str, default, what: str):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(default, tuple):
            return tuple(type(d)(v) for d, v in zip(default, value.split(":"), strict=True))
        return type(default)(value) if default is not None else value
    except ValueError:
        raise RelaError(f"{what}: {value!r} is not a {type(default).__name__} like its default {default!r}") from None
