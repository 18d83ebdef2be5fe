"""Curvature-aware influence in the projected space: LoGra-style ``raw``, ``ekfac`` and ``trak``.

``s(i, q) = Σ_l g̃_q,l^T (F_l + λ_l I)^{-1} g̃_i,l`` per checkpoint (block-diagonal over layers,
methods.md §4.2, §6), averaged over the selected checkpoints (an ensemble over checkpoints,
methods.md §10). Positive = including example ``i`` lowers the query loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lightning_tda.methods.base import RowMap, RowMethod, select_checkpoints
from lightning_tda.methods.curvature import (
    DEFAULT_DAMPING_SCALE,
    apply_blocks,
    damped_inverse,
    default_damping,
    fit_curvature,
)
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store import schema
from lightning_tda.store.members import member_dataset, member_loss_dataset
from lightning_tda.store.reader import CheckpointInfo, StoreReader

InfluenceMode = Literal["raw", "ekfac", "trak"]


class QueryVectors(dict):
    """``{step: [Q, D]}`` query vectors plus, when known, ``losses``: ``{step: [Q]}`` query losses."""

    def __init__(self, vectors: dict, losses: dict | None = None) -> None:
        super().__init__(vectors)
        self.losses = losses


@dataclass
class Influence(RowMethod):
    """Damped block-diagonal influence function on the stored projected gradients.

    Modes:
        ``"raw"``: ``F_l`` is the exact empirical Fisher of the layer's stored projected gradients
        (``k × k`` per layer, eigendecomposed in float64).
        ``"ekfac"``: ``F_l`` in the eigenbasis of the projected K-FAC factors logged during the sweep
        (``GradientLogger(curvature=True)``), eigenvalues corrected from the stored rows.
        ``"trak"``: TRAK (methods.md §3) for classifiers trained with cross-entropy: features are
        margin gradients ``φ_i = -g_i / (1 - p_i)`` (recovered from the stored loss gradients and the
        stored loss ``-log p_i``), kernel ``Σ_i φ_i φ_i^T`` per layer, the out-to-loss reweighting
        ``1 - p_i`` averaged over checkpoints, scores averaged over checkpoints as an ensemble.
        Store rows in ``float32`` for this mode: ``g_i`` of well-fit examples underflow float16.

    Args:
        mode: ``"raw"``, ``"ekfac"`` or ``"trak"``.
        checkpoints: global steps to average over; ``None`` = the last checkpoint (``"raw"``,
            ``"ekfac"``) or every checkpoint (``"trak"``).
        damping: absolute ``λ`` for every layer; ``None`` = from ``damping_scale`` and each layer's
            curvature, derived from the training rows only.
        damping_scale: ``λ_l = damping_scale × mean eigenvalue`` of each layer's curvature; ``None``
            (default) = ``1.0`` for ``"raw"``/``"trak"`` and ``0.1`` for ``"ekfac"``
            (:data:`~lightning_tda.methods.curvature.DEFAULT_DAMPING_SCALE`, chosen on the benchmark banks).
        dropout_members: average over this many dropout sub-networks per checkpoint (Efficient
            Ensembles, methods.md §10), added beforehand with
            :meth:`~lightning_tda.AttributionStore.add_dropout_ensemble`; ``0`` uses the logged rows.
    """

    mode: InfluenceMode = "raw"
    checkpoints: Sequence[int] | None = None
    damping: float | None = None
    damping_scale: float | None = None
    dropout_members: int = 0
    name: ClassVar[str] = "influence"

    def __post_init__(self) -> None:
        if self.mode not in ("raw", "ekfac", "trak"):
            raise ValueError(f"mode must be 'raw', 'ekfac' or 'trak', got {self.mode!r}")
        if self.checkpoints is not None:
            self.checkpoints = [int(s) for s in self.checkpoints]
        if self.damping is not None and not self.damping > 0:
            raise ValueError(f"damping must be > 0 (or None for the default), got {self.damping!r}")
        if self.damping_scale is None:
            self.damping_scale = DEFAULT_DAMPING_SCALE[self.mode]
        if (
            isinstance(self.damping_scale, bool)
            or not isinstance(self.damping_scale, (int, float))
            or not self.damping_scale > 0
        ):
            raise ValueError(f"damping_scale must be > 0, got {self.damping_scale!r}")
        if not isinstance(self.dropout_members, int) or self.dropout_members < 0:
            raise ValueError(f"dropout_members must be an int >= 0, got {self.dropout_members!r}")

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        if self.checkpoints is None and self.mode != "trak":
            return [store.checkpoint(None)]
        return select_checkpoints(store, self.checkpoints)

    def _members(self, store: StoreReader) -> list[tuple[int, str, str, int | tuple[int, int]]]:
        """Ensemble members: ``(step, rows dataset, loss dataset, query key)``."""
        out = []
        for ck in self.used_checkpoints(store):
            step = ck.global_step
            if not self.dropout_members:
                out.append((step, schema.TRAIN, schema.TRAIN_LOSS, step))
                continue
            for r in range(self.dropout_members):
                if member_dataset(r) not in ck.datasets:
                    raise ValueError(
                        f"checkpoint {step} has no dropout member {r}; add it with "
                        f"store.add_dropout_ensemble(model, data, members={self.dropout_members})"
                    )
                out.append((step, member_dataset(r), member_loss_dataset(r), (step, r)))
        return out

    def query_steps(self, store: StoreReader) -> list:
        return [m[3] for m in self._members(store)]

    def _curvatures(self, store: StoreReader):
        """Per member: (step, dataset, query key, curvature, damping per block, TRAK 1/(1-p) or None)."""
        out = []
        for step, dataset, loss_name, key in self._members(store):
            inv_q = None
            weights = None
            if self.mode == "trak":
                inv_q = 1.0 / _one_minus_p(store.read(step, loss_name).double(), step)
                weights = {step: inv_q**2}
            mode = "ekfac" if self.mode == "ekfac" else "raw"
            curv = fit_curvature(store, [step], mode, dataset, row_weights=weights)
            if self.mode == "trak":  # TRAK's kernel is Φ^T Φ (a sum, not a mean)
                total = float(weights[step].sum())
                for b in curv:
                    b.sigma = b.sigma * total
            lam = default_damping(curv, self.damping, self.damping_scale)
            out.append((step, dataset, key, curv, lam, inv_q))
        return out

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        fits = self._curvatures(store)
        m = len(fits)
        qbar = _trak_q_bar(fits) if self.mode == "trak" else None
        terms = []
        for step, dataset, key, curv, lam, inv_q in fits:
            v = queries[key]
            if self.mode == "trak":
                losses = getattr(queries, "losses", None)
                if losses is None or key not in losses:
                    raise ValueError(
                        "influence(mode='trak') needs the query losses (for the margin gradient); pass the "
                        "queries as data or 'logged', not as precomputed vectors"
                    )
                inv_pq = 1.0 / _one_minus_p(losses[key].double().to(v.device), step)
                v = v * inv_pq[:, None].float()
            u = damped_inverse([b.to(v.device) for b in curv], lam)(v) / m
            row_weight = None if inv_q is None else (qbar * inv_q).float()
            terms.append(ScoreTerm(step, dataset, u, row_weight=row_weight))
        return terms

    def index_maps(self, store: StoreReader) -> list[tuple[RowMap, RowMap]]:
        """``(F + λ)^{-1/2}`` on the rows and ``(F + λ)^{1/2}`` on the (already preconditioned)
        queries, per member: the index then searches ``<(F+λ)^{-1/2} g_q, (F+λ)^{-1/2} x>``."""
        maps = []
        for *_, curv, lam, _ in self._curvatures(store):
            maps.append((_damped_power(curv, lam, -0.5), _damped_power(curv, lam, 0.5)))
        return maps

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        fits = self._curvatures(store)
        m = len(fits)
        qbar = _trak_q_bar(fits) if self.mode == "trak" else None
        ones = torch.ones(store.width) / m
        terms = []
        for step, dataset, _, curv, lam, inv_q in fits:
            row_weight = None if inv_q is None else (qbar * inv_q * inv_q).float()
            terms.append(
                SelfTerm(
                    step,
                    dataset,
                    dataset,
                    ones,
                    apply=damped_inverse(curv, lam),
                    row_weight=row_weight,
                )
            )
        return terms


def _one_minus_p(loss: torch.Tensor, step: int) -> torch.Tensor:
    """``1 - p`` from cross-entropy losses ``-log p`` (``[N]``), floored at 1e-6."""
    if (loss < -1e-4).any():
        raise ValueError(
            f"checkpoint {step} has negative per-example losses; influence(mode='trak') needs the "
            "cross-entropy loss -log p of a classifier. Use mode='raw' for other losses."
        )
    return (-torch.expm1(-loss.clamp_min(0))).clamp_min(1e-6)


def _trak_q_bar(fits) -> torch.Tensor:
    """``[N]`` TRAK's out-to-loss term ``mean_m (1 - p_im)``."""
    return torch.stack([1.0 / f[5] for f in fits]).mean(0)


__all__ = ["Influence", "QueryVectors"]


def _damped_power(curv, lam: dict[str, float], power: float) -> RowMap:
    """Row map ``v -> (F + λ_l I)^power v`` per block."""

    def fn(v: torch.Tensor) -> torch.Tensor:
        return apply_blocks(curv, v, lambda b, s: (s.clamp_min(0) + lam[b.name]) ** power)

    return fn
