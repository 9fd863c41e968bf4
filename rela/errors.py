"""Exceptions rela raises for bad input. Each message says what is wrong and what to do."""


class RelaError(Exception):
    """Base class: the CLI prints these as one clean line and exits non-zero."""


class DatasetError(RelaError):
    """A dataset could not be found, read or indexed."""


class CorruptImageError(DatasetError):
    """One sample could not be decoded; carries the index and the file so it can be fixed or skipped."""

    def __init__(self, index: int, source: str, reason: str) -> None:
        self.index = index
        self.source = source
        self.reason = reason
        super().__init__(
            f"cannot decode sample {index} ({source}): {reason}. Fix or remove the file, "
            "or pass --skip-corrupt to record it as skipped."
        )


class PriorError(RelaError):
    """A prior model could not be built or its weights could not be loaded."""


class StoreError(RelaError):
    """A target store is missing, incomplete, corrupt or does not match its dataset."""


class StoreMismatchError(StoreError):
    """The store was made from a different dataset (or a different order of it)."""
