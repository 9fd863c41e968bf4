"""Worker processes that start and end with their parent, whatever signal arrives.

- A Ctrl-C while a DataLoader forks its workers is not lost. CPython runs `os.fork`'s hooks
  (logging registers one) as Python code and only prints an exception raised there ("Exception
  ignored in ..."): a KeyboardInterrupt landing in a hook vanished and the loop ran on. `start()`
  holds SIGINT while the workers are forked and re-raises it right after, in the caller's frame.
- Workers die with their parent: `PR_SET_PDEATHSIG` (Linux) SIGKILLs a worker the moment its
  parent dies, even by SIGKILL. torch's own watchdog only notices a dead parent every few seconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its threads and its children that have ended
    (the loader's worker processes end with their epoch): a cost other work on the machine does not
    inflate, unlike wall-clock."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
_parent = os.getpid()  # the process that forked the workers (set again by `start`)


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block; act on it (KeyboardInterrupt) when the block ends.
    Only on the main thread, the one Python delivers signals to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def start(loader: Iterable) -> Iterator:
    """`iter(loader)` for a DataLoader with worker processes, forked with SIGINT held (module doc)."""
    global _parent
    _parent = os.getpid()
    with deferred_sigint():
        return iter(loader)


def in_worker() -> None:
    """For a worker_init_fn: die with the parent, and take Ctrl-C as torch's workers do."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the fork-time placeholder
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: torch's watchdog still ends orphaned workers
        return
    if os.getppid() != _parent:  # the parent died before prctl took effect
        os._exit(1)
