"""Scoring one store across processes: each rank scans a contiguous, block-aligned shard of the
stored rows and the shards' results are merged with ``torch.distributed`` collectives.

The process group is the caller's (``torchrun``, Lightning Fabric or a Trainer's strategy have
initialised it); nothing here starts one. Shards start on multiples of the block size, so every
rank reads exactly the blocks one process would read and computes bit-identical scores; the merged
top-k equals the single-process top-k (ties aside: equal scores may come out in another order).
Every rank receives the merged result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_tda.methods.scoring import (
    ScoreTerm,
    TopK,
    default_block_rows,
    merge_top_k,
    stream_scores,
)
from lightning_tda.store.reader import StoreReader


def process_group_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group.

    Raises:
        RuntimeError: naming the fix when no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True scores the store across the processes of a torch.distributed group, "
            "but none is initialised: launch with torchrun (or Lightning Fabric / a Trainer "
            "strategy) and call torch.distributed.init_process_group() first, or pass "
            "distributed=False"
        )
    return dist.get_rank(), dist.get_world_size()


def shard_rows(num_rows: int, block_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(lo, hi)``: rank ``rank``'s rows; whole blocks of ``block_rows``, split as evenly as
    possible (the first ranks take one block more); a rank may get no rows (``lo == hi``).

    >>> [shard_rows(10, 3, r, 2) for r in range(2)]
    [(0, 6), (6, 10)]
    >>> [shard_rows(4, 8, r, 3) for r in range(3)]
    [(0, 4), (4, 4), (4, 4)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    blocks = -(-num_rows // block_rows)
    per, extra = divmod(blocks, world_size)
    first = rank * per + min(rank, extra)
    count = per + (rank < extra)
    return min(num_rows, first * block_rows), min(num_rows, (first + count) * block_rows)


def gather_top_k(local: TopK | None, k: int, num_queries: int) -> TopK:
    """The top-k over every rank's shard, on every rank.

    Args:
        local: this rank's :class:`TopK` (row positions already global); ``None`` for an empty
            shard.
        k: the ``k`` asked for, at most the store's rows (a shard holds ``min(k, its rows)``).
        num_queries: ``Q``.
    """
    none = (None, None)
    high = none if local is None else (local.values, local.rows)
    low = none if local is None else (local.low_values, local.low_rows)
    merged = []
    for (values, rows), largest in ((high, True), (low, False)):
        v, r = _padded(values, rows, k, num_queries, largest)
        vs, rs = _all_gather(v), _all_gather(r)
        merged.append(merge_top_k(torch.cat(vs, 1), torch.cat(rs, 1), k, largest))
    (hv, hr), (lv, lr) = merged
    return TopK(hv, hr, lv, lr)


def gather_dense(local: torch.Tensor, bounds: tuple[int, int], num_rows: int) -> torch.Tensor:
    """``[Q, N]``: every rank's ``[Q, hi - lo]`` columns put in place, on every rank."""
    full = torch.zeros(local.shape[0], num_rows, dtype=local.dtype)
    full[:, bounds[0] : bounds[1]] = local
    out = _on_comm_device(full)
    dist.all_reduce(out)  # each column is non-zero on one rank only: the sum is exact
    return out.cpu()


def _padded(values, rows, k, q, largest):
    """``[Q, k]`` values and rows, padded past a short shard with ``∓inf`` and row ``-1``."""
    fill = float("-inf") if largest else float("inf")
    v = torch.full((q, k), fill, dtype=torch.float32)
    r = torch.full((q, k), -1, dtype=torch.long)
    if values is not None:
        v[:, : values.shape[1]] = values
        r[:, : rows.shape[1]] = rows
    return v, r


def _on_comm_device(x: torch.Tensor) -> torch.Tensor:
    """``x`` where the group's backend communicates (the current CUDA device for NCCL)."""
    if dist.get_backend() == "nccl":
        return x.to(torch.device("cuda", torch.cuda.current_device()))
    return x


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    x = _on_comm_device(x.contiguous())
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return [t.cpu() for t in out]


def sharded_scores(
    store: StoreReader,
    terms: list[ScoreTerm],
    top_k: int | None,
    block_rows: int | None = None,
    *,
    description: str = "scoring",
) -> torch.Tensor | TopK:
    """:func:`~lightning_tda.methods.scoring.stream_scores` split across the process group: this
    rank scans its :func:`shard_rows`, the shards are merged; the same result on every rank."""
    rank, world = process_group_size()
    if not terms:
        raise ValueError("no checkpoints to score: the method selected none")
    q, n = terms[0].query.shape[0], store.num_examples
    block = block_rows or default_block_rows(store.width, len(terms), q)
    bounds = shard_rows(n, block, rank, world)
    label = f"{description} (rank {rank}/{world}, rows {bounds[0]}:{bounds[1]})"
    local = stream_scores(store, terms, top_k, block, description=label, rows=bounds)
    if top_k is None:
        return gather_dense(local, bounds, n)
    return gather_top_k(local, min(int(top_k), n), q)
