"""Scoring split across processes (``attribute(..., distributed=True)``, 2 and 3 gloo processes)
equals one process's result exactly; the shard split, the top-k merge and the errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_tda.errors import ConfigError
from lightning_tda.methods.scoring import default_block_rows
from lightning_tda.methods.sharding import shard_rows

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from helpers import launch_script  # noqa: E402
from sharded_script import CASES  # noqa: E402


@pytest.fixture(scope="module")
def run(logged_mlp_store):
    run = logged_mlp_store("sharded", n=200, n_queries=6, epochs=2)
    steps = run.store.steps
    qv, _ = run.store.query_vectors(run.queries, run.model, steps)
    return run, {s: qv[s] for s in steps}


def _launch(tmp: Path, store: Path, queries: dict, world: int, block: int) -> list[dict]:
    qpath = tmp / "queries.pt"
    torch.save(queries, qpath)
    proc = launch_script(HERE / "sharded_script.py", str(tmp), str(store), str(qpath), str(world),
                         str(block))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize(("world", "block"), [(2, 7), (3, 150)])
def test_sharded_scoring_equals_one_process_exactly(run, tmp_path, world, block):
    """Every rank gets the single-process result bit for bit: top-k proponents and opponents
    (ids and scores) and dense scores, for TracIn, influence and graddot; with 3 ranks and
    150-row blocks over 200 rows one rank has no rows at all."""
    logged, queries = run
    ranks = _launch(tmp_path, logged.path, queries, world, block)
    for method, k in CASES:
        ref = logged.store.attribute(queries, method=method, top_k=k, block_rows=block)
        want = (ref.scores, ref.indices, ref.opponent_scores, ref.opponents)
        for r, got in enumerate(ranks):
            for a, b in zip(got[f"{method}/{k}"], want, strict=True):
                assert (a is None) == (b is None), (method, k, r)
                if a is not None:
                    assert torch.equal(a, b), (method, k, r)


def test_shard_rows_cover_every_row_once_on_block_boundaries():
    for n, block, world in [(200, 7, 2), (200, 150, 3), (5, 1, 4), (1000, 64, 5), (3, 10, 2)]:
        bounds = [shard_rows(n, block, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        for (lo, hi), (lo2, _) in zip(bounds, bounds[1:], strict=False):
            assert hi == lo2 and lo <= hi
        assert all(lo % block == 0 or lo == n for lo, _ in bounds)
        sizes = [-(-(hi - lo) // block) for lo, hi in bounds]  # blocks per rank
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard_rows(10, 3, 2, 2)


def test_distributed_without_a_process_group_or_with_stride_is_refused(run):
    logged, queries = run
    with pytest.raises(RuntimeError, match="init_process_group"):
        logged.store.attribute(queries, method="tracin", distributed=True)
    with pytest.raises(ConfigError, match="one process"):
        logged.store.attribute(
            logged.queries, model=logged.model, method="stride", distributed=True
        )


def test_default_block_accounts_for_the_queries():
    """The default block keeps fp32 rows of every term plus two ``[Q, B]`` score blocks within
    256 MiB: many queries, fewer rows."""
    budget, width = 256 * 2**20, 4096
    for terms, q in [(1, 0), (3, 100), (3, 50_000)]:
        b = default_block_rows(width, terms, q)
        used = b * 4 * (width * terms + 2 * q)
        assert 0.99 * budget < used <= budget, (terms, q, b)
    assert default_block_rows(width, 3, 50_000) < default_block_rows(width, 3, 0) / 8
