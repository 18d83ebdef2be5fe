"""A background thread that writes to the store while training goes on.

``GradientLogger(mode="in_flight")`` hands each group of logged steps to a :class:`BackgroundWriter`
instead of writing it between two optimizer steps. Jobs run one at a time, in submission order, on
one daemon thread; the queue is bounded (``max_pending`` jobs), so a disk slower than training
throttles the training loop instead of growing memory without limit.

A job's failure is kept and raised in the training thread at its next :meth:`~BackgroundWriter.submit`,
:meth:`~BackgroundWriter.check` or :meth:`~BackgroundWriter.drain`; jobs submitted after a failure are
dropped (the store keeps its last commit: every step it lists is complete). A process killed while a
job writes leaves the store as of its last commit, as for a synchronous write (the journal).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """Runs ``fn(*args)`` jobs on one thread, in order, at most ``max_pending`` waiting at a time.

    Args:
        max_pending: jobs that may wait in the queue before :meth:`submit` blocks (>= 1).
        name: the thread's name (shown in stack dumps).
    """

    def __init__(self, max_pending: int = 2, name: str = "lightning_tda-writer") -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks while ``max_pending`` jobs wait. Raises an earlier job's error."""
        self.check()
        if not self.alive:
            raise RuntimeError("the background writer was closed")
        self._jobs.put((fn, args))

    def check(self) -> None:
        """Raise the error of a failed job, if any (once; later calls raise it again)."""
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait until every submitted job has run; then raise a failed job's error, if any."""
        if self.alive:
            self._jobs.join()
        self.check()

    def close(self) -> None:
        """Run what is queued, stop the thread and raise a failed job's error, if any."""
        if self.alive:
            self._jobs.put((_STOP, ()))
            self._thread.join()
        self.check()

    def _run(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                if fn is _STOP:
                    return
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e
            finally:
                self._jobs.task_done()
