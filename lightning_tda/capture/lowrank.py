"""Rank-``c`` factored storage of projected per-example gradients (LoRIF, methods.md §5).

Each captured layer's projected gradient ``G̃_i`` (``[k_out, k_in]``) is a sum of ``T`` outer
products (one per token), so its rank is at most ``min(T, k_out, k_in)``: exactly 1 for a
non-sequence layer. A truncated SVD ``G̃_i ≈ Σ_{j<c} s_j u_j v_j^T`` is stored as the two factors
``U = [√s_j u_j]`` (``[k_out, c]``) and ``V = [√s_j v_j]`` (``[k_in, c]``), so ``G̃_i ≈ U V^T`` and a
layer costs ``c (k_out + k_in)`` numbers instead of ``k_out k_in``.

A factor row is the concatenation, in ``layers`` order, of one block per layer: for a factored
layer ``U`` (row-major ``[k_out, c]``) then ``V`` (row-major ``[k_in, c]``); the ``<dense>`` block
(a flat vector, not a matrix) is kept as is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from lightning_tda.capture.layers import DENSE, LayerSpec

FACTORED = "factored"
RAW = "raw"

# above this side length (and for c well below it) the per-example SVD is randomized
_LOWRANK_MIN_SIDE = 128


@dataclass(frozen=True)
class FactorBlock:
    """One layer's block in a factor row.

    Attributes:
        name: layer name.
        kind: ``"factored"`` (``U``, ``V`` factors) or ``"raw"`` (the dense row block as is).
        k_out, k_in: the projected gradient's shape (a raw block holds ``k_out * k_in`` values).
        c: stored rank (``0`` for raw blocks).
        offset: first column of the block in a factor row.
        dense_offset: first column of the layer in a dense row.
    """

    name: str
    kind: str
    k_out: int
    k_in: int
    c: int
    offset: int
    dense_offset: int

    @property
    def dense_size(self) -> int:
        return self.k_out * self.k_in

    @property
    def size(self) -> int:
        return self.c * (self.k_out + self.k_in) if self.kind == FACTORED else self.dense_size

    @property
    def cols(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    @property
    def dense_cols(self) -> slice:
        return slice(self.dense_offset, self.dense_offset + self.dense_size)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U [B, k_out, c], V [B, k_in, c])`` of factor rows ``x`` (``[B, W]``)."""
        b = x.shape[0]
        nu = self.k_out * self.c
        u = x[:, self.offset : self.offset + nu].reshape(b, self.k_out, self.c)
        v = x[:, self.offset + nu : self.offset + self.size].reshape(b, self.k_in, self.c)
        return u, v

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, k_out * k_in]`` dense rows of this layer from factor rows ``x``."""
        if self.kind == RAW:
            return x[:, self.cols]
        u, v = self.factors(x)
        return torch.bmm(u, v.transpose(1, 2)).reshape(x.shape[0], -1)

    def dot(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[S, B]`` inner products ``<m_s, G̃_b>`` of dense ``m`` (``[S, k_out * k_in]``) with factor rows.

        For a factored block ``<M, U V^T> = Σ_j u_j^T M v_j``. That costs ``S·c·k_out·k_in`` per
        example against ``(S + c)·k_out·k_in`` for expanding the block's rows in memory first; the
        cheaper order is taken (the factored one only pays off for ``S = 1``). Same numbers either way.
        """
        if self.kind == RAW or self.c * m.shape[0] > self.c + m.shape[0]:
            return m @ self.dense(x).T
        u, v = self.factors(x)
        mm = m.reshape(m.shape[0], self.k_out, self.k_in)
        return torch.einsum("soi,bic,boc->sb", mm, v, u)

    def sqnorm(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` squared Frobenius norms ``‖U V^T‖² = Σ (U^T U) ⊙ (V^T V)`` without expanding."""
        if self.kind == RAW:
            return x[:, self.cols].pow(2).sum(1)
        u, v = self.factors(x)
        return (torch.bmm(u.transpose(1, 2), u) * torch.bmm(v.transpose(1, 2), v)).sum((1, 2))


@dataclass(frozen=True)
class FactorLayout:
    """Where every layer's factors sit in a factor row.

    Attributes:
        blocks: one :class:`FactorBlock` per layer, in the store's ``layers`` order.
        rank: the requested ``lorif_rank`` (each block stores ``c = min(rank, k_out, k_in)``).
    """

    blocks: tuple[FactorBlock, ...]
    rank: int

    @classmethod
    def from_layers(cls, layers: Sequence[LayerSpec], rank: int) -> FactorLayout:
        """Layout of ``layers`` at rank ``rank`` (``rank=0``: every block raw, i.e. a dense row)."""
        blocks = []
        offset = 0
        for s in layers:
            if s.kind == DENSE or rank == 0:
                b = FactorBlock(s.name, RAW, s.k_out, s.k_in, 0, offset, s.offset)
            else:
                c = min(int(rank), s.k_out, s.k_in)
                b = FactorBlock(s.name, FACTORED, s.k_out, s.k_in, c, offset, s.offset)
            blocks.append(b)
            offset += b.size
        return cls(tuple(blocks), int(rank))

    @classmethod
    def identity(cls, layers: Sequence[LayerSpec]) -> FactorLayout:
        """The trivial layout of a dense row (every block raw)."""
        return cls.from_layers(layers, 0)

    @property
    def width(self) -> int:
        """Columns of a factor row."""
        return sum(b.size for b in self.blocks)

    @property
    def dense_width(self) -> int:
        return sum(b.dense_size for b in self.blocks)

    @property
    def is_identity(self) -> bool:
        return all(b.kind == RAW for b in self.blocks)

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "blocks": [asdict(b) for b in self.blocks]})

    @classmethod
    def from_json(cls, text: str) -> FactorLayout:
        d = json.loads(text)
        return cls(tuple(FactorBlock(**b) for b in d["blocks"]), int(d["rank"]))

    # -- encode / decode ----------------------------------------------------------------------
    def factor(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense rows ``[B, D]`` -> factor rows ``[B, W]`` (fp32), by a truncated SVD per example and layer.

        ``torch.linalg.svd`` is used for small blocks; blocks whose shorter side exceeds 128 with
        ``c`` well below it use ``torch.svd_lowrank`` (randomized, two power iterations). The factors
        are exact (up to float error) whenever ``c`` is at least the gradient's rank.
        """
        b = rows.shape[0]
        out = rows.new_empty(b, self.width, dtype=torch.float32)
        for blk in self.blocks:
            g = rows[:, blk.dense_cols].float()
            if blk.kind == RAW:
                out[:, blk.cols] = g
                continue
            u, v = _truncated_factors(g.reshape(b, blk.k_out, blk.k_in), blk.c)
            nu = blk.k_out * blk.c
            out[:, blk.offset : blk.offset + nu] = u.reshape(b, -1)
            out[:, blk.offset + nu : blk.offset + blk.size] = v.reshape(b, -1)
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Factor rows ``[B, W]`` -> dense rows ``[B, D]`` (``U V^T`` per layer, fp32)."""
        x = x.float()
        out = x.new_zeros(x.shape[0], self.dense_width)
        for blk in self.blocks:
            out[:, blk.dense_cols] = blk.dense(x)
        return out

    def dot(self, dense: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[Q, B]``: ``dense @ reconstruct(x).T`` for ``dense`` ``[Q, D]`` and factor rows ``x`` ``[B, W]``."""
        s = dense.new_zeros(dense.shape[0], x.shape[0])
        for blk in self.blocks:
            s += blk.dot(dense[:, blk.dense_cols], x)
        return s


def _truncated_factors(g: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` ``[B, m, n]`` -> ``(U √S [B, m, c], V √S [B, n, c])`` of its rank-``c`` truncated SVD."""
    side = min(g.shape[1], g.shape[2])
    if side > _LOWRANK_MIN_SIDE and 2 * (c + 10) < side:
        u, s, v = torch.svd_lowrank(g, q=c + 10, niter=2)
    else:
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        v = vh.transpose(1, 2)
    root = s[:, :c].clamp_min(0).sqrt()
    return u[:, :, :c] * root[:, None, :], v[:, :, :c] * root[:, None, :]
