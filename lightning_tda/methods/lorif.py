"""LoRIF: low-rank influence functions on factored per-example gradients (methods.md §5).

Two low-rank steps (Li, Le, Xu, Salzmann, arXiv 2601.21929; the exact choices below are our
reconstruction, methods.md §5 [P]):

1. Per example: ``GradientLogger(storage="lorif", lorif_rank=c)`` stores each layer's projected
   gradient ``G̃_i,l`` (``[k_out, k_in]``) as rank-``c`` factors ``U_i V_i^T`` (``c (k_out + k_in)``
   numbers instead of ``k_out k_in``).
2. Across examples, per layer: the empirical Fisher ``F_l = (1/N) Σ_i vec(G̃_i,l) vec(G̃_i,l)^T``
   (``D_l × D_l``, ``D_l = k_out k_in``) is replaced by its top-``r`` eigenpairs ``(μ_j, v_j)`` from a
   streaming randomized subspace iteration (Halko et al.): a sketch of ``r + oversample`` columns,
   ``power_iters`` power iterations and a Rayleigh–Ritz step, each a pass over the stored rows that
   forms ``F Q = (1/N) Σ_i g_i (g_i^T Q)`` block by block (memory ``O(D_l (r + oversample))``, never the
   ``N × D`` matrix or ``D × D`` for a layer with ``D_l > r + oversample``). The inverse is the Woodbury
   form ``(F_l + λ_l I)^{-1} ≈ V_r diag(1/(μ_j + λ_l)) V_r^T + (1/λ_l)(I − V_r V_r^T)``, exact when
   ``F_l`` has rank ``<= r`` and when ``r >= D_l``.

Score (library sign: ``> 0`` = including example ``i`` lowers the query loss)::

    s(i, q) = Σ_c w_c Σ_l < (F_c,l + λ_c,l I)^{-1} g̃_q,l , g̃_i,l >

The preconditioned query ``M = (F + λI)^{-1} g̃_q`` (``[k_out, k_in]``) meets the factored train rows
as ``<M, U V^T> = Σ_j u_j^T M v_j``; self-influence uses
``g^T (F + λI)^{-1} g = ‖g‖²/λ + Σ_j (1/(μ_j + λ) − 1/λ) (v_j^T g)²`` with ``‖U V^T‖² = Σ (U^T U) ⊙ (V^T V)``.
On a dense store (``storage="dense"``) the same code runs on the dense rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lightning_tda.capture.lowrank import FactorBlock, FactorLayout
from lightning_tda.methods.base import Interval, RowMethod, lr_weights, select_checkpoints
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm, default_block_rows
from lightning_tda.store import schema
from lightning_tda.store.reader import CheckpointInfo, StoreReader

Weighting = Literal["lr", "uniform"]


@dataclass
class LoRIFBlock:
    """One layer's low-rank damped inverse Fisher.

    Attributes:
        block: where the layer sits in a stored (factor or dense) row and in a dense row.
        lam: damping ``λ_l``; ``0`` marks a layer whose stored rows are all zero (it scores nothing).
        mu: ``[r_l]`` top eigenvalues of ``F_l`` (descending, float64).
        basis: ``[D_l, r_l]`` orthonormal eigenvectors ``V_r`` (float64).
        trace: ``trace(F_l) = (1/N) Σ_i ‖g_i,l‖²`` (exact).
    """

    block: FactorBlock
    lam: float
    mu: torch.Tensor
    basis: torch.Tensor
    trace: float

    def _coef(self) -> torch.Tensor:
        return 1.0 / (self.mu.clamp_min(0) + self.lam) - 1.0 / self.lam

    def inverse(self, v: torch.Tensor) -> torch.Tensor:
        """``(F_l + λ_l I)^{-1} v`` (Woodbury) for rows ``v`` ``[Q, D_l]``; float64."""
        v = v.double()
        if self.lam == 0:
            return torch.zeros_like(v)
        basis = self.basis.to(v.device)
        c = v @ basis
        return v / self.lam + (c * self._coef().to(v.device)) @ basis.T

    def self_influence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` ``g_b^T (F_l + λ_l I)^{-1} g_b`` for stored rows ``x`` ``[B, W]``; float64."""
        x = x.double()
        if self.lam == 0:
            return x.new_zeros(x.shape[0])
        sq = self.block.sqnorm(x)
        p = self.block.dot(self.basis.T.to(x.device), x)  # [r, B]
        return sq / self.lam + (p.pow(2) * self._coef().to(x.device)[:, None]).sum(0)

    def dense_inverse(self) -> torch.Tensor:
        """``[D_l, D_l]`` matrix of :meth:`inverse` (for tests and small layers)."""
        return self.inverse(torch.eye(self.block.dense_size, dtype=torch.float64))


