"""The saved Lightning ``.ckpt`` files of a finished run: which step each holds, in step order."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_tda.errors import ConfigError


@dataclass(frozen=True)
class CheckpointFile:
    """One Lightning checkpoint file, as far as the sweep needs it.

    Attributes:
        path: the ``.ckpt`` file.
        global_step: optimizer steps taken when it was saved.
        epoch: ``trainer.current_epoch`` when it was saved.
        at_epoch_end: saved at the end of an epoch (``ModelCheckpoint(every_n_epochs=...)``, or
            on validation end), else mid-epoch (``every_n_train_steps``): logged with trigger
            ``"epoch"`` or ``"step"``.
        lrs: learning rate of every parameter group (across optimizers, in order) when it was saved,
            i.e. the rate the next optimizer step would use.
    """

    path: Path
    global_step: int
    epoch: int
    at_epoch_end: bool
    lrs: tuple[float, ...]

    @classmethod
    def read(cls, path: str | os.PathLike) -> CheckpointFile:
        """Read the step, epoch and learning rates of ``path`` (memory-mapped: no weights are read)."""
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:
            raise ConfigError(f"{path} is not a readable Lightning checkpoint: {e}") from e
        if "global_step" not in ckpt or "state_dict" not in ckpt:
            raise ConfigError(
                f"{path} is not a Lightning training checkpoint (no global_step/state_dict); "
                "pass the .ckpt files ModelCheckpoint saved during the fit"
            )
        if "optimizer_states" not in ckpt or "loops" not in ckpt:
            raise ConfigError(
                f"{path} holds the weights only (ModelCheckpoint(save_weights_only=True)): "
                "log_checkpoints restores the optimizer state, schedulers and loop counters of every "
                "checkpoint like a resumed fit; save full checkpoints (the default)"
            )
        lrs = tuple(
            float(g["lr"]) for opt in ckpt.get("optimizer_states", []) for g in opt["param_groups"]
        )
        return cls(path, int(ckpt["global_step"]), int(ckpt["epoch"]), _at_epoch_end(ckpt), lrs)


def _at_epoch_end(ckpt: dict) -> bool:
    """Saved between ``processed`` and ``completed`` of its epoch: from an end-of-epoch hook."""
    try:
        current = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
    except (KeyError, TypeError):
        return True
    return int(current["processed"]) > int(current["completed"])


def checkpoint_files(
    ckpt_paths: str | os.PathLike | Iterable[str | os.PathLike],
) -> list[CheckpointFile]:
    """The checkpoints of ``ckpt_paths`` (files, or a directory of ``*.ckpt``), sorted by global
    step; of several files at one step (e.g. ``last.ckpt``) the first by name is kept."""
    given = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
    paths: list[Path] = []
    for p in map(Path, given):
        paths.extend(sorted(p.glob("*.ckpt")) if p.is_dir() else [p])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ConfigError(
            f"no Lightning checkpoint files at {missing or given}; pass the .ckpt files (or their "
            "directory) that ModelCheckpoint(save_top_k=-1, ...) wrote during the fit"
        )
    files = sorted((CheckpointFile.read(p) for p in sorted(paths)), key=lambda c: c.global_step)
    out: list[CheckpointFile] = []
    for c in files:
        if not out or out[-1].global_step != c.global_step:
            out.append(c)
    return out
