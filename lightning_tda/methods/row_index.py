"""Approximate top-k over huge stores: a FAISS inner-product index built from the HDF5 rows.

A method's score is a sum of terms ``Σ_t <u_t[q], x_t[i]>`` (:mod:`lightning_tda.methods.scoring`).
Concatenating each row's terms, ``r_i = [x_1[i], …, x_T[i]]`` (unit-normalised and scaled by the
term's row weight where the method says so), and each query's, ``v_q = [u_1[q], …, u_T[q]]``, turns
the score into one inner product ``<v_q, r_i>``, which FAISS searches approximately (an IVF index:
only the ``nprobe`` inverted lists nearest the query are scanned).

Maximum inner product is searched as a nearest-neighbour problem (Bachrach et al. 2014): each row
gets one more coordinate, ``r'_i = [r_i, √(M² − |r_i|²)]`` with ``M = max |r_i|``, and a query
``v' = [v, 0]``, so ``|v' − r'_i|² = |v|² + M² − 2<v, r_i>``: the L2-nearest rows are the top
scores. k-means lists then follow the score's geometry; searching inner products directly lets
large-norm rows (the top scores) straddle lists, which costs recall (BENCHMARKS.md "Scale").
Candidates are re-scored exactly from the index's stored vectors; opponents are the top rows of
``−v``.

Preconditioned methods (influence: ``u = (F + λ)^{-1} g_q``) can index the whitened rows
``(F + λ)^{-1/2} x`` and search ``(F + λ)^{1/2} u`` instead (``whiten=True``): the same inner
product, with the lists drawn in the geometry the score uses. It is off by default: whitening makes
the rows nearly isotropic, and on a real store's rows it lowered recall (BENCHMARKS.md "Scale").

FAISS is optional: ``pip install faiss-cpu`` (or ``faiss-gpu``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_tda.errors import ConfigError, StoreError
from lightning_tda.methods.base import AttributionMethod, RowMap
from lightning_tda.methods.influence import QueryVectors
from lightning_tda.methods.scoring import ScoreTerm, TopK, default_block_rows
from lightning_tda.store.reader import StoreReader


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "approximate top-k needs FAISS: pip install faiss-cpu (or faiss-gpu), or "
            "pip install 'lightning-tda[faiss]'"
        ) from e
    return faiss


@dataclass
class IndexConfig:
    """How the FAISS index is built and searched (saved next to the index).

    Attributes:
        factory: a ``faiss.index_factory`` string; ``None``: ``"IVF<nlist>,Flat"`` with
            ``nlist = 4·√N`` rounded to a power of two, or ``"IVF<nlist>,SQ8"`` (4× smaller, scores
            quantised) when fp32 rows would exceed ``memory_bytes``.
        nprobe: inverted lists scanned per query (more: higher recall, slower); ``None``:
            ``nlist / 32`` (about 3 % of the rows), at least 8 lists (or all of them).
        train_rows: rows sampled to train the coarse quantiser (``None``: ``40·nlist``, FAISS's
            recommended minimum of 39 per list, at most N).
        memory_bytes: the budget the default factory keeps the index within.
        whiten: index the rows whitened by the method's preconditioner, if it has one (off: the
            rows as stored, which kept more recall on a real store).
        seed: seed of the training sample.
    """

    factory: str | None = None
    nprobe: int | None = None
    train_rows: int | None = None
    memory_bytes: int = 4 * 2**30
    whiten: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nprobe", "memory_bytes", "train_rows"):
            v = getattr(self, name)
            if v is None and name != "memory_bytes":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"IndexConfig.{name} must be a positive int, got {v!r}")
        if self.factory is not None and not (isinstance(self.factory, str) and self.factory):
            raise ValueError(
                f"IndexConfig.factory must be a faiss factory string, got {self.factory!r}"
            )

    def resolved_factory(self, n: int, dim: int) -> str:
        if self.factory is not None:
            return self.factory
        nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39 or 1))
        code = "Flat" if n * dim * 4 <= self.memory_bytes else "SQ8"
        return f"IVF{nlist},{code}"


@dataclass
class RowTerm:
    """The row side of one score term: which dataset, and how its rows enter the index."""

    step: int
    dataset: str
    normalize: bool
    row_weight: torch.Tensor | None
    row_map: RowMap | None = None  # whitening of the rows
    query_map: RowMap | None = None  # its adjoint inverse on the query side

    @property
    def key(self) -> list:
        return [self.step, self.dataset, self.normalize, self.row_weight is not None]


class RowIndex:
    """A FAISS index over a store's rows for one method (:func:`build_row_index`).

    Attributes:
        index: the FAISS index (row positions in store order are its ids).
        method: the method's name and settings it was built for.
        keys: ``[step, dataset, normalised, weighted]`` per score term, in order.
        num_rows: rows indexed.
        config: the :class:`IndexConfig` (``factory`` resolved).
    """

    def __init__(self, index: Any, method: dict, keys: list, num_rows: int, config: IndexConfig):
        self.index, self.method, self.keys = index, method, keys
        self.num_rows, self.config = num_rows, config

    def save(self, path: str | Path) -> Path:
        """Write ``<path>`` (the FAISS index) and ``<path>.json`` (what it was built for)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(path))
        meta = {"method": self.method, "keys": self.keys, "num_rows": self.num_rows}
        meta["config"] = asdict(self.config)
        path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RowIndex:
        path = Path(path)
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        index = _faiss().read_index(str(path))
        ivf = _ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # (a no-op when the file kept it)
        config = IndexConfig(**meta["config"])
        return cls(index, meta["method"], meta["keys"], meta["num_rows"], config)

    def search(self, terms: list[ScoreTerm], row_terms: list[RowTerm], k: int) -> TopK:
        """Approximate top-k proponents and opponents of the queries of ``terms``, re-scored
        exactly from the index's vectors.

        Rows the probed lists cannot fill come back as row ``-1`` with score ``-inf`` (``+inf``
        for opponents); raise ``nprobe`` when that happens."""
        self.check(row_terms)
        q = torch.cat(
            [rt.query_map(t.query) if rt.query_map else t.query
             for t, rt in zip(terms, row_terms, strict=True)], dim=1,
        ).detach().float().cpu()  # fmt: skip
        qa = np.ascontiguousarray(torch.cat([q, torch.zeros(len(q), 1)], 1).numpy())
        _set_nprobe(self.index, self.config.nprobe)
        k = min(int(k), self.num_rows)
        out = []
        for sign in (1.0, -1.0):
            _, rows = self.index.search(sign * qa, k)
            out += self._rescored(q, torch.from_numpy(rows).long(), largest=sign > 0)
        return TopK(*out)

    def _rescored(self, q: torch.Tensor, rows: torch.Tensor, largest: bool):
        """``(scores, rows)`` ``[Q, k]``: the candidates' exact ``<v, r>``, sorted."""
        found = rows >= 0
        vecs = self.index.reconstruct_batch(rows.clamp_min(0).reshape(-1).numpy())
        vecs = torch.from_numpy(vecs[:, :-1]).view(*rows.shape, -1)  # [Q, k, D] (drop the extra)
        scores = torch.einsum("qd,qkd->qk", q, vecs)
        scores = scores.masked_fill(~found, -torch.inf if largest else torch.inf)
        scores, order = scores.sort(dim=1, descending=largest)
        return [scores, rows.gather(1, order)]

    def check(self, row_terms: list[RowTerm]) -> None:
        keys = [rt.key for rt in row_terms]
        if keys != self.keys:
            raise ConfigError(
                f"this index was built for {self.method['name']} over terms {self.keys}; the method "
                f"now scores {keys}: rebuild it with store.build_index(method=...) for this method"
            )


