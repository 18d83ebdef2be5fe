"""Running Gram matrices ``Σ xᵀx`` of row batches (the K-FAC factors of the PCA basis pass).

On CPU in float32 the update is a BLAS ``ssyrk`` (scipy): only the lower triangle is computed, half
the FLOPs of ``xᵀ @ x``, which dominates the basis pass of wide layers. Elsewhere (GPU, other dtypes)
it is an in-place ``addmm_``. Both give the same symmetric matrix up to float rounding.

>>> g = Gram()
>>> x = torch.arange(6.0).reshape(3, 2)
>>> g.add(x); g.add(x)
>>> torch.equal(g.matrix(), 2 * x.T @ x)
True
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import blas


class Gram:
    """``Σ xᵀx`` ``[d, d]`` over the ``[n, d]`` batches given to :meth:`add`."""

    def __init__(self) -> None:
        self._lower: np.ndarray | None = None  # CPU: the lower triangle, Fortran order (ssyrk's C)
        self._full: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add ``xᵀx`` of one ``[n, d]`` batch."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and self._full is None:
            a = x.detach().contiguous().numpy().T  # [d, n], Fortran-contiguous: no copy for BLAS
            if self._lower is None:
                self._lower = np.zeros((a.shape[0], a.shape[0]), dtype=np.float32, order="F")
            self._lower = blas.ssyrk(1.0, a, beta=1.0, c=self._lower, lower=1, overwrite_c=1)
            return
        x = x.detach()
        self._full = x.T @ x if self._full is None else self._full.addmm_(x.T, x)

    def matrix(self) -> torch.Tensor:
        """The symmetric ``[d, d]`` sum (float32)."""
        if self._full is not None:
            return self._full
        if self._lower is None:
            raise ValueError("no batch was added")
        low = torch.from_numpy(np.tril(self._lower))
        return low + low.T - torch.diag(torch.diagonal(low))
