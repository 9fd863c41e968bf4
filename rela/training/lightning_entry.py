"""Lightning's `callbacks_factory` entry point (pyproject.toml): every Trainer, in either Lightning
namespace, gets `rela.training.lightning.AutoLoaderState`, so a bare swap to `rela.Loader` resumes a
mid-epoch checkpoint exactly. Lightning calls this while it builds any Trainer, rela's or not: a
failure here must not stop the user's Trainer, so it warns and adds nothing."""

from __future__ import annotations

import warnings


def auto_callbacks() -> list:
    try:
        from rela.training.lightning import AutoLoaderState

        return [AutoLoaderState()]
    except Exception as e:  # any failure: the user's Trainer comes first
        warnings.warn(f"rela could not add its LoaderState callback ({type(e).__name__}: {e}); a rela.Loader "
                      "resumed mid-epoch without rela.LoaderState() in your callbacks restarts the epoch", stacklevel=2)
        return []
