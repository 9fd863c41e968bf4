"""Exceptions rela raises for bad input. Each message says what is wrong and what to do."""

from __future__ import annotations

import re


class RelaWarning(RuntimeWarning):
    """What rela warns about (a skipped sample, a setting it had to change); the CLI prints it as
    one line, like its errors."""


class RelaError(Exception):
    """Base class: the CLI prints these as one clean line and exits non-zero."""


class DatasetError(RelaError):
    """A dataset could not be found, read or indexed."""


# What decoders put in their messages that means nothing to the user: a build machine's source
# path and line (torchvision: "decode_jpeg, /__w/vision/.../decode_jpeg.cpp:171, Unsupported marker")
# and object addresses (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>").
_NOISE = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|(?:\b\w+, )?/[^\s,]+\.(?:cpp|cc|cxx|c|h|hpp):\d+,?\s*")


def clean_reason(reason: str) -> str:
    """A decoder's message without build paths or memory addresses (the reason alone)."""
    return _NOISE.sub("", reason).strip(" ,") or reason


class CorruptImageError(DatasetError):
    """One sample could not be decoded; carries the index and the file so it can be fixed or skipped.

    `remedy` says what the user can do *where the error reaches them* (the loader names
    `on_error="skip"`, conversion `--skip-corrupt`): `with_remedy` makes that copy."""

    def __init__(self, index: int, source: str, reason: str, remedy: str = "Fix or remove the file") -> None:
        self.index, self.source, self.reason, self.remedy = index, source, clean_reason(reason), remedy
        super().__init__(f"cannot decode sample {index} ({source}): {self.reason}. {remedy}.")

    def with_remedy(self, remedy: str) -> CorruptImageError:
        return CorruptImageError(self.index, self.source, self.reason, remedy)

    def __reduce__(self):  # rebuilt from its fields when it crosses from a worker process
        return CorruptImageError, (self.index, self.source, self.reason, self.remedy)


class PriorError(RelaError):
    """A prior model could not be built or its weights could not be loaded."""


class StoreError(RelaError):
    """A target store is missing, incomplete, corrupt or does not match its dataset."""


class StoreMismatchError(StoreError):
    """The store was made from a different dataset (or a different order of it)."""
