"""Fits logged by ``GradientLogger`` under ``strategy="ddp"`` (2 CPU processes, gloo), for test_ddp.py.

``python ddp_script.py OUT_DIR`` runs, in one DDP launch (Lightning re-runs this script for rank 1):
``plain`` (2 epochs), ``accum`` (``accumulate_grad_batches=2``), ``pca`` (``basis="pca"``, 1 epoch)
and ``resume`` (1 epoch, a Lightning checkpoint, then ``fit(ckpt_path=...)`` to 2 epochs). Each writes ``<name>.h5`` and, on rank zero,
the final weights ``<name>.pt``. ``config(name, devices)`` is shared with the single-process
reference so both runs see the same data, seeds, global batch and logger options.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import TinyMLP, make_classification
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from lightning_tda import GradientLogger

GLOBAL_BATCH = 16  # per optimizer step (single process: 16; DDP: 2 x 8, or 2 x 4 x 2 accumulated)
N_TRAIN = 32  # divisible by the global batch: no DistributedSampler padding


def data() -> tuple[Any, Any, Any]:
    """Training set (32), attribution set (35: uneven 17/18 DDP shards) and queries (6)."""
    return (
        make_classification(N_TRAIN, seed=0),
        make_classification(35, seed=1),
        make_classification(6, seed=3),
    )


def config(name: str, devices: int) -> dict[str, Any]:
    """Trainer kwargs, per-device batch size and logger kwargs of run ``name`` on ``devices``."""
    accumulate = 2 if name == "accum" else 1
    return {
        "batch_size": GLOBAL_BATCH // (devices * accumulate),
        "trainer": {
            "accumulate_grad_batches": accumulate,
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": devices,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            # the training batches are fixed (below): Lightning's DistributedSampler would shuffle
            **({"strategy": "ddp", "use_distributed_sampler": False} if devices > 1 else {}),
        },
        "logger": {
            "every_n_train_steps": 1 if name == "accum" else None,
            "every_n_epochs": None if name == "accum" else 1,
            "log_at_fit_start": True,
            "rank": 4,
            "batch_size": 4,
            "dtype": "float32",
            "curvature": True,
            "optimizer_state": True,
            "verbose": False,
            **({"basis": "pca", "basis_examples": 35} if name == "pca" else {}),
        },
    }


def fit(
    out: Path,
    name: str,
    devices: int,
    max_epochs: int = 2,
    ckpt_path: str | None = None,
    kill_at_sweep_batch: int | None = None,
) -> tuple[pl.Trainer, TinyMLP]:
    """One logged fit of a seeded Adam TinyMLP; the store is ``out/<name>.h5``.

    ``kill_at_sweep_batch=k``: rank 1 SIGKILLs itself at its ``k``-th sweep batch (1-based) and a
    ``ModelCheckpoint`` saves ``out/ckpts/last.ckpt`` at every epoch end."""
    train, attribution, queries = data()
    cfg = config(name, devices)
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(optimizer="adam", lr=0.05)
    killer = None if kill_at_sweep_batch is None else _Killer(kill_at_sweep_batch)
    logger = GradientLogger(
        out / f"{name}.h5",
        attribution_data=attribution,
        query_data=queries,
        loss_fn=killer,
        **cfg["logger"],
    )
    callbacks: list[pl.Callback] = [logger]
    extra: dict[str, Any] = {}
    if kill_at_sweep_batch is not None or ckpt_path is not None and "last" in ckpt_path:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpts", save_last=True))
        extra["enable_checkpointing"] = True
    trainer = pl.Trainer(
        **{**cfg["trainer"], "max_epochs": max_epochs, **extra},
        callbacks=callbacks,
        default_root_dir=str(out),
    )
    loader = DataLoader(train, batch_size=cfg["batch_size"], shuffle=False)
    if devices > 1:  # rank r takes examples r, r + 2, ...: each step's global batch is the same set
        rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning in the rank-1 process
        sampler = DistributedSampler(train, num_replicas=devices, rank=rank, shuffle=False)
        loader = DataLoader(train, batch_size=cfg["batch_size"], sampler=sampler)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, model


class _Killer:
    """A sweep loss (``model.per_example_loss``) whose ``k``-th call on rank 1 kills that rank."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def __call__(self, model: TinyMLP, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.k and int(os.environ.get("LOCAL_RANK", 0)) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return model.per_example_loss(batch)


def save_weights(trainer: pl.Trainer, model: TinyMLP, path: Path) -> None:
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    for name, epochs in (("plain", 2), ("accum", 2), ("pca", 1)):
        trainer, model = fit(out, name, devices=2, max_epochs=epochs)
        save_weights(trainer, model, out / f"{name}.pt")
    # stop after epoch 1 with a Lightning checkpoint, resume to epoch 2 from it
    trainer, _ = fit(out, "resume", devices=2, max_epochs=1)
    ckpt = out / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer, model = fit(out, "resume", devices=2, max_epochs=2, ckpt_path=str(ckpt))
    save_weights(trainer, model, out / "resume.pt")


def killed(out: Path, then_resume: bool) -> None:
    """Rank 1 killed mid-sweep of the step-4 checkpoint (shards of 17/18 rows in batches of 4: five
    sweep batches per checkpoint, so call 13 is in the third checkpoint), or the resume from the
    last Lightning checkpoint (epoch 1, step 2) to 2 epochs."""
    torch.set_num_threads(1)
    if not then_resume:
        fit(out, "killed", devices=2, kill_at_sweep_batch=13)
        return
    trainer, model = fit(out, "killed", devices=2, ckpt_path=str(out / "ckpts" / "last.ckpt"))
    save_weights(trainer, model, out / "killed.pt")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        killed(Path(sys.argv[1]), sys.argv[2] == "resume")
    else:
        main(Path(sys.argv[1]))