def row_terms(
    store: StoreReader,
    method: AttributionMethod,
    whiten: bool,
    terms: list[ScoreTerm] | None = None,
) -> list[RowTerm]:
    """The row side of ``method``'s score ``terms`` (default: probed with zero queries)."""
    if method.kind != "rows":
        raise ConfigError(f"{method.name} does not score stored rows; it cannot use a row index")
    if terms is None:
        steps = method.query_steps(store)
        zero = {s: torch.zeros(1, store.width) for s in steps}
        terms = method.score_terms(store, QueryVectors(zero, {s: torch.zeros(1) for s in steps}))
    if any(t.score_fn is not None for t in terms):
        raise ConfigError(
            f"{method.name}'s rows are not plain vectors (a custom score_fn); it cannot use a row "
            "index: score it exactly (index=None)"
        )
    maps = method.index_maps(store) if whiten else None
    maps = maps or [(None, None)] * len(terms)
    return [
        RowTerm(t.step, t.dataset, t.normalize_train, t.row_weight, rm, qm)
        for t, (rm, qm) in zip(terms, maps, strict=True)
    ]


def build_row_index(
    store: StoreReader, method: AttributionMethod, settings: dict, config: IndexConfig
) -> RowIndex:
    """Two passes in blocks: the rows' largest norm and a training sample for the coarse
    quantiser, then every row added (augmented: see the module docstring)."""
    faiss = _faiss()
    terms = row_terms(store, method, config.whiten)
    n, dim = store.num_examples, store.width * len(terms) + 1
    factory = config.resolved_factory(n, dim)
    index = faiss.index_factory(dim, factory)  # L2 over the augmented rows
    ivf = _ivf(index)
    nlist = 1 if ivf is None else ivf.nlist
    want = min(n, config.train_rows or 40 * nlist)
    pick = np.sort(np.random.default_rng(config.seed).choice(n, want, replace=False))
    sample, max_sq = [], 0.0
    for start, block in _rows(store, terms):
        sq = (block.astype(np.float64) ** 2).sum(1)
        max_sq = max(max_sq, float(sq.max()))
        sel = pick[(pick >= start) & (pick < start + len(block))] - start
        sample.append(block[sel])
    if not index.is_trained:
        index.train(_augmented(np.concatenate(sample), max_sq))
    del sample
    for _, block in _rows(store, terms):
        index.add(_augmented(block, max_sq))
    if index.ntotal != n:
        raise StoreError(f"the index holds {index.ntotal} rows, the store {n}")
    if ivf is not None:
        ivf.make_direct_map()  # candidates are re-scored from their stored vectors
    nprobe = config.nprobe or min(nlist, max(8, nlist // 32))
    resolved = IndexConfig(**{**asdict(config), "factory": factory, "nprobe": nprobe})
    return RowIndex(index, settings, [t.key for t in terms], n, resolved)


def _augmented(x: np.ndarray, max_sq: float) -> np.ndarray:
    """``[x, √(M² − |x|²)]``: maximum inner product as L2 nearest neighbours."""
    extra = np.sqrt(np.maximum(max_sq - (x.astype(np.float64) ** 2).sum(1), 0.0))
    return np.ascontiguousarray(np.hstack([x, extra[:, None].astype(np.float32)]))


def _rows(store: StoreReader, terms: list[RowTerm]):
    """``(start, [B, T·D] fp32 numpy)``: the concatenated rows, block by block."""
    keys = [(t.step, t.dataset) for t in terms]
    for start, stop, blocks in store.iter_blocks(keys, default_block_rows(store.width, len(terms))):
        parts = []
        for t, x in zip(terms, blocks, strict=True):
            if not isinstance(x, torch.Tensor):
                raise ConfigError(
                    f"{t.dataset} rows are in-flight batch rows, not one row per example; a row "
                    "index needs a sweep checkpoint: score in-flight stores exactly (index=None)"
                )
            parts.append(_row_part(t, x.float(), start, stop))
        yield start, np.ascontiguousarray(torch.cat(parts, dim=1).numpy())


def _row_part(t: RowTerm, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if t.normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if t.row_weight is not None:
        x = x * t.row_weight[start:stop].to(x)[:, None]
    return t.row_map(x) if t.row_map is not None else x


def _ivf(index: Any) -> Any:
    """The IVF layer of ``index``, or ``None`` (a flat index)."""
    try:
        return _faiss().extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def _set_nprobe(index: Any, nprobe: int) -> None:
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
