"""DDP support of the ``GradientLogger`` sweep: data shards, per-rank shard files, the merge, and
the cross-rank reduction of K-FAC factors (docs/store.md "Distributed (DDP, FSDP) fits").

Each rank sweeps a contiguous block of the attribution data (no padding, so every example is swept
exactly once) into its own shard file ``<store>.rank<r>.h5`` with the store's crash-safe checkpoint
writer. After a barrier, rank zero copies the shards' raw rows (no re-encoding) in rank order into
the checkpoint of the main file, i.e. in dataset order, exactly as a single-process sweep writes
them, adds the rank-independent parts (queries, optimizer moments, state, reduced K-FAC factors),
commits, and deletes the shards. Everything distributed goes through ``trainer.strategy``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lightning_tda.capture.hooks import ProjectedCovariance
from lightning_tda.errors import StoreError
from lightning_tda.store import schema
from lightning_tda.store.writer import CheckpointWriter, ReadFile

CHUNK = 4096  # rows copied per read from a shard


def is_distributed(trainer: pl.Trainer) -> bool:
    """Whether the fit runs in more than one process."""
    return trainer.world_size > 1


def check_strategy(trainer: pl.Trainer, mode: str) -> None:
    """Refuse multi-process fits the logger cannot log exactly: DDP, FSDP1 (``use_orig_params``,
    one flat group) and data-parallel FSDP2 are supported in both modes (``mode``: ``"sweep"`` or
    ``"in_flight"``)."""
    if not is_distributed(trainer):
        return
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    name = type(strategy).__name__
    if is_fsdp2(strategy):
        _check_fsdp2(strategy, name)
    elif is_fsdp1(strategy):
        _check_fsdp1(strategy, name)
    elif not isinstance(strategy, DDPStrategy) or "DeepSpeed" in name:
        raise MisconfigurationException(
            f"GradientLogger supports multi-process fits with DDP (strategy='ddp' or 'ddp_spawn'), "
            f"FSDP (strategy='fsdp', use_orig_params=True) and FSDP2 "
            f"(ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with "
            f"fully_shard in configure_model); this Trainer uses {name} with {trainer.world_size} "
            "processes, whose sharded parameters the logger cannot gather. Switch to one of "
            "those, or devices=1 (docs/store.md 'Distributed (DDP, FSDP) fits')."
        )


def is_fsdp1(strategy: pl.strategies.Strategy) -> bool:
    """Lightning's ``FSDPStrategy`` (``strategy="fsdp"``: ``FullyShardedDataParallel`` wrappers)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def is_sharded(strategy: pl.strategies.Strategy) -> bool:
    """FSDP1 or FSDP2: a rank holds only a shard of the parameters."""
    return is_fsdp1(strategy) or is_fsdp2(strategy)


