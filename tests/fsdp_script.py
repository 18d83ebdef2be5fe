"""Fits logged by ``GradientLogger`` under FSDP2 (Lightning's ``ModelParallelStrategy``, data
parallel, 2 CPU processes, gloo), for test_fsdp.py.

``python fsdp_script.py OUT_DIR`` writes ``plain.h5`` (every layer trained) and ``frozen.h5`` (the
first Linear frozen, as a LoRA base is), and the same two under Lightning's ``FSDPStrategy`` (FSDP1,
every Linear a unit): ``plain_fsdp1.h5``, ``frozen_fsdp1.h5``; ``python fsdp_script.py OUT_DIR one``
writes ``one_fsdp1.h5``, FSDP1 in one process (the model is wrapped all the same). ``fit(out, name, devices)`` is shared with the
single-process reference: the same data, seeds, global batch (16) and logger options.
``LIGHTNING_TDA_TEST_ACCELERATOR=cuda`` runs both on GPUs (NCCL): ``pytest tests/test_fsdp.py`` on a
machine with 2 GPUs is the same check there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import TinyMLP, make_classification
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, Subset

from lightning_tda import GradientLogger

GLOBAL_BATCH = 16
ACCELERATOR = os.environ.get("LIGHTNING_TDA_TEST_ACCELERATOR", "cpu")


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (``strategy="fsdp"``, FSDP1) in CPU processes. Lightning refuses
    ``strategy="fsdp"`` without a GPU and wraps with ``device_id=None``, which torch refuses on a
    machine without an accelerator; torch's FSDP itself runs on the CPU with ``device_id=cpu``. Test
    scaffolding only: with ``LIGHTNING_TDA_TEST_ACCELERATOR=cuda`` the plain strategy runs."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )  # fmt: skip


def fsdp1_strategy(devices: int) -> FSDPStrategy:
    """FSDP1 with every Linear its own unit (and the root), as an ``auto_wrap_policy`` does it."""
    cls = CPUFSDPStrategy if ACCELERATOR == "cpu" else FSDPStrategy
    return cls(auto_wrap_policy={torch.nn.Linear})


class ShardedMLP(TinyMLP):
    """TinyMLP whose Linears and root are ``fully_shard``-ed when a device mesh is given."""

    def __init__(self, freeze_first: bool = False) -> None:
        super().__init__(optimizer="adam", lr=0.05)
        if freeze_first:
            self.net[0].requires_grad_(False)

    def configure_model(self) -> None:
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)


def fit(out: Path, name: str, devices: int) -> pl.Trainer:
    torch.manual_seed(0)
    train, attr, queries = (make_classification(n, seed=s) for n, s in ((32, 0), (35, 1), (6, 3)))
    model = ShardedMLP(freeze_first=name.startswith("frozen"))
    extra = {}
    if name.endswith("_fsdp1"):  # (also with devices=1: the wrappers are there all the same)
        extra = {"strategy": fsdp1_strategy(devices), "use_distributed_sampler": False}
    elif devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        extra = {"strategy": strategy, "use_distributed_sampler": False}
    logger = GradientLogger(
        out / f"{name}.h5", attribution_data=attr, query_data=queries, every_n_epochs=1,
        log_at_fit_start=True, rank=4, batch_size=4, dtype="float32", curvature=True,
        optimizer_state=True, basis="pca", basis_examples=35, verbose=False, overwrite=True,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=2, accelerator=ACCELERATOR, devices=devices, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[logger], **extra,
    )  # fmt: skip
    bs = GLOBAL_BATCH // devices  # global step t: rank r takes examples [16t + 8r, 16t + 8r + 8)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    mine = [i for i in range(len(train)) if (i // bs) % devices == rank]
    trainer.fit(model, DataLoader(Subset(train, mine), batch_size=bs))
    return trainer


if __name__ == "__main__":
    if sys.argv[2:] == ["one"]:  # FSDP1 in one process: wrapped all the same
        fit(Path(sys.argv[1]), "one_fsdp1", devices=1)
    else:
        for name in ("plain", "frozen", "plain_fsdp1", "frozen_fsdp1"):
            fit(Path(sys.argv[1]), name, devices=2)