def fit_lorif_curvature(
    store: StoreReader,
    step: int,
    rank: int = 64,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    damping: float | None = None,
    damping_scale: float = 0.1,
    dataset: str = schema.TRAIN,
    block_rows: int | None = None,
) -> list[LoRIFBlock]:
    """Per-layer top-``rank`` eigenpairs of the empirical Fisher of the rows at ``step``, streamed.

    Works on factored rows (``train_factors``) or dense rows (``train``), whichever the checkpoint holds.
    A layer with ``D_l <= rank + oversample`` gets its exact ``F_l`` in one pass (then truncated to the
    top ``rank``); the others run ``power_iters + 2`` passes of randomized subspace iteration with a
    Gaussian sketch seeded from ``(seed, layer name)``. All accumulation is in float64.

    Args:
        store: the store.
        step: checkpoint global step.
        rank: ``r``, eigenpairs kept per layer.
        oversample: extra sketch columns.
        power_iters: power iterations (``0`` = a single range-finding pass).
        seed: sketch seed.
        damping: absolute ``λ`` for every layer; ``None`` = ``damping_scale · trace(F_l) / D_l``.
        damping_scale: see ``damping``.
        dataset: ``"train"`` (or ``"train_precond"``): resolved to its factors when stored factored.
        block_rows: rows read per block.
    """
    name, layout = store.stored_rows(step, dataset)
    if store.num_examples == 0:
        raise ValueError(f"lorif: {store.path} holds no training rows")
    blocks = layout.blocks
    rows = block_rows or default_block_rows(store.width, 3)
    qs = _initial_sketches(blocks, rank + oversample, seed)
    sketched = [j for j, q in enumerate(qs) if q is not None]
    for _ in range(power_iters + 1 if sketched else 0):
        ys, _ = _fisher_pass(store, (step, name), blocks, qs, sketched, rows)
        for j in sketched:
            qs[j] = torch.linalg.qr(ys[j]).Q
    fq, traces = _fisher_pass(store, (step, name), blocks, qs, list(range(len(blocks))), rows)
    return [
        _top_eigenpairs(b, qs[j], fq[j], float(traces[j]), rank, damping, damping_scale)
        for j, b in enumerate(blocks)
    ]


def _initial_sketches(blocks: list[FactorBlock], size: int, seed: int) -> list[torch.Tensor | None]:
    """Per layer an orthonormal ``[D_l, size]`` Gaussian sketch seeded from ``(seed, layer name)``;
    ``None`` for a layer with ``D_l <= size`` (its Fisher is formed exactly)."""
    qs: list[torch.Tensor | None] = []
    for b in blocks:
        d = b.dense_size
        if size >= d:
            qs.append(None)
            continue
        g = torch.Generator().manual_seed(_seed(seed, b.name))
        qs.append(torch.linalg.qr(torch.randn(d, size, generator=g, dtype=torch.float64)).Q)
    return qs


