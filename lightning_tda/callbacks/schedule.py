"""When to log: ``ModelCheckpoint``-like triggers, validated up front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from lightning_tda.errors import ConfigError

TRIGGERS = ("every_n_train_steps", "every_n_epochs", "at_steps")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which global steps and epochs get a logged checkpoint.

    At most one of ``every_n_train_steps``, ``every_n_epochs`` and ``at_steps`` may be set. With none of
    them the logger applies its mode's default (:meth:`for_mode`): ``every_n_epochs=1`` in a sweep
    (unless a ``log_at_fit_*`` flag is set), every optimizer step in flight.

    Args:
        every_n_train_steps: log after every n-th optimizer step.
        every_n_epochs: log at the end of every n-th training epoch.
        at_steps: log after these global steps.
        log_at_fit_start: also log the weights the fit starts from (global step 0 on a fresh fit).
        log_at_fit_end: also log the final weights (skipped if that step is already logged).

    Raises:
        ConfigError: two triggers, or a trigger that is not a positive int / a list of steps.

    Example:
        >>> ScheduleConfig(every_n_train_steps=10).step_due(20)
        True
        >>> ScheduleConfig(at_steps=[5, 7]).step_due(6)
        False
        >>> ScheduleConfig().for_mode("sweep").every_n_epochs
        1
    """

    every_n_train_steps: int | None = None
    every_n_epochs: int | None = None
    at_steps: Sequence[int] | None = None
    log_at_fit_start: bool = False
    log_at_fit_end: bool = False
    _steps: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    may_change_on_resume: ClassVar[frozenset[str]] = frozenset(
        (*TRIGGERS, "log_at_fit_start", "log_at_fit_end")
    )
    """Fields a resumed fit may change (the schedule only decides which steps are logged)."""

    def __post_init__(self) -> None:
        given = [n for n in TRIGGERS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"GradientLogger takes one trigger, got {', '.join(given)}; keep one and use log_at_fit_start / "
                "log_at_fit_end for extra checkpoints."
            )
        for name in ("every_n_train_steps", "every_n_epochs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.at_steps is not None:
            object.__setattr__(self, "_steps", frozenset(_check_steps(self.at_steps)))

    def for_mode(self, mode: str) -> ScheduleConfig:
        """This schedule with the mode's default trigger filled in when none is given."""
        if mode == "in_flight":
            if self.every_n_train_steps is None and self.at_steps is None:
                return replace(self, every_n_train_steps=1)
            return self
        given = any(getattr(self, n) is not None for n in TRIGGERS)
        if not given and not self.log_at_fit_start and not self.log_at_fit_end:
            return replace(self, every_n_epochs=1)
        return self

    def step_due(self, global_step: int) -> bool:
        if self.every_n_train_steps is not None:
            return global_step > 0 and global_step % self.every_n_train_steps == 0
        return global_step in self._steps

    def epoch_due(self, epoch: int) -> bool:
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def to_dict(self) -> dict:
        return {
            "every_n_train_steps": self.every_n_train_steps,
            "every_n_epochs": self.every_n_epochs,
            "at_steps": None if self.at_steps is None else sorted(self._steps),
            "log_at_fit_start": self.log_at_fit_start,
            "log_at_fit_end": self.log_at_fit_end,
        }


def _check_steps(at_steps: object) -> list[int]:
    if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, (Sequence, set, frozenset)):
        raise ConfigError(
            f"at_steps must be a list of non-negative ints (e.g. at_steps=[3] for one step), got {at_steps!r}"
        )
    steps = list(at_steps)
    if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
        raise ConfigError(
            f"at_steps must be a non-empty list of non-negative ints, got {at_steps!r}"
        )
    return steps


@dataclass(frozen=True)
class LogSchedule(ScheduleConfig):
    """:class:`ScheduleConfig` with the sweep default applied at construction (the former name).

    Example:
        >>> LogSchedule().every_n_epochs
        1
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        resolved = self.for_mode("sweep")
        object.__setattr__(self, "every_n_epochs", resolved.every_n_epochs)
