"""Approximate top-k over huge stores: a FAISS inner-product index built from the HDF5 rows.

A method's score is a sum of terms ``Σ_t <u_t[q], x_t[i]>`` (:mod:`lightning_tda.methods.scoring`).
Concatenating each row's terms, ``r_i = [x_1[i], …, x_T[i]]`` (unit-normalised and scaled by the
term's row weight where the method says so), and each query's, ``v_q = [u_1[q], …, u_T[q]]``, turns
the score into one inner product ``<v_q, r_i>``, which FAISS searches approximately: an IVF index
scans only the ``nprobe`` inverted lists nearest the query.

Maximum inner product is searched as a nearest-neighbour problem (Bachrach et al. 2014): each row
gets one more coordinate, ``r'_i = [r_i, √(M² − |r_i|²)]`` with ``M = max |r_i|``, and a query
``v' = [v, 0]``, so ``|v' − r'_i|² = |v|² + M² − 2<v, r_i>``: the L2-nearest rows are the top
scores. k-means lists then follow the score's geometry; searching inner products directly lets
large-norm rows (the top scores) straddle lists, which costs recall (BENCHMARKS.md "Scale").

By default the lists hold 4-bit fast-scan product codes (``PQ<m>x4fs``: SIMD-scanned, several
times faster per row than fp32 vectors, so more lists fit the same time) and a refining index keeps
the exact rows (``RFlat``): the ``refine · k`` best codes are re-ranked with the exact rows, which
recovers the codes' error. Returned candidates are re-scored exactly from the index's stored
vectors; opponents are the top rows of ``−v``.

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
        factory: a ``faiss.index_factory`` string; ``None``: ``"IVF<nlist>,PQ<m>x4fs,RFlat"``, an
            inverted file over 4-bit fast-scan product codes (``m = dim / 4``, the augmented rows
            zero-padded to a multiple of 8) whose candidates are re-ranked with the exact rows,
            ``nlist = 4·√N`` rounded to a power of two; ``Refine(SQ8)`` instead of ``RFlat`` (4×
            smaller, re-ranking scores quantised) when fp32 rows would exceed ``memory_bytes``.
        nprobe: inverted lists scanned per query (more: higher recall, slower); ``None``:
            ``nlist / 16`` (about 6 % of the rows), at least 8 lists (or all of them).
        refine: candidates re-ranked exactly per row returned (FAISS's ``k_factor``) when the
            index re-ranks (``RFlat``/``Refine``); ``None``: 150.
        train_rows: rows sampled to train the coarse quantiser and the codes (``None``:
            ``40·nlist``, FAISS's recommended minimum of 39 per list, at least 4096, at most N).
        memory_bytes: the budget the default factory keeps the index within.
        whiten: index the rows whitened by the method's preconditioner, if it has one (off: the
            rows as stored, which kept more recall on a real store).
        seed: seed of the training sample.
    """

    factory: str | None = None
    nprobe: int | None = None
    refine: int | None = None
    train_rows: int | None = None
    memory_bytes: int = 4 * 2**30
    whiten: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nprobe", "refine", "memory_bytes", "train_rows"):
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
        """The factory string for ``n`` augmented rows of width ``dim`` (see :func:`padded_dim`)."""
        if self.factory is not None:
            return self.factory
        nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39 or 1))
        refine = "RFlat" if n * dim * 4 <= self.memory_bytes else "Refine(SQ8)"
        return f"IVF{nlist},PQ{padded_dim(dim, None) // 4}x4fs,{refine}"


def padded_dim(dim: int, factory: str | None) -> int:
    """The index width for augmented rows of width ``dim``: a multiple of 8 for the default
    factory's 4-dimensional fast-scan sub-quantisers, ``dim`` for a given factory."""
    return dim if factory is not None else -(-dim // 8) * 8


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
        _direct_map(index)
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
        qa = np.zeros((len(q), self.index.d), dtype=np.float32)
        qa[:, : q.shape[1]] = q.numpy()  # [v, 0, 0…]
        _set_nprobe(self.index, self.config.nprobe)
        refined = _refined(self.index)
        if refined is not None:
            refined.k_factor = float(self.config.refine or DEFAULT_REFINE)
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
        vecs = torch.from_numpy(vecs[:, : q.shape[1]]).view(*rows.shape, -1)  # [Q, k, D]
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
    n = store.num_examples
    dim = padded_dim(store.width * len(terms) + 1, config.factory)
    factory = config.resolved_factory(n, dim)
    index = faiss.index_factory(dim, factory)  # L2 over the augmented rows
    ivf = _ivf(index)
    nlist = 1 if ivf is None else ivf.nlist
    want = min(n, config.train_rows or max(40 * nlist, 4096))
    pick = np.sort(np.random.default_rng(config.seed).choice(n, want, replace=False))
    sample, max_sq = [], 0.0
    for start, block in _rows(store, terms):
        sq = (block.astype(np.float64) ** 2).sum(1)
        max_sq = max(max_sq, float(sq.max()))
        sel = pick[(pick >= start) & (pick < start + len(block))] - start
        sample.append(block[sel])
    if not index.is_trained:
        index.train(_augmented(np.concatenate(sample), max_sq, dim))
    del sample
    for _, block in _rows(store, terms):
        index.add(_augmented(block, max_sq, dim))
    if index.ntotal != n:
        raise StoreError(f"the index holds {index.ntotal} rows, the store {n}")
    _direct_map(index)  # candidates are re-scored from their stored vectors
    nprobe = config.nprobe or min(nlist, max(8, nlist // 16))
    refine = (config.refine or DEFAULT_REFINE) if _refined(index) is not None else config.refine
    resolved = IndexConfig(
        **{**asdict(config), "factory": factory, "nprobe": nprobe, "refine": refine}
    )
    return RowIndex(index, settings, [t.key for t in terms], n, resolved)


DEFAULT_REFINE = 150
"""Candidates re-ranked exactly per returned row by a refining index (``IndexConfig.refine``)."""


def _augmented(x: np.ndarray, max_sq: float, dim: int) -> np.ndarray:
    """``[x, √(M² − |x|²), 0…]`` ``[B, dim]``: maximum inner product as L2 nearest neighbours
    (zeros pad to the index width; they change no distance)."""
    out = np.zeros((len(x), dim), dtype=np.float32)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1]] = np.sqrt(np.maximum(max_sq - (x.astype(np.float64) ** 2).sum(1), 0.0))
    return out


def _direct_map(index: Any) -> None:
    """Let an IVF index reconstruct rows by id (a refining index reconstructs from its own)."""
    if _refined(index) is None:
        ivf = _ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # (a no-op when the index has one)


def _refined(index: Any) -> Any:
    """``index`` as a FAISS ``IndexRefine`` (exact re-ranking), or ``None``."""
    index = _faiss().downcast_index(index)
    return index if hasattr(index, "k_factor") and hasattr(index, "refine_index") else None


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
