"""Fault injection for the crash/resume tests.

Long jobs (conversion, training) call `crashpoint(name)` where a real crash would hurt most.
`RELA_CRASH_AT=name[:k][@rank]` SIGKILLs the process at the k-th hit (tests then check that a
rerun resumes exactly; with `RELA_CRASH_ONCE=file` only while that file does not exist yet, for
launcher restarts); `RELA_SLEEP_AT=name[@rank]=seconds` sleeps at every hit (tests make one
rank slow to expose races between ranks). With the variables unset (always, outside the tests) a
crashpoint is two environment lookups.
"""

from __future__ import annotations

import os
import signal
import time

from rela.distributed import rank_world

_crash_hits: dict[str, int] = {}


def _here(where: str, name: str) -> bool:
    """Whether `where` ("point" or "point@rank") names this crashpoint on this rank."""
    target, _, only_rank = where.partition("@")
    return target == name and (not only_rank or int(only_rank) == rank_world()[0])


def crashpoint(name: str) -> None:
    """A place where the tests may kill or slow this process (see the module doc)."""
    where, _, seconds = os.environ.get("RELA_SLEEP_AT", "").partition("=")
    if where and _here(where, name):
        time.sleep(float(seconds))
    head, at, only_rank = os.environ.get("RELA_CRASH_AT", "").partition("@")
    point, _, k = head.partition(":")  # "point:k@rank" → "point", "k"
    if not point or not _here(point + at + only_rank, name):
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(k or 1):
        once = os.environ.get("RELA_CRASH_ONCE")  # a marker file: crash in the first attempt only
        if once:
            if os.path.exists(once):
                return
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
