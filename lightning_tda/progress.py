"""Progress bars for the long steps (checkpoint sweeps, scoring, retraining banks, ensembles).

One context manager, :func:`progress_bar`, used by the library's long loops. It updates once per
batch or block (never per row), uses no randomness, and prints nothing unless a bar should show:

- ``verbose=False`` (e.g. ``GradientLogger(verbose=False)``) or ``LIGHTNING_TDA_PROGRESS=0``: off;
- off on every rank but zero;
- inside a fit (``trainer=`` given): the bar joins the trainer's own ``RichProgressBar`` (as an extra
  task) or ``TQDMProgressBar`` (as a second line, like validation); with the trainer's bar disabled
  (``enable_progress_bar=False``) there is none;
- otherwise a ``rich.progress`` bar on stderr, shown only when stderr is a terminal;
- ``LIGHTNING_TDA_PROGRESS=1`` forces bars on (e.g. in notebooks or CI logs; a non-terminal gets the
  final state once).

Tests (or applications) redirect the standalone bars by replacing :data:`console_factory`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

ENV_VAR = "LIGHTNING_TDA_PROGRESS"
"""Environment variable: ``0`` turns every bar off, ``1`` forces bars on, unset = automatic."""

_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def _default_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


console_factory: Callable[[], Any] = _default_console
"""``() -> rich.console.Console`` of the standalone bars (default: stderr). Replace to redirect them."""


def progress_mode() -> bool | None:
    """``True`` (forced on), ``False`` (off) or ``None`` (automatic) from ``LIGHTNING_TDA_PROGRESS``."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if not raw:
        return None
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    warnings.warn(
        f"{ENV_VAR}={raw!r} is not understood; set it to 1 (force progress bars) or 0 (no bars). "
        "Using the automatic setting.",
        stacklevel=3,
    )
    return None


def _rank_zero(trainer: Any) -> bool:
    if trainer is not None:
        return bool(getattr(trainer, "is_global_zero", True))
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    ranks = [getattr(rank_zero_only, "rank", 0)]
    standalone = sys.modules.get("lightning_fabric.utilities.rank_zero")  # pytorch_lightning tree
    if standalone is not None:
        ranks.append(getattr(standalone.rank_zero_only, "rank", 0))
    return all(r == 0 for r in ranks)


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Bar:
    """Handle of one bar: ``advance(n)`` after each batch or block. The no-op base is used when off."""

    enabled = False

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done."""


class _RichBar(Bar):
    enabled = True

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


class _TqdmBar(Bar):
    enabled = True

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)


_NULL = Bar()
_active: Any = None  # the standalone rich Progress on screen; nested bars become tasks of it


def _trainer_bar(trainer: Any) -> Any:
    """The trainer's enabled progress-bar callback, or ``None``."""
    cb = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return cb if cb is not None and getattr(cb, "is_enabled", False) else None


@contextlib.contextmanager
def progress_bar(
    description: str,
    total: int | None,
    *,
    unit: str = "",
    initial: int = 0,
    verbose: bool = True,
    transient: bool = False,
    trainer: Any = None,
) -> Iterator[Bar]:
    """A progress bar over ``total`` items (``None``: unknown), as a context manager yielding a :class:`Bar`.

    Args:
        description: what is being done, e.g. ``"scoring tracin: 5 checkpoints"``.
        total: number of items (examples, rows, runs ...) the loop will count.
        unit: name of the items, shown after the count.
        initial: items already done before the loop (e.g. finished runs of a resumed bank).
        verbose: ``False`` turns the bar off (the caller's ``verbose`` flag).
        transient: remove the bar from the screen when done (for inner loops).
        trainer: the running Lightning ``Trainer`` when called inside a fit: its own progress bar is
            reused, and its rank and ``enable_progress_bar`` setting decide whether to show one.
    """
    mode = progress_mode()
    if not verbose or mode is False or not _rank_zero(trainer):
        yield _NULL
        return
    cb = _trainer_bar(trainer)
    if cb is not None:
        host = getattr(cb, "progress", None)
        live = getattr(host, "live", None)
        if host is not None and getattr(live, "is_started", False):  # RichProgressBar
            task = host.add_task(description, total=total, completed=initial, unit=unit)
            try:
                yield _RichBar(host, task)
            finally:
                host.remove_task(task)
            return
        if hasattr(cb, "init_validation_tqdm"):  # TQDMProgressBar: a second line, like validation
            bar = cb.init_validation_tqdm()
            bar.reset(total=total)
            bar.set_description(description)
            bar.update(initial)
            if unit:
                bar.unit = unit
            try:
                yield _TqdmBar(bar)
            finally:
                bar.close()
            return
    elif trainer is not None and mode is not True:
        yield _NULL  # the trainer shows no progress bars: neither do we
        return
    if mode is not True and not _stderr_is_terminal():
        yield _NULL
        return
    with _standalone(description, total, unit, initial, transient) as bar:
        yield bar


@contextlib.contextmanager
def _standalone(
    description: str, total: int | None, unit: str, initial: int, transient: bool
) -> Iterator[Bar]:
    global _active
    if _active is not None:  # nested: one more line in the bar already on screen
        progress = _active
        task = progress.add_task(description, total=total, completed=initial, unit=unit)
        try:
            yield _RichBar(progress, task)
        finally:
            progress.refresh()  # render the final count before the line goes
            if transient:
                progress.remove_task(task)
        return
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:  # rich is optional at run time: no bar rather than an error
        yield _NULL
        return
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console_factory(),
        transient=transient,
    )
    task = progress.add_task(description, total=total, completed=initial, unit=unit)
    _active = progress
    progress.start()
    try:
        yield _RichBar(progress, task)
    finally:
        _active = None
        progress.stop()
