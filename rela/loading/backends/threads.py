"""Batches built ahead in one background thread: the torch backend's `worker_type="thread"` and
the DALI backend's feeder. The heavy work below it (the C++ JPEG decode, DALI's operators) runs
with the GIL released, so one process does the work without shipping every batch through shared
memory. Errors raised while building re-raise in the consumer, in order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from rela.loading.backends import Built, Task


class ThreadedBatches:
    """`build(task)` for each task, `depth` batches ahead; `close()` stops the thread."""

    _END = object()

    def __init__(self, build: Callable[[Task], dict], tasks: Iterator[Task], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(build, tasks), daemon=True, name="rela-loader")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, build: Callable[[Task], dict], tasks: Iterator[Task]) -> None:
        try:
            for task in tasks:
                if not self._put(build(task)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            # rela's own errors never get here (builders return them as Built values); this is
            # anything else — a bug, MemoryError, KeyboardInterrupt — re-raised with its traceback
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> Built:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
