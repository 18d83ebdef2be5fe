"""Distributed scoring for test_sharded_scoring.py: ``python sharded_script.py OUT STORE QUERIES
WORLD BLOCK`` spawns WORLD gloo processes; each calls ``attribute(..., distributed=True)`` for
every case and saves its results to ``OUT/rank<r>.pt``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_tda import AttributionStore

CASES = [("tracin", 5), ("influence", 5), ("graddot", None), ("influence", None)]


def run(rank: int, world: int, out: str, store: str, queries: str, block: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        qv = torch.load(queries)
        res = {}
        for method, k in CASES:
            r = AttributionStore(store).attribute(
                qv, method=method, top_k=k, block_rows=block, distributed=True
            )
            res[f"{method}/{k}"] = (r.scores, r.indices, r.opponent_scores, r.opponents)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out, store, queries, world, block = sys.argv[1:6]
    mp.spawn(run, args=(int(world), out, store, queries, int(block)), nprocs=int(world))
