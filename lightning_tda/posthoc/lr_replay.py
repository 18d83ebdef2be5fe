"""The learning-rate sums of a finished run, rebuilt from its ``configure_optimizers``.

TracIn-CP weighs each checkpoint by ``lr_sum``, the learning rates summed over the optimizer steps
since the previous checkpoint; a Lightning checkpoint keeps only the rate at its own step. The
schedule is replayed: a fresh optimizer and LR scheduler from ``model.configure_optimizers()``
(parsed by Lightning's own parser), stepped exactly as Lightning's training loop steps them
(``interval="step"`` schedulers after every optimizer step whose batch index ``+ 1`` is a multiple of
``frequency``, ``interval="epoch"`` ones after an epoch's last batch; an optimizer step every
``accumulate_grad_batches`` batches and on an epoch's last batch), with the rate of every step
summed as the logger sums it. The replay is checked against the rate each checkpoint saved (and its
epoch boundaries against the checkpoints' epochs); where it cannot be run (manual optimization,
``ReduceLROnPlateau``, which depends on logged metrics) or disagrees, the sums fall back to
``lr_at_checkpoint x steps since the previous checkpoint`` and the store records why
(``logged_from_checkpoints`` root attribute, docs/store.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

from lightning_tda.callbacks.optimizer_state import current_lrs
from lightning_tda.posthoc.ckpt_files import CheckpointFile

REPLAYED = "replayed"
APPROXIMATE = "lr_at_checkpoint_x_steps"
RTOL = 1e-9
"""Relative tolerance of the replayed rate against a checkpoint's saved rate (the same arithmetic
gives the same floats; the slack only absorbs a rate stored as a float32 tensor)."""


@dataclass(frozen=True)
class LrSums:
    """Learning-rate cumulative sums at each checkpoint's step.

    Attributes:
        cumsums: ``{global_step: [per param group Σ_{t < step} lr_t]}`` at every checkpoint and at
            the fit's last step.
        method: :data:`REPLAYED` (exact) or :data:`APPROXIMATE`.
        note: why the replay was not used (empty when it was).
    """

    cumsums: dict[int, list[float]]
    method: str
    note: str = ""


@dataclass
class _Replay:
    """Per optimizer step the rate it used (``rates[t]``), the rate after the last step, and the
    global step at which each epoch ended."""

    rates: list[list[float]]
    after: list[float]
    epoch_ends: dict[int, int]


def lr_sums(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    ckpts: Sequence[CheckpointFile],
    end: int | None = None,
) -> LrSums:
    """The cumulative learning-rate sums at every checkpoint of ``ckpts`` (sorted by step) and at
    the fit's last step ``end`` (default: the last checkpoint's), replayed where possible
    (``trainer``: a fit restored from a checkpoint, its training data set up)."""
    end = ckpts[-1].global_step if end is None else max(int(end), ckpts[-1].global_step)
    steps = sorted({c.global_step for c in ckpts} | {end})
    replay, note = _replay(trainer, model, end)
    if replay is not None:
        note = _disagreement(replay, ckpts)
        if not note:
            return LrSums(_replayed_cumsums(replay, steps), REPLAYED)
    return LrSums(_approximate_cumsums(ckpts, end), APPROXIMATE, note)


def _replay(
    trainer: pl.Trainer, model: pl.LightningModule, total: int
) -> tuple[_Replay | None, str]:
    if not model.automatic_optimization:
        return None, "manual optimization steps its schedulers itself"
    optimizers, configs = _init_optimizers_and_lr_schedulers(model)
    if any(c.reduce_on_plateau for c in configs):
        return None, "ReduceLROnPlateau depends on metrics logged during the fit"
    n_batches = trainer.num_training_batches
    if n_batches == 0 or (math.isinf(n_batches) and any(c.interval == "epoch" for c in configs)):
        return None, "the training data has no length, so epoch boundaries are unknown"
    accumulate = max(int(trainer.accumulate_grad_batches), 1)
    rates: list[list[float]] = []
    epoch_ends: dict[int, int] = {}
    epoch = batch = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)")
        while len(rates) < total:
            last = batch == n_batches - 1
            if (batch + 1) % accumulate == 0 or last:
                rates.append(current_lrs(optimizers))
                _step(model, configs, "step", batch + 1)
            if last:
                _step(model, configs, "epoch", epoch + 1)
                epoch_ends[epoch] = len(rates)
                epoch, batch = epoch + 1, 0
            else:
                batch += 1
    return _Replay(rates, current_lrs(optimizers), epoch_ends), ""


def _step(model: pl.LightningModule, configs: list, interval: str, index: int) -> None:
    """Step the schedulers of ``interval`` due at ``index`` (batch or epoch, counted from 1), through
    the module's ``lr_scheduler_step`` hook as Lightning does."""
    for c in configs:
        if c.interval == interval and index % c.frequency == 0:
            model.lr_scheduler_step(c.scheduler, None)


def _disagreement(replay: _Replay, ckpts: Sequence[CheckpointFile]) -> str:
    """Why the replay does not reproduce the checkpoints ("" when it does)."""
    for c in ckpts:
        rate = replay.rates[c.global_step] if c.global_step < len(replay.rates) else replay.after
        if len(rate) != len(c.lrs) or not all(
            math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0) for a, b in zip(rate, c.lrs, strict=True)
        ):
            return (
                f"the replayed learning rate at step {c.global_step} ({rate}) is not the one saved in "
                f"{c.path.name} ({list(c.lrs)})"
            )
        end = replay.epoch_ends.get(c.epoch)
        if c.at_epoch_end and c.global_step > 0 and end is not None and end != c.global_step:
            return (
                f"{c.path.name} ends epoch {c.epoch} at step {c.global_step}, the replay at step {end}: "
                "pass the fit's training data and accumulate_grad_batches / limit_train_batches"
            )
    return ""


def _replayed_cumsums(replay: _Replay, steps: Sequence[int]) -> dict[int, list[float]]:
    """Σ_{t < step} lr_t per group, summed step by step in the logger's order (the same floats)."""
    wanted = set(steps)
    groups = len(replay.after)
    total = [0.0] * groups
    out = {0: list(total)} if 0 in wanted else {}
    for t, rate in enumerate(replay.rates):
        for j in range(groups):
            total[j] += float(rate[j])
        if t + 1 in wanted:
            out[t + 1] = list(total)
    return out


def _approximate_cumsums(ckpts: Sequence[CheckpointFile], end: int) -> dict[int, list[float]]:
    """``lr_at_checkpoint × steps since the previous checkpoint``, accumulated (exact for a constant
    rate; the fit is taken to start at step 0); the steps after the last checkpoint up to ``end`` at
    its rate."""
    out: dict[int, list[float]] = {}
    total = [0.0] * len(ckpts[0].lrs)
    prev = 0
    for step, lrs in [*((c.global_step, c.lrs) for c in ckpts), (end, ckpts[-1].lrs)]:
        total = [s + lr * (step - prev) for s, lr in zip(total, lrs, strict=True)]
        out[step] = list(total)
        prev = step
    return out
