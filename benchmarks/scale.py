"""Scale benchmarks (issue 17): ``python -m benchmarks.scale [--stages index,sharded,real,lm,gpt]``.

Stages (each writes its entry of ``benchmarks/results/scale.json``; the BENCHMARKS.md "Scale"
section is rendered from the whole file by :mod:`benchmarks.render_scale`):

- ``index``: a synthetic store of ``--rows`` rows (default 10⁶, width 256, float16) of clustered
  low-rank rows (:func:`clustered_rows`, the geometry projected gradients have), plus the same
  size of i.i.d. Gaussian rows (no structure: the worst case of an IVF index); the exact scan of
  ``store.attribute`` against a FAISS index (:class:`~lightning_tda.methods.row_index.IndexConfig`
  defaults, then a grid of ``nprobe`` and ``refine``, and the plain ``IVF,Flat`` index): recall@10
  of the proponents and opponents on two halves of ``--queries`` precomputed queries each (the
  defaults were chosen on the first; the second is reported and timed), plus the build time;
- ``sharded``: the exact scan of the clustered store under ``attribute(..., distributed=True)`` in
  1 and 2 gloo processes (torch threads = cores / processes), rows × queries per second;
- ``real``: recall of the default index on a real store (the ``gpt_adamw`` bank, ``attribute()``'s
  default method) with and without whitening;
- ``lm`` / ``gpt``: :mod:`benchmarks.scale_lm` (a real pretrained LM with LoRA, and a config-built
  ≥ 100 M GPT-2 with full-parameter logging).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.perf import median_time, synthetic_store
from lightning_tda import AttributionStore
from lightning_tda.methods.row_index import IndexConfig

RESULTS = Path(__file__).parent / "results" / "scale.json"
WIDTH = 256
REFINES = (50, 150, 300)  # candidates re-ranked exactly per returned row
QUERY_SEEDS = (
    999_999,
    777_777,
)  # the choosing half (the defaults were picked on it), the reporting half


def clustered_rows(n: int, d: int, seed: int, clusters: int = 64, rank: int = 16) -> np.ndarray:
    """``[n, d]`` float32 rows ``a · (c_z + U h) + 0.3 ε``: one of ``clusters`` centres, a shared
    rank-``rank`` subspace with a decaying spectrum, a log-normal norm ``a`` and isotropic noise.
    The structure (centres, ``U``) is fixed; ``seed`` draws the rows (queries: another seed)."""
    s = np.random.default_rng(12345)
    centres = s.standard_normal((clusters, d)).astype(np.float32)
    basis = np.linalg.qr(s.standard_normal((d, rank)))[0].astype(np.float32) * np.sqrt(d)
    r = np.random.default_rng(seed)
    z = r.integers(clusters, size=n)
    h = r.standard_normal((n, rank)).astype(np.float32) / np.sqrt(1 + np.arange(rank))
    a = r.lognormal(0.0, 0.5, size=(n, 1)).astype(np.float32)
    noise = 0.3 * r.standard_normal((n, d)).astype(np.float32)
    return a * (centres[z] + h @ basis.T) + noise


def gaussian_rows(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def synthetic_rows_store(
    path: Path, rows: np.ndarray | Callable[[int, int], np.ndarray], workdir: Path, n: int = 0
) -> AttributionStore:
    """A one-checkpoint float16 store of ``rows`` (an array, or ``rows(start, stop)`` for ``n``)."""
    if isinstance(rows, np.ndarray):
        n, width = rows.shape
        fn = lambda a, b: torch.from_numpy(rows[a:b])  # noqa: E731
    else:
        width = rows(0, 1).shape[1]
        fn = lambda a, b: torch.from_numpy(rows(a, b))  # noqa: E731
    return synthetic_store(path, n, workdir, width=width, dtype="float16", rows_fn=fn)


def recall_at_k(approx_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean over queries of ``|approx ∩ exact| / k`` (``[Q, k]`` id tensors)."""
    hits = [
        len(set(a.tolist()) & set(e.tolist())) / e.numel()
        for a, e in zip(approx_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits))


