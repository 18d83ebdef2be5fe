"""Sparse recovery: per-example influences from operator measurements (methods.md §12.5).

For a query, ``y ∈ R^K`` (``y_k = loss_base - loss_k``) is modelled as ``M w`` with the ``[K, n]``
membership matrix ``M``; ``w`` is recovered by the Lasso ``argmin ½‖y − M w‖² + λ‖w‖₁`` (FISTA in torch
over the sparse matrix, batched over queries), optionally with ``w ≥ 0``. ``λ = α · λ_max(y)`` with
``λ_max = ‖Mᵀy‖_∞`` (the smallest λ giving ``w = 0``), so ``α ∈ (0, 1)`` is scale-free; α is chosen by
cross-validation over *operators* on measurements of held-out training examples, never on queries.

Sign: ``w_i > 0`` means membership of example ``i`` lowers the query loss — the library's convention.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

ALPHA_GRID = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def _torch_csr(m: sp.spmatrix) -> torch.Tensor:
    m = sp.csr_matrix(m, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data),
            size=m.shape,
            check_invariants=False,
        )


class SparseOperator:
    """``M`` and ``Mᵀ`` as torch CSR tensors, with ``‖M‖₂²`` by power iteration."""

    def __init__(self, m: sp.spmatrix) -> None:
        self.shape = m.shape
        self.m = _torch_csr(m)
        self.mt = _torch_csr(sp.csr_matrix(m).T)
        v = torch.randn(m.shape[1], 1, generator=torch.Generator().manual_seed(0))
        for _ in range(50):
            v = self.rmatmul(self.matmul(v))
            nrm = v.norm()
            v = v / nrm
        self.lipschitz = float(nrm) * 1.01 + 1e-12

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.m, x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.mt, y)


def lasso(
    op: SparseOperator,
    y: torch.Tensor,
    lam: torch.Tensor,
    positive: bool = False,
    iters: int = 500,
    tol: float = 1e-6,
) -> torch.Tensor:
    """FISTA for ``argmin_w ½‖y − M w‖² + λ‖w‖₁`` per column.

    Args:
        op: the ``[K, n]`` operator.
        y: ``[K, Q]`` measurements.
        lam: ``[Q]`` penalties.
        positive: constrain ``w ≥ 0``.

    Returns:
        ``[n, Q]`` float32.
    """
    y = y.float()
    step = 1.0 / op.lipschitz
    thr = (lam.float() * step).view(1, -1)
    w = torch.zeros(op.shape[1], y.shape[1])
    z, t = w, 1.0
    for _ in range(iters):
        g = op.rmatmul(op.matmul(z) - y)
        u = z - step * g
        w_new = (u - thr).clamp_min(0) if positive else u.sign() * (u.abs() - thr).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = w_new + ((t - 1) / t_new) * (w_new - w)
        delta = (w_new - w).norm() / w_new.norm().clamp_min(1e-12)
        w, t = w_new, t_new
        if delta < tol:
            break
    return w


def lambda_max(op: SparseOperator, y: torch.Tensor, positive: bool = False) -> torch.Tensor:
    """``[Q]`` smallest λ with an all-zero solution."""
    c = op.rmatmul(y.float())
    return (c.clamp_min(0) if positive else c.abs()).amax(0).clamp_min(1e-12)


def recover(
    matrix: sp.spmatrix | SparseOperator,
    y: torch.Tensor,
    alpha: float,
    positive: bool = False,
    iters: int = 500,
) -> torch.Tensor:
    """``[Q, n]`` influences from ``y [Q, K]`` with ``λ = alpha · λ_max`` per query."""
    op = matrix if isinstance(matrix, SparseOperator) else SparseOperator(matrix)
    if y.dim() != 2 or y.shape[1] != op.shape[0]:
        raise ValueError(f"measurements must be [Q, K={op.shape[0]}], got {tuple(y.shape)}")
    yt = y.T.float()
    lam = alpha * lambda_max(op, yt, positive)
    return lasso(op, yt, lam, positive, iters).T.contiguous()


def choose_alpha(
    matrix: sp.spmatrix,
    y_train: torch.Tensor,
    grid: Sequence[float] = ALPHA_GRID,
    folds: int = 5,
    positive: bool = False,
    seed: int = 0,
    iters: int = 300,
) -> tuple[float, dict[float, float]]:
    """Choose α by K-fold cross-validation over operators on held-out *training* measurements.

    For each fold the Lasso is fitted on the other operators' rows and scored by the Pearson
    correlation between predicted (``M_f ŵ``) and actual responses of the held-out operators,
    averaged over examples and folds. Returns ``(best α, {α: mean correlation})``.
    """
    m = sp.csr_matrix(matrix)
    k = m.shape[0]
    y = y_train.float()
    if y.dim() != 2 or y.shape[1] != k:
        raise ValueError(f"training measurements must be [H, K={k}], got {tuple(y.shape)}")
    perm = np.random.default_rng(seed).permutation(k)
    parts = np.array_split(perm, max(2, min(folds, k)))
    scores = {float(a): 0.0 for a in grid}
    for test in parts:
        train = np.setdiff1d(perm, test)
        op = SparseOperator(m[train])
        yt = y[:, torch.from_numpy(train)].T
        lmax = lambda_max(op, yt, positive)
        mtest = _torch_csr(m[test])
        for a in grid:
            w = lasso(op, yt, float(a) * lmax, positive, iters)
            pred = torch.sparse.mm(mtest, w)  # [|test|, H]
            act = y[:, torch.from_numpy(test)].T
            scores[float(a)] += float(_corr(pred, act).mean()) / len(parts)
    best = max(scores, key=lambda a: (scores[a], a))
    return best, scores


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Pearson correlation (0 where either column is constant)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-30), torch.zeros_like(den))


def cosamp(m: sp.spmatrix, y: torch.Tensor, sparsity: int, iters: int = 20) -> torch.Tensor:
    """Compressive sampling matching pursuit (Needell & Tropp 2009), the Lasso's greedy alternative.

    Args:
        m: ``[K, n]`` membership matrix.
        y: ``[Q, K]`` measurements.
        sparsity: ``s`` non-zeros kept per query (``3s ≤ K``).
        iters: iterations (each: ``2s`` new candidates from the residual's correlations, least
            squares on at most ``3s`` columns, pruned back to the ``s`` largest).

    Returns:
        ``[Q, n]`` recovered influences.
    """
    k, n = m.shape
    if not 1 <= sparsity <= k // 3:
        raise ValueError(f"cosamp: sparsity must be in [1, K/3 = {k // 3}], got {sparsity}")
    dense = torch.from_numpy(sp.csr_matrix(m).toarray()).to(torch.float64)  # [K, n]
    w = torch.zeros(y.shape[0], n, dtype=torch.float64)
    for q, yq in enumerate(y.to(torch.float64)):
        support, coef = _cosamp_one(dense, yq, sparsity, iters)
        w[q, support] = coef
    return w.to(torch.float32)


def _cosamp_one(dense: torch.Tensor, y: torch.Tensor, s: int, iters: int):
    """``(support, coefficients)`` of one query ``y`` ``[K]`` (stops when the residual stalls)."""
    support, coef, r = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=y.dtype), y
    for _ in range(iters):
        cand = (dense.T @ r).abs().topk(2 * s).indices
        merged = torch.unique(torch.cat([support, cand]))
        ls = torch.linalg.lstsq(dense[:, merged], y.unsqueeze(1)).solution.squeeze(1)
        keep = ls.abs().topk(min(s, len(merged))).indices
        support, coef = merged[keep], ls[keep]
        new_r = y - dense[:, support] @ coef
        stalled = new_r.norm() >= r.norm() * (1 - 1e-9) or new_r.norm() <= 1e-12 * y.norm()
        r = new_r
        if stalled:
            break
    return support, coef