def _fisher_pass(
    store: StoreReader,
    source: tuple[int, str],
    blocks: list[FactorBlock],
    qs: list[torch.Tensor | None],
    active: list[int],
    block_rows: int,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One pass over the rows of ``source`` (``(step, dataset)``): ``{layer: F Q}`` for the
    ``active`` layers (``F`` itself where ``qs[layer]`` is ``None``) and ``[L]`` traces of ``F``."""
    n = store.num_examples
    acc: dict[int, torch.Tensor | None] = {j: None for j in active}
    tr = torch.zeros(len(blocks), dtype=torch.float64)
    for _, _, (x,) in store.iter_blocks([source], block_rows):
        x = x.double()
        for j in active:
            b = blocks[j]
            g = b.dense(x)  # [B, D_l], this block's rows only
            t = g.T @ g if qs[j] is None else g.T @ (g @ qs[j])
            acc[j] = t if acc[j] is None else acc[j] + t
            tr[j] += b.sqnorm(x).sum()
    return {j: a / n for j, a in acc.items()}, tr / n


def _top_eigenpairs(
    b: FactorBlock,
    q: torch.Tensor | None,
    fq: torch.Tensor,
    trace: float,
    rank: int,
    damping: float | None,
    damping_scale: float,
) -> LoRIFBlock:
    """Rayleigh–Ritz on ``q^T F q`` (``F`` itself when ``q`` is ``None``), the top ``rank`` pairs
    kept, with the layer's damping."""
    small = fq if q is None else q.T @ fq
    mu, vecs = torch.linalg.eigh((small + small.T) / 2)
    r = min(rank, mu.shape[0])
    mu, vecs = mu.flip(0)[:r].clamp_min(0), vecs.flip(1)[:, :r]
    basis = vecs if q is None else q @ vecs
    if damping is not None:
        lam = float(damping)
    else:
        lam = damping_scale * trace / b.dense_size if trace > 0 else 0.0
    return LoRIFBlock(b, lam, mu, basis, trace)


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"lorif:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class LoRIF(RowMethod):
    """LoRIF influence (methods.md §5): low-rank Woodbury inverse Fisher on (factored) stored rows.

    Runs on ``GradientLogger(storage="lorif")`` stores without expanding the stored factors to the
    ``[N, D]`` matrix (rows are read block by block), and on dense stores. With ``rank >= D_l`` for every
    layer it equals ``influence(mode="raw")`` (same default damping).

    Args:
        checkpoints: global steps to use; ``None`` = the last checkpoint. Several checkpoints give
            the weighted average ``Σ_c w_c s_c`` of per-checkpoint scores (each with its own Fisher):
            with ``weighting="lr"`` ``w_c ∝`` the checkpoint's learning-rate sum over its ``interval``
            (per parameter group, as TracIn-CP weighs checkpoints), normalised to sum to 1 over the
            selected checkpoints; with ``"uniform"`` ``w_c = 1/C``. A single checkpoint has ``w = 1``.
        rank: ``r``, eigenpairs of each layer's Fisher kept.
        damping: absolute ``λ`` for every layer; ``None`` = ``damping_scale × trace(F_l)/D_l`` (0.1 ×
            the mean eigenvalue, LoGra's default), computed exactly from the training rows.
        damping_scale: see ``damping``.
        oversample: extra columns of the randomized sketch.
        power_iters: power iterations of the randomized eigensolver (each one more pass over the rows).
        seed: seed of the sketch.
        weighting: ``"lr"`` or ``"uniform"`` (see ``checkpoints``).
        interval: learning-rate interval for ``weighting="lr"``: ``"previous"`` or ``"next"``.
    """

    checkpoints: Sequence[int] | None = None
    rank: int = 64
    damping: float | None = None
    damping_scale: float = 0.1
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    weighting: Weighting = "lr"
    interval: Interval = "previous"
    name: ClassVar[str] = "lorif"

    def __post_init__(self) -> None:
        for field, low in (("rank", 1), ("oversample", 0), ("power_iters", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"lorif: {field} must be an int >= {low}, got {v!r}")
        if self.damping is not None and not self.damping > 0:
            raise ValueError(
                f"lorif: damping must be > 0 (or None for the default), got {self.damping!r}"
            )
        if not self.damping_scale > 0:
            raise ValueError(f"lorif: damping_scale must be > 0, got {self.damping_scale!r}")
        if self.weighting not in ("lr", "uniform"):
            raise ValueError(f"lorif: weighting must be 'lr' or 'uniform', got {self.weighting!r}")
        if self.interval not in ("previous", "next"):
            raise ValueError(f"lorif: interval must be 'previous' or 'next', got {self.interval!r}")
        if self.checkpoints is not None:
            self.checkpoints = [int(s) for s in self.checkpoints]

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        if self.checkpoints is None:
            return [store.checkpoint(None)]
        return select_checkpoints(store, self.checkpoints)

    def curvature(self, store: StoreReader, step: int) -> list[LoRIFBlock]:
        """The per-layer low-rank damped inverse Fisher at ``step``."""
        return fit_lorif_curvature(
            store,
            step,
            self.rank,
            self.oversample,
            self.power_iters,
            self.seed,
            self.damping,
            self.damping_scale,
        )

    def _weights(self, store: StoreReader, cks: list[CheckpointInfo]) -> list[list[float]]:
        """``w[c][l]``: weight of checkpoint ``c`` for layer ``l`` (layers in ``store.layers`` order)."""
        nl = len(store.layers)
        if len(cks) == 1:
            return [[1.0] * nl]
        if self.weighting == "uniform":
            return [[1.0 / len(cks)] * nl for _ in cks]
        raw = []
        for ck in cks:
            cols = lr_weights(store, ck, self.interval)
            raw.append([float(cols[s.offset]) for s in store.layers])
        totals = [sum(r[j] for r in raw) for j in range(nl)]
        bad = [s.name for s, t in zip(store.layers, totals, strict=True) if not t > 0]
        if bad:
            raise ValueError(
                f"lorif: the selected checkpoints {[c.global_step for c in cks]} have a zero learning-rate sum "
                f"for layers {bad[:4]}; use interval='next', other checkpoints, or weighting='uniform'"
            )
        return [[r[j] / totals[j] for j in range(nl)] for r in raw]

    def _fits(self, store: StoreReader):
        cks = self.used_checkpoints(store)
        weights = self._weights(store, cks)
        out = []
        for ck, w in zip(cks, weights, strict=True):
            name, layout = store.stored_rows(ck.global_step)
            out.append((ck.global_step, name, layout, self.curvature(store, ck.global_step), w))
        return out

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        terms = []
        for step, name, layout, fit, w in self._fits(store):
            v = queries[step]
            if v.dim() != 2 or v.shape[1] != store.width:
                raise ValueError(
                    f"lorif: query vectors for step {step} have shape {tuple(v.shape)}, expected "
                    f"[Q, {store.width}]"
                )
            u = torch.zeros_like(v, dtype=torch.float32)
            for blk, wl in zip(fit, w, strict=True):
                cols = blk.block.dense_cols
                u[:, cols] = (wl * blk.inverse(v[:, cols])).float()
            if layout.is_identity:
                terms.append(ScoreTerm(step, name, u))
            else:
                terms.append(ScoreTerm(step, name, u, score_fn=_factored_scores(layout)))
        return terms

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        terms = []
        for step, name, _, fit, w in self._fits(store):

            def pair(a: torch.Tensor, b: torch.Tensor, fit=fit, w=w) -> torch.Tensor:
                return sum(wl * blk.self_influence(a) for blk, wl in zip(fit, w, strict=True))

            terms.append(SelfTerm(step, name, name, torch.ones(store.width), pair_fn=pair))
        return terms


def _factored_scores(layout: FactorLayout):
    def score(query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layout.dot(query, x)

    return score


__all__ = ["LoRIF", "LoRIFBlock", "fit_lorif_curvature"]
