"""In-flight fits logged by ``GradientLogger(mode="in_flight")`` in 2 CPU processes (gloo), for
test_in_flight_distributed.py.

``python in_flight_dist_script.py OUT_DIR`` runs, one launch each: ``ddp`` (``strategy="ddp"``),
``accum`` (DDP, ``accumulate_grad_batches=2``), ``fsdp2`` (Lightning's ``ModelParallelStrategy``,
``fully_shard`` on every Linear and the root) and ``fsdp1`` (Lightning's ``FSDPStrategy``, every
Linear a unit; ``fsdp_script.CPUFSDPStrategy`` on the CPU). ``python in_flight_dist_script.py OUT_DIR kill`` runs
``killed``: DDP whose rank 1 SIGKILLs itself in the training step of global step 4 (a
``ModelCheckpoint`` saves ``last.ckpt`` at each epoch end); ``... resume`` resumes it from there.

``fit(out, name, devices)`` is shared with the single-process reference: the same data, seeds,
global batch (16) and logger options. The training set has 39 examples, so ``DistributedSampler``
pads it by dealing example 0 again to rank 1 in each epoch's last step; the single-process
reference trains on the same 40 positions (``Subset`` with example 0 again at the end), so every
global batch is the same set of examples in both runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsdp_script import ShardedMLP, fsdp1_strategy
from helpers import TinyMLP, make_classification
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_tda import GradientLogger

GLOBAL_BATCH = 16
N_TRAIN = 39  # DistributedSampler pads to 40: example 0 again in each epoch's last step
NAMES = ("ddp", "accum", "fsdp2", "fsdp1")
KILL_STEP = 4  # epoch 1's second step (3 steps per epoch); last.ckpt holds step 3


class KillingMLP(TinyMLP):
    """TinyMLP whose rank 1 SIGKILLs itself in the training step of ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__(optimizer="adam", lr=0.05)
        self.kill_at = kill_at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.kill_at and self.trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)


def _model(name: str, resumed: bool) -> pl.LightningModule:
    if name.startswith("fsdp"):
        return ShardedMLP()
    return KillingMLP(KILL_STEP if name == "killed" and not resumed else None)


def _strategy(name: str, devices: int) -> dict[str, Any]:
    if devices == 1:
        return {}
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    elif name == "fsdp1":
        strategy = fsdp1_strategy(devices)
    else:
        strategy = "ddp"
    return {"strategy": strategy, "use_distributed_sampler": False}  # the sampler is below


def _loader(devices: int, batch_size: int) -> DataLoader:
    train = make_classification(N_TRAIN, seed=0)
    if devices == 1:  # the 40 positions DistributedSampler deals out: 0..38, then 0 again
        return DataLoader(Subset(train, [*range(N_TRAIN), 0]), batch_size=batch_size)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # rank r: positions r, r + 2, ...
    sampler = DistributedSampler(train, num_replicas=devices, rank=rank, shuffle=False)
    return DataLoader(train, batch_size=batch_size, sampler=sampler)


def fit(
    out: Path, name: str, devices: int, ckpt_path: str | None = None
) -> tuple[pl.Trainer, pl.LightningModule]:
    """One in-flight logged Adam fit of 2 epochs; the store is ``out/<name>.h5``."""
    accumulate = 2 if name == "accum" else 1
    pl.seed_everything(0, verbose=False)
    model = _model(name, resumed=ckpt_path is not None)
    logger = GradientLogger(
        out / f"{name}.h5", mode="in_flight", query_data=make_classification(6, seed=3),
        rank=4, dtype="float32", save_state=True, flush_every=2, verbose=False,
        overwrite=ckpt_path is None,
    )  # fmt: skip
    callbacks: list[pl.Callback] = [logger]
    if name == "killed":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpts", save_last=True, every_n_epochs=1))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, logger=False,
        accumulate_grad_batches=accumulate, enable_checkpointing=name == "killed",
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=str(out), **_strategy(name, devices),
    )  # fmt: skip
    trainer.fit(
        model, _loader(devices, GLOBAL_BATCH // (devices * accumulate)), ckpt_path=ckpt_path
    )
    return trainer, model


def save_weights(trainer: pl.Trainer, model: pl.LightningModule, path: Path) -> None:
    """The final weights (FSDP2: gathered from the shards on every rank), written by rank zero."""
    state = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        state[k] = full.detach().cpu()
    if trainer.is_global_zero:
        torch.save(state, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "kill":
        fit(out, "killed", devices=2)
    elif len(sys.argv) > 2 and sys.argv[2] == "resume":
        trainer, model = fit(out, "killed", devices=2, ckpt_path=str(out / "ckpts" / "last.ckpt"))
        save_weights(trainer, model, out / "killed.pt")
    else:
        for name in NAMES:
            trainer, model = fit(out, name, devices=2)
            save_weights(trainer, model, out / f"{name}.pt")
