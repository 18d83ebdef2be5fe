"""Block-diagonal curvature in the projected space, fitted from a store (methods.md §4.2, §6, §8.7).

Each captured layer ``l`` is one block of the stored row: its projected gradient
``G̃ = P_out^T G P_in`` (``[k_out, k_in]``, flattened row-major). Treating the projection as the
parameters being attributed (LoGra), the stored rows are exact per-example gradients of those
parameters, so the block's empirical Fisher ``F_l = (1/N) Σ_i w_i vec(G̃_i) vec(G̃_i)^T`` is known
exactly. Two eigendecompositions are offered:

* ``"raw"``: ``F_l = Q diag(σ) Q^T`` from the stored rows (``k × k`` per layer, ``k = k_out k_in``).
* ``"ekfac"``: the eigenbasis ``Q_S ⊗ Q_A`` of the projected K-FAC factors ``S'``, ``A'`` the logger
  accumulated during the sweep, with eigenvalues corrected from the stored rows,
  ``σ_ab = (1/N) Σ_i w_i (Q_S^T G̃_i Q_A)_ab²`` (EK-FAC; ``k_out² + k_in²`` memory per layer).

Both expose the same operator: ``apply(v, f) = Q diag(f(σ)) Q^T v`` for a function ``f`` of the
eigenvalues, which gives damped inverses (influence), and SOURCE's matrix exponentials.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_tda.capture.layers import DENSE
from lightning_tda.store import schema
from lightning_tda.store.reader import StoreReader

CurvatureMode = Literal["raw", "ekfac"]


@dataclass
class BlockEigen:
    """Eigendecomposition of one block's curvature.

    Attributes:
        name: layer name.
        cols: the block's columns in a stored row.
        sigma: ``[k]`` eigenvalues (flattened ``[k_out, k_in]`` for the Kronecker basis).
        q: ``[k, k]`` eigenvectors (raw), or ``None``.
        q_s: ``[k_out, k_out]``, ``q_a``: ``[k_in, k_in]`` Kronecker eigenbasis (ekfac), or ``None``.
    """

    name: str
    cols: slice
    sigma: torch.Tensor
    q: torch.Tensor | None = None
    q_s: torch.Tensor | None = None
    q_a: torch.Tensor | None = None

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` block vectors -> ``[B, k]`` eigen-coordinates."""
        if self.q is not None:
            return v @ self.q
        m = v.reshape(v.shape[0], self.q_s.shape[0], self.q_a.shape[0])
        return (self.q_s.T @ m @ self.q_a).reshape(v.shape[0], -1)

    def unrotate(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate`."""
        if self.q is not None:
            return c @ self.q.T
        m = c.reshape(c.shape[0], self.q_s.shape[0], self.q_a.shape[0])
        return (self.q_s @ m @ self.q_a.T).reshape(c.shape[0], -1)

    def apply(self, v: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``Q diag(f(σ)) Q^T v`` for each row of ``v`` (``[B, k]``)."""
        dt = v.dtype
        out = self.unrotate(self.rotate(v.double()) * f(self.sigma.to(v.device)))
        return out.to(dt)

    def to(self, device: torch.device | str) -> BlockEigen:
        def mv(t):
            return None if t is None else t.to(device)

        return BlockEigen(
            self.name, self.cols, mv(self.sigma), mv(self.q), mv(self.q_s), mv(self.q_a)
        )


Curvature = list[BlockEigen]


def apply_blocks(
    curv: Curvature, v: torch.Tensor, f: Callable[[BlockEigen, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``f(block, σ)`` block by block to rows ``v`` (``[B, D]``); columns of no block pass unchanged."""
    out = v.clone()
    for b in curv:
        out[:, b.cols] = b.apply(v[:, b.cols], lambda s, b=b: f(b, s))
    return out


def damped_inverse(curv: Curvature, lambdas: Mapping[str, float]) -> Callable:
    """Row map ``v -> (F + λ_l I)^{-1} v`` per block (for :class:`~lightning_tda.methods.scoring.SelfTerm`)."""

    def fn(v: torch.Tensor) -> torch.Tensor:
        return apply_blocks(curv, v, lambda b, s: 1.0 / (s.clamp_min(0) + lambdas[b.name]))

    return fn


DEFAULT_DAMPING_SCALE = {"raw": 1.0, "trak": 1.0, "ekfac": 0.1}
"""Default ``damping_scale`` per influence mode (``λ_l = scale × mean eigenvalue`` of each block), chosen
on the benchmark banks' choosing halves (BENCHMARKS.md "Defaults"): the raw block Fisher wants about the
mean eigenvalue itself on every AdamW bank, while the EK-FAC spectrum (Kronecker eigenbasis, corrected
eigenvalues) wants kronfluence's ``0.1``."""


def default_damping(curv: Curvature, damping: float | None, scale: float = 0.1) -> dict[str, float]:
    """Per-block ``λ_l``: ``damping`` if given, else ``scale × mean eigenvalue`` (``scale·trace(F_l)/k_l``),
    computed from the training rows only."""
    if damping is not None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r} (or None for the default)")
        return {b.name: float(damping) for b in curv}
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"damping_scale must be > 0, got {scale!r}")
    out = {}
    for b in curv:
        mean = float(b.sigma.clamp_min(0).mean())
        out[b.name] = float(scale) * mean if mean > 0 else 1e-12
    return out


def _blocks(store: StoreReader) -> list[tuple[str, slice, tuple[int, int] | None]]:
    out = []
    for s in store.layers:
        shape = None if s.kind == DENSE else (s.k_out, s.k_in)
        out.append((s.name, slice(s.offset, s.offset + s.size), shape))
    return out


def fit_curvature(
    store: StoreReader,
    steps: Sequence[int],
    mode: CurvatureMode = "raw",
    dataset: str = schema.TRAIN,
    row_weights: Mapping[int, torch.Tensor] | None = None,
    block_rows: int = 4096,
) -> Curvature:
    """Fit the block curvature averaged over checkpoints ``steps``.

    Args:
        store: the store.
        steps: checkpoints to average over (SOURCE's segment average; one step for influence).
        mode: ``"raw"`` or ``"ekfac"`` (needs ``GradientLogger(curvature=True)``; ``<dense>`` blocks,
            which have no Kronecker factors, always use ``"raw"``).
        dataset: the row dataset to fit on.
        row_weights: optional ``{step: [N]}`` non-negative weight per example; the average is
            ``Σ_i w_i g g^T / Σ_i w_i`` (uniform by default). Zero weights drop an example.
        block_rows: rows read per block.

    Returns:
        One :class:`BlockEigen` per layer (float64 on the CPU).
    """
    if mode not in ("raw", "ekfac"):
        raise ValueError(f"curvature mode must be 'raw' or 'ekfac', got {mode!r}")
    if not steps:
        raise ValueError("fit_curvature needs at least one checkpoint")
    blocks = _blocks(store)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if mode == "ekfac":
        sums: dict[str, list[torch.Tensor]] = {}
        for step in steps:
            for name, (a, s) in store.kfac_factors(step).items():
                acc = sums.setdefault(name, [torch.zeros_like(a, dtype=torch.float64), None])
                acc[0] = acc[0] + a.double()
                acc[1] = s.double() if acc[1] is None else acc[1] + s.double()
        for name, (a, s) in sums.items():
            _, q_a = torch.linalg.eigh(a / len(steps))
            _, q_s = torch.linalg.eigh(s / len(steps))
            bases[name] = (q_s, q_a)
    stats = {name: None for name, _, _ in blocks}
    for step in steps:
        w = None if row_weights is None else row_weights[step].double()
        total = float(w.sum()) if w is not None else float(store.num_examples)
        if total <= 0:
            raise ValueError(f"checkpoint {step}: every example has zero weight")
        per = {name: None for name, _, _ in blocks}
        for start, stop, (x,) in store.iter_blocks([(step, dataset)], block_rows):
            x = x.double()
            if w is not None:
                x = x * w[start:stop, None].sqrt()
            for name, cols, shape in blocks:
                g = x[:, cols]
                if name in bases:
                    q_s, q_a = bases[name]
                    c = q_s.T @ g.reshape(-1, *shape) @ q_a
                    t = (c * c).sum(0).reshape(-1)
                else:
                    t = g.T @ g
                per[name] = t if per[name] is None else per[name] + t
        for name in per:
            v = per[name] / total / len(steps)
            stats[name] = v if stats[name] is None else stats[name] + v
    out: Curvature = []
    for name, cols, _ in blocks:
        if name in bases:
            q_s, q_a = bases[name]
            out.append(BlockEigen(name, cols, stats[name], q_s=q_s, q_a=q_a))
        else:
            sigma, q = torch.linalg.eigh(stats[name])
            out.append(BlockEigen(name, cols, sigma, q=q))
    return out
