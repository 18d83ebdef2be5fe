"""Subset design: a left-d-regular bipartite graph between training examples and K subsets.

Each of the ``n`` example ids is a member of ``d`` distinct subsets drawn uniformly from ``K``
(``numpy.random.default_rng(seed)``), so the ``[K, n]`` 0/1 membership matrix ``M`` has exactly ``d``
ones per column (methods.md §12.4). Stored in the store's ``stride/design`` group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp
import torch

from lightning_tda.errors import StoreError
from lightning_tda.store.extension import PARTIAL, ExtensionGroup  # noqa: F401 (PARTIAL re-exported)
from lightning_tda.store.writer import open_for_reading

GROUP = "stride"
DESIGN = "design"


@dataclass
class SubsetDesign:
    """Membership of ``n`` examples in ``K`` subsets, ``d`` subsets per example.

    Attributes:
        ids: ``[n]`` example ids (store row order); column ``i`` of ``matrix`` is ``ids[i]``.
        table: ``[n, d]`` int64 subset indices of each example (distinct per row).
        num_subsets: ``K``.
        degree: ``d``.
        seed: the seed the table was drawn from.
    """

    ids: np.ndarray
    table: np.ndarray
    num_subsets: int
    degree: int
    seed: int

    @classmethod
    def draw(cls, ids, num_subsets: int, degree: int, seed: int = 0) -> SubsetDesign:
        ids = np.asarray(
            torch.as_tensor(ids).cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        )
        ids = ids.astype(np.int64).reshape(-1)
        k, d = int(num_subsets), int(degree)
        if d < 1:
            raise ValueError(f"degree d must be >= 1, got {degree!r}")
        if k < d:
            raise ValueError(
                f"STRIDE needs at least d subsets: K={k} < d={d}; raise num_subsets or lower degree"
            )
        if len(ids) == 0:
            raise ValueError("the subset design needs at least one example id")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("example ids of the subset design must be unique")
        rng = np.random.default_rng(int(seed))
        # d distinct subsets per example: the first d entries of a random permutation of K (argsort of
        # uniform keys), drawn for all examples at once
        chunk = max(1, 2**22 // k)  # bounded memory: ~32 MB of keys per chunk
        table = np.concatenate(
            [
                np.argsort(rng.random((min(chunk, len(ids) - s), k)), axis=1)[:, :d]
                for s in range(0, len(ids), chunk)
            ]
        ).astype(np.int64)
        table.sort(axis=1)
        return cls(ids, table, k, d, int(seed))

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> sp.csr_matrix:
        """``[K, n]`` 0/1 CSR membership matrix."""
        n, d = self.table.shape
        cols = np.repeat(np.arange(n), d)
        data = np.ones(n * d, dtype=np.float32)
        return sp.csr_matrix((data, (self.table.reshape(-1), cols)), shape=(self.num_subsets, n))

    def members(self, k: int) -> np.ndarray:
        """Positions (columns) of the members of subset ``k``."""
        m = self.matrix
        return m.indices[m.indptr[k] : m.indptr[k + 1]]

    # -- storage ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write to ``stride/design`` of the store at ``path``; visible only once complete."""
        with ExtensionGroup(path, GROUP) as ext:
            g = ext.group
            if DESIGN in g:
                if not overwrite:
                    existing = _read(g[DESIGN])
                    if existing == self:
                        return
                    raise StoreError(
                        f"{path} already holds a different STRIDE subset design (K={existing.num_subsets}, "
                        f"d={existing.degree}, seed={existing.seed}); pass overwrite=True to replace it "
                        "(operators fitted on the old design are then invalid)"
                    )
                del g[DESIGN]
            dg = ext.partial(DESIGN).create_group(DESIGN)
            dg.create_dataset("ids", data=self.ids, track_times=False)
            dg.create_dataset("table", data=self.table.astype(np.int32), track_times=False)
            dg.attrs["num_subsets"] = self.num_subsets
            dg.attrs["degree"] = self.degree
            dg.attrs["seed"] = self.seed
            ext.publish(DESIGN)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubsetDesign | None:
        """The design stored in ``path``, or ``None`` when there is none."""
        with open_for_reading(path) as f:
            g = f.get(f"{GROUP}/{DESIGN}")
            return None if g is None else _read(g)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubsetDesign):
            return NotImplemented
        return (
            self.num_subsets == other.num_subsets
            and self.degree == other.degree
            and self.seed == other.seed
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.table, other.table)
        )


def _read(g: h5py.Group) -> SubsetDesign:
    return SubsetDesign(
        g["ids"][()].astype(np.int64),
        g["table"][()].astype(np.int64),
        int(g.attrs["num_subsets"]),
        int(g.attrs["degree"]),
        int(g.attrs["seed"]),
    )
