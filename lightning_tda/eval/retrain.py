"""Retraining harness: models trained on random subsets, the ground truth of counterfactual metrics.

A *bank* is a directory::

    subsets.npy          [M, S] int32   kept row positions of subset j (dattri's index-list format)
    outputs_<name>.npy   [M, R, Q] float32  measurement <name> of every query by run r of subset j
    query_ids.npy        [Q] int64
    meta.json            spec, recipe, data fingerprints, measurement conventions, versions
    jobs/                one file per finished (subset, seed) run; a rerun skips them (resumable)

Subset ``j`` is drawn with ``numpy.random.default_rng(base_seed + j)``; run ``r`` of subset ``j`` trains
with seed ``base_seed + j * R + r`` (dattri's conventions, so banks can be exchanged).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_tda.progress import progress_bar

ModelFactory = Callable[[], Any]
"""``factory() -> LightningModule``, a picklable top-level callable."""
Measure = Callable[[Any, Dataset], dict[str, np.ndarray]]
"""``measure(model, queries) -> {name: [Q] array}``, e.g. margins and losses."""


@dataclass(frozen=True)
class BankSpec:
    """Which subsets and how many runs.

    Attributes:
        num_subsets: ``M``.
        alpha: kept fraction of the training set.
        num_seeds: ``R`` runs per subset (ground truth = their mean; two or more give a ceiling).
        base_seed: seeds subsets and runs.
        shared_seeds: ``False`` (dattri's convention): run ``r`` of subset ``j`` trains with seed
            ``base_seed + j * R + r``. ``True`` (the fixed-seed convention for LM pre-training, where
            initialisation and data-order noise swamp a half subset's effect): run ``r`` of *every*
            subset trains with seed ``base_seed + r`` (the same initialisation) and visits its examples
            in the order of one permutation of the full training set, :func:`shared_order`.
        in_place: with ``shared_seeds``, every run visits the *full* permutation in the same batches
            and a removed example only gets loss weight 0 where it stands (the single-model protocol of
            metagradient LDS): the model must define ``set_kept(mask: Tensor[N])`` and weight its
            training loss by ``mask[example id position]``.
    """

    num_subsets: int = 64
    alpha: float = 0.5
    num_seeds: int = 2
    base_seed: int = 0
    shared_seeds: bool = False
    in_place: bool = False

    def __post_init__(self) -> None:
        if self.num_subsets < 2 or self.num_seeds < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"invalid bank spec {self}")
        if self.in_place and not self.shared_seeds:
            raise ValueError("in_place=True needs shared_seeds=True (one data order per seed)")

    def to_meta(self) -> dict:
        """JSON-ready dict; ``shared_seeds``/``in_place`` are left out when unset, as in older banks."""
        d = asdict(self)
        for k in ("shared_seeds", "in_place"):
            if not d[k]:
                del d[k]
        return d

    def run_seed(self, subset: int, run: int) -> int:
        """The seed of run ``run`` of subset ``subset``."""
        if self.shared_seeds:
            return self.base_seed + run
        return self.base_seed + subset * self.num_seeds + run


@dataclass(frozen=True)
class RetrainRecipe:
    """How each subset model is trained (the same recipe as the attributed run).

    Attributes:
        max_epochs: epochs per run (with ``stages``: their total epochs).
        batch_size: training batch size (shuffled with the run's seed).
        trainer_kwargs: extra ``lightning.pytorch.Trainer`` arguments.
        stages: optional multi-stage curriculum ``((num_epochs, member_example_ids | None), ...)``
            in training order (member ids are example ids of the training set, ``None`` = every
            example). A run on subset ``S`` trains stage ``k`` on ``S ∩ members_k`` for its epochs,
            all in one ``Trainer.fit`` (:class:`~lightning_tda.data.StagedDataModule`). Build one with
            :meth:`staged` to get ``max_epochs`` right.

    Raises:
        ValueError: invalid stages, or ``max_epochs`` different from the stages' total.
    """

    max_epochs: int = 10
    batch_size: int = 64
    trainer_kwargs: dict = field(default_factory=dict)
    stages: tuple[tuple[int, tuple[int, ...] | None], ...] | None = None

    def __post_init__(self) -> None:
        if self.stages is None:
            return
        from lightning_tda.data.staged import normalize_stages

        stages = normalize_stages(self.stages)
        object.__setattr__(self, "stages", stages)
        total = sum(e for e, _ in stages)
        if self.max_epochs != total:
            raise ValueError(
                f"max_epochs={self.max_epochs} but the stages train {total} epochs; "
                "use RetrainRecipe.staged(stages, ...) or max_epochs=sum of stage epochs"
            )

    @classmethod
    def staged(
        cls, stages, batch_size: int = 64, trainer_kwargs: dict | None = None
    ) -> RetrainRecipe:
        """A multi-stage recipe, ``max_epochs`` = the stages' total epochs."""
        from lightning_tda.data.staged import normalize_stages

        stages = normalize_stages(stages)
        return cls(
            max_epochs=sum(e for e, _ in stages),
            batch_size=batch_size,
            trainer_kwargs=dict(trainer_kwargs or {}),
            stages=stages,
        )

    def to_meta(self) -> dict:
        """JSON-ready dict (ids as lists); ``stages`` is left out when unset, as in older banks."""
        d = asdict(self)
        if d["stages"] is None:
            del d["stages"]
        return json.loads(json.dumps(d))


def draw_subsets(num_train: int, spec: BankSpec) -> np.ndarray:
    """``[M, S]`` sorted kept indices, subset ``j`` from ``default_rng(base_seed + j)``."""
    size = int(round(spec.alpha * num_train))
    return np.stack(
        [
            np.sort(
                np.random.default_rng(spec.base_seed + j).choice(
                    num_train, size=size, replace=False
                )
            )
            for j in range(spec.num_subsets)
        ]
    ).astype(np.int32)


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 over the items' values (tensors by dtype, shape and bytes): which data a bank was built on."""
    h = hashlib.sha256()
    for i in range(len(ds)):
        _hash_item(h, ds[i])
    return h.hexdigest()


def _hash_item(h: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(item, np.ndarray):
        h.update(f"{item.dtype}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, dict):
        for k in sorted(item, key=str):
            h.update(repr(k).encode())
            _hash_item(h, item[k])
    elif isinstance(item, (tuple, list)):
        h.update(f"{type(item).__name__}{len(item)}".encode())
        for x in item:
            _hash_item(h, x)
    else:
        h.update(pickle.dumps(item, protocol=4))


def shared_order(indices: np.ndarray, num_train: int, seed: int) -> np.ndarray:
    """``indices`` in the order of ``default_rng(seed).permutation(num_train)`` (a shared-seed run)."""
    keep = np.zeros(num_train, dtype=bool)
    keep[np.asarray(indices)] = True
    perm = np.random.default_rng(seed).permutation(num_train)
    return perm[keep[perm]]


def train_on_subset(
    factory: ModelFactory,
    train: Dataset,
    indices: np.ndarray,
    seed: int,
    recipe: RetrainRecipe,
    shuffle: bool = True,
    kept: np.ndarray | None = None,
) -> Any:
    """Train ``factory()`` on ``train[indices]`` with ``seed``; returns the trained model (eval mode).

    ``shuffle=False`` visits ``indices`` in the given order every epoch (shared-seed banks). ``kept``
    (``[N]`` 0/1 by dataset position): train on every row of ``indices`` in order but weight each
    example's loss by ``kept`` (in-place banks; the model must define ``set_kept``).

    With ``recipe.stages`` the run follows the curriculum restricted to ``indices``: stage ``k``
    trains on the rows of ``indices`` whose example ids are members of stage ``k``.
    """
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    model = factory()
    if kept is not None:
        if not hasattr(model, "set_kept"):
            raise ValueError(
                f"an in-place bank needs a model with set_kept(mask); {type(model).__name__} has none"
            )
        model.set_kept(torch.as_tensor(kept, dtype=torch.float32))
    if recipe.stages is not None:
        from lightning_tda.data.staged import StagedDataModule

        data = dict(
            datamodule=StagedDataModule(
                train, recipe.stages, batch_size=recipe.batch_size, seed=seed, indices=indices
            )
        )
    else:
        data = dict(
            train_dataloaders=DataLoader(
                Subset(train, [int(i) for i in indices]),
                batch_size=recipe.batch_size,
                shuffle=shuffle,
                generator=torch.Generator().manual_seed(seed) if shuffle else None,
            )
        )
    kwargs = dict(
        max_epochs=recipe.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    if recipe.stages is not None:
        kwargs["reload_dataloaders_every_n_epochs"] = 1
    kwargs.update(recipe.trainer_kwargs)
    pl.Trainer(**kwargs).fit(model, **data)
    model.eval()
    return model


def _init_worker() -> None:
    torch.set_num_threads(1)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _run_job(args: tuple) -> tuple[str, float]:
    factory, train, queries, measure, indices, seed, recipe, out_file, shuffle, kept = args
    t0 = time.perf_counter()
    model = train_on_subset(factory, train, indices, seed, recipe, shuffle, kept)
    with torch.no_grad():
        values = {k: np.asarray(v, dtype=np.float32) for k, v in measure(model, queries).items()}
    tmp = f"{out_file}.tmp.npz"
    np.savez(tmp, **values)
    os.replace(tmp, out_file)  # a job file is either absent or complete
    return out_file, time.perf_counter() - t0


def run_jobs(
    jobs: list[tuple],
    factory: ModelFactory,
    train: Dataset,
    queries: Dataset,
    measure: Measure,
    recipe: RetrainRecipe,
    processes: int = 2,
    progress: Callable[[int, int], None] | None = None,
    description: str = "retraining",
) -> None:
    """Train and measure each ``(indices, seed, out_file[, shuffle[, kept]])`` whose file does not exist
    yet (``shuffle`` defaults to ``True``, ``kept`` to ``None``; see :func:`train_on_subset`).

    A progress bar labelled ``description`` counts the runs (finished ones count as done).
    """
    todo = [
        (
            factory,
            train,
            queries,
            measure,
            *job[:2],
            recipe,
            str(job[2]),
            *(*job[3:], True, None)[:2],
        )
        for job in jobs
        if not Path(job[2]).exists()
    ]
    done = len(jobs) - len(todo)
    if not todo:
        return
    with progress_bar(description, len(jobs), unit="runs", initial=done) as bar:
        if processes <= 1:
            _init_worker()
            for job in todo:
                _run_job(job)
                done += 1
                bar.advance()
                if progress:
                    progress(done, len(jobs))
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=processes, mp_context=ctx, initializer=_init_worker
        ) as pool:
            for _ in pool.map(_run_job, todo):
                done += 1
                bar.advance()
                if progress:
                    progress(done, len(jobs))


@dataclass
class Bank:
    """A loaded bank: subsets ``[M, S]``, outputs ``{name: [M, R, Q]}``, query ids, metadata."""

    subsets: np.ndarray
    outputs: dict[str, np.ndarray]
    query_ids: np.ndarray
    meta: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bank:
        p = Path(path)
        if not (p / "meta.json").exists():
            raise FileNotFoundError(
                f"{p} holds no bank (meta.json missing); build it with build_bank(...)"
            )
        meta = json.loads((p / "meta.json").read_text())
        outputs = {n: np.load(p / f"outputs_{n}.npy") for n in meta["measurements"]}
        return cls(np.load(p / "subsets.npy"), outputs, np.load(p / "query_ids.npy"), meta)

    def measurement(self, name: str) -> str:
        """``"goodness"`` or ``"loss"``: how ``outputs[name]`` relates to the score sign."""
        return self.meta["measurements"][name]


def _job_order(
    subset: np.ndarray, num_train: int, seed: int, spec: BankSpec
) -> tuple[np.ndarray, bool, np.ndarray | None]:
    """``(indices, shuffle, kept)`` of one run: the subset shuffled per run (default), the subset in the
    seed's shared permutation, or (in place) the whole permutation with the subset's 0/1 loss weights."""
    if not spec.shared_seeds:
        return subset, True, None
    if not spec.in_place:
        return shared_order(subset, num_train, seed), False, None
    kept = np.zeros(num_train, dtype=np.float32)
    kept[np.asarray(subset)] = 1.0
    return shared_order(np.arange(num_train), num_train, seed), False, kept


def build_bank(
    path: str | os.PathLike,
    factory: ModelFactory,
    train: Dataset,
    queries: Dataset,
    measure: Measure,
    measurements: dict[str, str],
    spec: BankSpec = BankSpec(),
    recipe: RetrainRecipe | None = None,
    processes: int = 2,
    query_ids: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Bank:
    """Train ``M x R`` subset models (resumable) and write the bank.

    Args:
        path: bank directory (created; existing finished jobs are reused if the spec and data match).
        factory: picklable ``() -> LightningModule``.
        train: the full training set (subsets index its rows).
        queries: the evaluation queries.
        measure: picklable ``(model, queries) -> {name: [Q]}``.
        measurements: ``{name: "goodness" | "loss"}`` for each measured quantity.
        spec: subsets and seeds.
        recipe: training recipe of each run.
        processes: worker processes (one thread each).
        query_ids: ids to record for the queries (default ``0..Q-1``).
        progress: ``progress(done, total)`` callback.
    """
    recipe = recipe or RetrainRecipe()
    p = Path(path)
    (p / "jobs").mkdir(parents=True, exist_ok=True)
    fingerprint = {"train": dataset_fingerprint(train), "queries": dataset_fingerprint(queries)}
    meta = {
        "spec": spec.to_meta(),
        "recipe": recipe.to_meta(),
        "fingerprint": fingerprint,
        "measurements": measurements,
        "num_train": len(train),
        "num_queries": len(queries),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    old = p / "meta.json"
    if old.exists():
        prev = json.loads(old.read_text())
        if any(prev.get(k) != meta[k] for k in ("spec", "recipe", "fingerprint", "measurements")):
            raise ValueError(
                f"{p} holds a bank of other data or settings; use another directory or delete it"
            )
    (p / "meta.json").write_text(
        json.dumps(meta, indent=2, sort_keys=True)
    )  # jobs/ belong to this meta
    subsets = draw_subsets(len(train), spec)
    r_total = spec.num_seeds
    jobs = []
    for j in range(spec.num_subsets):
        for r in range(r_total):
            seed = spec.run_seed(j, r)
            out = p / "jobs" / f"{j:04d}_{r:02d}.npz"
            idx, shuffle, kept = _job_order(subsets[j], len(train), seed, spec)
            jobs.append((idx, seed, out, shuffle, kept))
    t0 = time.perf_counter()
    run_jobs(
        jobs,
        factory,
        train,
        queries,
        measure,
        recipe,
        processes,
        progress,
        f"retraining bank: {spec.num_subsets} subsets x {r_total} seeds",
    )
    outputs = {
        n: np.zeros((spec.num_subsets, r_total, len(queries)), dtype=np.float32)
        for n in measurements
    }
    for j in range(spec.num_subsets):
        for r in range(r_total):
            with np.load(p / "jobs" / f"{j:04d}_{r:02d}.npz") as f:
                for n in measurements:
                    outputs[n][j, r] = f[n]
    np.save(p / "subsets.npy", subsets)
    for n, arr in outputs.items():
        np.save(p / f"outputs_{n}.npy", arr)
    np.save(
        p / "query_ids.npy", np.arange(len(queries)) if query_ids is None else np.asarray(query_ids)
    )
    meta["build_seconds_last_run"] = time.perf_counter() - t0
    (p / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Bank.load(p)