def is_fsdp2(strategy: pl.strategies.Strategy) -> bool:
    """Lightning's ``ModelParallelStrategy`` (the module's ``configure_model`` calls ``fully_shard``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def _check_fsdp1(strategy: pl.strategies.Strategy, name: str) -> None:
    kwargs = getattr(strategy, "kwargs", {})
    if not kwargs.get("use_orig_params", True):
        raise MisconfigurationException(
            f"GradientLogger under {name} needs use_orig_params=True (Lightning's default): with "
            "use_orig_params=False the optimizer holds flattened parameters, whose Adam moments and "
            "state the logger cannot map to layers. Drop use_orig_params=False, or use "
            "ModelParallelStrategy (FSDP2) or strategy='ddp'."
        )
    if kwargs.get("device_mesh") is not None or "HYBRID" in str(
        getattr(strategy, "sharding_strategy", "")
    ):
        raise MisconfigurationException(
            f"GradientLogger under {name} supports one flat data-parallel group (sharding_strategy "
            "FULL_SHARD, SHARD_GRAD_OP or NO_SHARD); hybrid sharding and device meshes are not "
            "supported. Use sharding_strategy='FULL_SHARD' or ModelParallelStrategy (FSDP2)."
        )


def _check_fsdp2(strategy: pl.strategies.Strategy, name: str) -> None:
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if tp != 1:
        raise MisconfigurationException(
            f"GradientLogger supports {name} as data-parallel FSDP2 only (tensor_parallel_size=1); "
            f"tensor_parallel_size={tp} splits layers across ranks, whose per-example gradients the "
            "sweep cannot form on one rank. Use ModelParallelStrategy(data_parallel_size=<devices>, "
            "tensor_parallel_size=1) or strategy='ddp'."
        )


@contextlib.contextmanager
def fsdp2_unsharded(module: nn.Module) -> Iterator[None]:
    """FSDP2 (``fully_shard``): every sharded submodule's parameters all-gathered once (collective:
    every rank enters together) and kept unsharded until the block ends, so the sweep's rank-local
    forwards and backwards (which set no parameter ``.grad``) run no collective; resharded on exit
    with each parameter group's reshard settings restored. A no-op without ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in mods for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [(g.post_forward_mesh_info, g.reshard_after_backward) for g in groups]
    for m in mods:
        m.unshard()
    for g in groups:
        g.post_forward_mesh_info, g.reshard_after_backward = None, False
    try:
        yield
    finally:
        for g, (after_forward, after_backward) in zip(groups, saved, strict=True):
            g.post_forward_mesh_info, g.reshard_after_backward = after_forward, after_backward
        for m in mods:
            m.reshard()


@contextlib.contextmanager
def fsdp1_full_model(
    strategy: pl.strategies.Strategy,
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> Iterator[None]:
    """FSDP1 (Lightning's ``FSDPStrategy``, ``use_orig_params=True``): for the block, ``module``
    looks as it does in one process. Its parameters are all-gathered
    (``FullyShardedDataParallel.summon_full_params`` on the strategy's root, write-back off); every
    ``FullyShardedDataParallel`` wrapper inside it is replaced by the module it wraps, so names,
    classes and forwards are the unwrapped model's and a forward runs no collective; and the
    ``optimizers``' state of each parameter is replaced by its full state
    (``FullyShardedDataParallel.optim_state_dict``). A collective: every rank enters together.
    Everything is restored on exit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = strategy.model
    full = [FSDP.optim_state_dict(root, opt)["state"] for opt in optimizers]
    with FSDP.summon_full_params(root, writeback=False):
        wrappers = [
            (module.get_submodule(parent) if parent else module, child, m)
            for name, m in module.named_modules()
            if isinstance(m, FSDP) and m is not root
            for parent, _, child in [name.rpartition(".")]
        ]
        for parent, child, m in wrappers:
            setattr(parent, child, m.module)
        saved = _full_optimizer_state(module, optimizers, full)
        try:
            yield
        finally:
            for opt, states in saved:
                for p, st in states.items():
                    if st is None:
                        del opt.state[p]
                    else:
                        opt.state[p] = st
            for parent, child, m in reversed(wrappers):
                setattr(parent, child, m)


def _full_optimizer_state(
    module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], full: Sequence[Mapping]
) -> list[tuple[torch.optim.Optimizer, dict]]:
    """Put each parameter's full optimizer state (``full``: ``optim_state_dict()["state"]`` by
    parameter name) in place of its shard's; the replaced states, to restore."""
    named = dict(module.named_parameters())
    saved = []
    for opt, states in zip(optimizers, full, strict=True):
        kept = {}
        for name, st in states.items():
            p = named.get(name)
            if p is not None:  # (a rank whose shard of p is empty keeps no state for it)
                kept[p] = opt.state.get(p)
                opt.state[p] = dict(st)
        saved.append((opt, kept))
    return saved


@contextlib.contextmanager
def full_model(
    trainer: pl.Trainer, module: nn.Module, optimizer_state: bool = False
) -> Iterator[None]:
    """For the block, ``module``'s parameters are complete on every rank and its forwards run no
    collective: FSDP1 :func:`fsdp1_full_model` (``optimizer_state``: with the full Adam state), FSDP2
    :func:`fsdp2_unsharded`, else a no-op. A collective under FSDP: every rank enters together."""
    strategy = trainer.strategy
    if is_fsdp1(strategy):  # (also in one process: the wrappers are there all the same)
        optimizers = trainer.optimizers if optimizer_state else ()
        with fsdp1_full_model(strategy, module, optimizers):
            yield
    elif is_fsdp2(strategy):
        with fsdp2_unsharded(module):
            yield
    else:
        yield