def _blockwise(make: Callable[[int, int, int], np.ndarray], seed: int, block: int = 8192):
    """``rows(start, stop)`` for the writer's blocks of ``block`` rows (``perf.synthetic_store``),
    each drawn from its own seed: bounded memory, the same rows whatever the caller."""

    def rows(start: int, stop: int) -> np.ndarray:
        if start % block or stop - start > block:
            raise ValueError(f"rows({start}, {stop}) is not one block of {block}")
        return make(block, WIDTH, seed * 100_003 + start // block)[: stop - start]

    return rows


def _index_point(store, index, qv: dict, exact: dict, exact_s: float) -> dict:
    """Recall on both query halves and the reporting half's seconds at the index's settings."""
    step = store.steps[-1]
    got = {
        h: store.attribute({step: q}, method="graddot", top_k=10, index=index)
        for h, q in qv.items()
    }
    report = {step: qv["report"]}
    secs = median_time(lambda: store.attribute(report, method="graddot", top_k=10, index=index))[0]
    return {
        "factory": index.config.factory, "nprobe": index.config.nprobe, "refine": index.config.refine,
        **{f"recall_at_10_{h}": recall_at_k(got[h].indices, exact[h].indices) for h in qv},
        **{f"opponent_recall_at_10_{h}": recall_at_k(got[h].opponents, exact[h].opponents) for h in qv},
        "seconds": secs, "speedup": exact_s / secs,
    }  # fmt: skip


def index_rows(store: AttributionStore, queries: dict[str, torch.Tensor], label: str) -> dict:
    """Exact scan against FAISS indexes: the default one (its defaults, then a grid of ``nprobe``
    and ``refine``) and the plain ``IVF<nlist>,Flat`` of the earlier default. ``queries``: the
    ``"choose"`` half (defaults were chosen on it) and the ``"report"`` half (timed)."""
    step = store.steps[-1]
    exact = {h: store.attribute({step: q}, method="graddot", top_k=10) for h, q in queries.items()}
    report = {step: queries["report"]}
    exact_s = median_time(lambda: store.attribute(report, method="graddot", top_k=10))[0]
    t0 = time.perf_counter()
    index = store.build_index(method="graddot")
    build_s = time.perf_counter() - t0
    defaults = (index.config.nprobe, index.config.refine)
    nlist = int(index.config.factory.split(",")[0].removeprefix("IVF"))
    sweep = [{**_index_point(store, index, queries, exact, exact_s), "default": True}]
    for nprobe in sorted({max(1, nlist // f) for f in (64, 32, 16, 8)}):
        for refine in REFINES:
            if (nprobe, refine) == defaults:
                continue
            index.config.nprobe, index.config.refine = nprobe, refine
            sweep.append(_index_point(store, index, queries, exact, exact_s))
            print(f"{label}: {sweep[-1]}")
    del index
    flat = store.build_index(method="graddot", config=IndexConfig(factory=f"IVF{nlist},Flat"))
    for nprobe in (nlist // 32, nlist // 16):
        flat.config.nprobe = nprobe
        sweep.append(_index_point(store, flat, queries, exact, exact_s))
        print(f"{label}: {sweep[-1]}")
    return {
        "rows": store.num_examples, "width": store.width,
        "queries": {h: q.shape[0] for h, q in queries.items()},
        "exact_seconds": exact_s, "build_seconds": build_s, "sweep": sweep,
    }  # fmt: skip


def index_stage(rows: int, queries: int, workdir: Path) -> dict:
    out = {}
    for name, make in (("clustered", clustered_rows), ("gaussian", gaussian_rows)):
        t0 = time.perf_counter()
        store = synthetic_rows_store(
            workdir / f"{name}.h5", _blockwise(make, seed=0), workdir, n=rows
        )
        write_s = time.perf_counter() - t0
        halves = {"choose": QUERY_SEEDS[0], "report": QUERY_SEEDS[1]}
        q = {h: torch.from_numpy(make(queries, WIDTH, seed)) for h, seed in halves.items()}
        out[name] = {**index_rows(store, q, name), "write_seconds": write_s}
        if name != "clustered":
            (workdir / f"{name}.h5").unlink()
    return out


# -- sharded scoring ----------------------------------------------------------------------------
def _shard_worker(rank: int, world: int, port: int, store: str, queries: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        st = AttributionStore(store)
        qv = {st.steps[-1]: torch.load(queries)}

        def run():
            return st.attribute(qv, method="graddot", top_k=10, distributed=True)

        first = run()
        times = []
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            run()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": statistics.median(times)}))
            torch.save(first.indices, out + ".pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_stage(store_path: Path, queries: int, workdir: Path) -> dict:
    import torch.multiprocessing as mp

    store = AttributionStore(store_path)
    qpath = workdir / "q.pt"
    torch.save(torch.from_numpy(clustered_rows(queries, store.width, 999_999)), qpath)
    rows, first = [], None
    for world in (1, 2):
        out = workdir / f"sharded{world}.json"
        args = (world, _free_port(), str(store_path), str(qpath), str(out))
        mp.spawn(_shard_worker, args=args, nprocs=world)
        secs = json.loads(out.read_text())["seconds"]
        ids = torch.load(str(out) + ".pt")
        first = ids if first is None else first
        rows.append({
            "processes": world,
            "threads_per_process": max(1, (os.cpu_count() or 1) // world),
            "seconds": secs,
            "rows_queries_per_s": store.num_examples * queries / secs,
            "equal_to_one_process": bool(torch.equal(ids, first)),
        })  # fmt: skip
        print(f"sharded: {world} process(es): {secs:.2f} s")
    return {"rows": store.num_examples, "queries": queries, "cpus": os.cpu_count(), "runs": rows}


# -- a real store ----------------------------------------------------------------------------------
def real_stage(workdir: Path) -> dict:
    """Recall of the default index on the ``gpt_adamw`` bank's store (``attribute()``'s default
    method, with and without whitening its rows)."""
    from benchmarks.banks_build import TASKS
    from benchmarks.common import fit_logged

    task = TASKS["gpt_adamw"]()
    model, store, _ = fit_logged(task, workdir / "real.h5")
    exact = store.attribute(task.queries, model=model, top_k=10)
    out = {"bank": task.name, "rows": store.num_examples, "method": exact.method, "runs": []}
    for whiten in (True, False):
        index = store.build_index(config=IndexConfig(whiten=whiten))
        nlist = int(index.config.factory.split(",")[0].removeprefix("IVF"))
        default = index.config.nprobe
        for nprobe in sorted({default, *(max(1, nlist // f) for f in (8, 4, 2, 1))}):
            index.config.nprobe = nprobe
            res = store.attribute(task.queries, model=model, top_k=10, index=index)
            out["runs"].append({
                "whiten": whiten, "factory": index.config.factory, "nprobe": nprobe,
                "default": nprobe == default, "lists": nlist,
                "recall_at_10": recall_at_k(res.indices, exact.indices),
                "opponent_recall_at_10": recall_at_k(res.opponents, exact.opponents),
            })  # fmt: skip
            print(f"real ({exact.method}, whiten={whiten}): {out['runs'][-1]}")
    return out


def _isolated(key: str, workdir: Path) -> dict:
    """Run ``benchmarks.scale_lm``'s stage ``key`` in a spawned process (peak RSS is per process)."""
    import multiprocessing as mp

    from benchmarks import scale_lm

    fn = {"lm": scale_lm.lora_stage, "gpt": scale_lm.gpt_stage}[key]
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (workdir,))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="index,sharded,real,lm,gpt")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--no-render", action="store_true")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "index" in stages or "sharded" in stages:
            if "index" in stages:
                results["index"] = index_stage(args.rows, args.queries, work)
            else:
                synthetic_rows_store(
                    work / "clustered.h5", _blockwise(clustered_rows, 0), work, n=args.rows
                )
            if "sharded" in stages:
                results["sharded"] = sharded_stage(work / "clustered.h5", args.queries, work)
        if "real" in stages:
            results["real"] = real_stage(work)
        for key in ("lm", "gpt"):  # each in a fresh process: its own peak RSS
            if key in stages:
                results[key] = _isolated(key, work)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start))
        for key in stages:
            if isinstance(results.get(key), dict):
                results[key]["ran_at"] = started  # stages of other runs keep their own date
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    if not args.no_render:
        from benchmarks.render_scale import render

        render(results)


if __name__ == "__main__":
    main()
