"""Fault injection for the crash/resume tests: `RELA_CRASH_AT=name[:k][@rank]`.

Long jobs (conversion, training) call `crashpoint(name)` where a real crash would hurt most; the
tests set the variable to SIGKILL the process there and check that a rerun resumes exactly. With
the variable unset (always, outside the tests) a crashpoint is one environment lookup.
"""

from __future__ import annotations

import os
import signal

from rela.distributed import rank_world

_crash_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """Fault injection for the resume tests: RELA_CRASH_AT=name[:k][@rank] SIGKILLs at the k-th
    hit (on that rank only, when given)."""
    spec = os.environ.get("RELA_CRASH_AT")
    if not spec:
        return
    spec, _, only_rank = spec.partition("@")
    target, _, k = spec.partition(":")
    if target != name or (only_rank and int(only_rank) != rank_world()[0]):
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)