def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` blocks of ``range(n)``, one per rank, sizes differing by at most 1."""
    if n < world_size:
        raise StoreError(
            f"the attribution data has {n} examples, fewer than the {world_size} DDP processes; every rank "
            "sweeps a non-empty shard. Use fewer devices or more attribution examples."
        )
    edges = [(r * n) // world_size for r in range(world_size + 1)]
    return [(edges[r], edges[r + 1]) for r in range(world_size)]


class ShardSampler(Sampler[int]):
    """Dataset indices ``start..stop-1`` in order (a rank's contiguous shard, no padding)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def shard_loader(loader: DataLoader, rank: int, world_size: int, batch_size: int) -> DataLoader:
    """This rank's contiguous shard of ``loader``'s dataset, in dataset order.

    ``batch_size`` is used when ``loader`` has none (a custom batch sampler)."""
    try:
        n = len(loader.dataset)
    except TypeError:
        raise MisconfigurationException(
            "GradientLogger under DDP shards the attribution data by index; it must be a sized map-style "
            "Dataset (not an IterableDataset)."
        ) from None
    start, stop = shard_bounds(n, world_size)[rank]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size or batch_size,
        sampler=ShardSampler(start, stop),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """The shard file of ``rank`` next to the store: ``<store>.rank<r>.h5``."""
    p = Path(path)
    return p.with_name(f"{p.name}.rank{rank}.h5")


def reduce_covariances(
    strategy: pl.strategies.Strategy, covariances: Mapping[str, ProjectedCovariance] | None
) -> None:
    """Sum each layer's running K-FAC sums ``A'``, ``S'`` and token count over ranks, in place.

    After this every rank holds the factors of the whole attribution set, as a single process does.
    Collective: every rank calls it with the same layers."""
    if not covariances:
        return
    for name in sorted(covariances):
        c = covariances[name]
        if c.a is None or c.s is None:
            raise StoreError(
                f"layer {name} saw no token on this rank's shard; every rank must sweep a non-empty shard"
            )
        c.a = strategy.reduce(c.a.clone(), reduce_op="sum")
        c.s = strategy.reduce(c.s.clone(), reduce_op="sum")
        tokens = torch.tensor([float(c.tokens)], dtype=torch.float64, device=c.a.device)
        c.tokens = int(strategy.reduce(tokens, reduce_op="sum").item())


def copy_shard_rows(cw: CheckpointWriter, shard: str | os.PathLike, step: int) -> int:
    """Copy the rows of checkpoint ``step`` of a shard file into ``cw`` unchanged (stored bytes).

    Returns the number of rows copied. Rows take their canonical positions (``examples/ids`` of the
    main file) or, at a store's first checkpoint, the next free positions, so shards copied in rank
    order give the dataset order."""
    with ReadFile(shard) as f:
        g = f.get(schema.checkpoint_name(step))
        if g is None or not g.attrs.get("complete", False):
            raise StoreError(
                f"shard {shard} has no complete checkpoint at step {step}; a DDP rank failed during its sweep"
            )
        names = [k for k in (schema.TRAIN, schema.TRAIN_PRECOND) if k in cw.ds]
        for k in names:
            if cw.stored_name[k] not in g:
                raise StoreError(f"shard {shard} lacks dataset {cw.stored_name[k]} at step {step}")
        n = g[schema.ROW_IDS].shape[0]
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            raw = {k: g[cw.stored_name[k]][lo:hi] for k in names}
            ids = np.asarray(g[schema.ROW_IDS][lo:hi], dtype=np.int64)
            cw.write_encoded(ids, raw, g[schema.TRAIN_LOSS][lo:hi])
    return n
