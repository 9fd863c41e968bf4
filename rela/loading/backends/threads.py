"""Batches built ahead in background threads: the torch backend's `worker_type="thread"` and the
DALI backend's feeder. The heavy work below it (the C++ JPEG decode, DALI's operators) runs with
the GIL released, so one process does the work without shipping every batch through shared
memory.

Each thread builds whole batches (the next task when it is done with one), so one batch's Python
steps (file reads, random draws) overlap another's C++ decode, and a thread the OS preempts on a
busy machine delays its own batch only, not every batch's share of a split one. Batches come out
in task order; an error raised while building re-raises in the consumer, in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from rela.loading.backends import Built, Task


class ThreadedBatches:
    """`build(task)` for each task on `threads` threads, at most `depth` batches ahead of the
    consumer; `close()` stops the threads."""

    def __init__(self, build: Callable[[Task], Built], tasks: Iterator[Task], depth: int, threads: int = 1) -> None:
        self.build, self.tasks, self.depth = build, iter(tasks), max(depth, threads)
        self.cond = threading.Condition()
        self.results: dict[int, object] = {}  # task number → its batch (or the exception it raised)
        self.taken = self.handed = 0  # tasks taken by the threads / batches handed to the consumer
        self.end: int | None = None  # the number of tasks, once the iterator is exhausted
        self.stopped = False
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"rela-loader-{k}")
                        for k in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def _take(self) -> tuple[int, Task] | None:
        """The next task and its number, when the consumer is less than `depth` behind (under the lock)."""
        while not self.stopped and self.end is None and self.taken - self.handed >= self.depth:
            self.cond.wait()
        if self.stopped or self.end is not None:
            return None
        n = self.taken
        try:
            task = next(self.tasks)  # under the lock: the task iterator is not thread-safe
        except StopIteration:
            self.end = n
            self.cond.notify_all()
            return None
        except BaseException as e:  # noqa: BLE001 - a bug making tasks: the consumer re-raises it
            self.results[n], self.end, self.taken = e, n + 1, n + 1
            self.cond.notify_all()
            return None
        self.taken += 1
        return n, task

    def _run(self) -> None:
        while True:
            with self.cond:
                got = self._take()
            if got is None:
                return
            n, task = got
            try:
                item = self.build(task)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                # rela's own errors never get here (builders return them as Built values); this is
                # anything else — a bug, MemoryError, KeyboardInterrupt — re-raised with its traceback
                item = e
            with self.cond:
                self.results[n] = item
                self.cond.notify_all()

    def __iter__(self):
        return self

    def __next__(self) -> Built:
        with self.cond:
            while self.handed not in self.results:
                if self.end is not None and self.handed >= self.end:
                    raise StopIteration
                self.cond.wait()
            item = self.results.pop(self.handed)
            self.handed += 1
            self.cond.notify_all()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
