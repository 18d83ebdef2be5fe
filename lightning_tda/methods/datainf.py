"""DataInf: closed-form layer-wise influence (Kwon, Wu, Wu, Zou, ICLR 2024; methods.md §9).

The per-layer damped empirical Fisher ``G_l + λ_l I`` (``G_l = (1/n) Σ_j g_lj g_lj^T``) is inverted
by swapping inversion and averaging, ``(G_l + λ_l I)^{-1} ≈ (1/n) Σ_j (g_lj g_lj^T + λ_l I)^{-1}``,
where each term has a Sherman–Morrison closed form. No matrix is formed or inverted: the cost is
``O(n Σ_l d_l)`` per query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_tda.methods.base import RowMethod
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm, default_block_rows
from lightning_tda.store import schema
from lightning_tda.store.reader import CheckpointInfo, StoreReader


@dataclass
class DataInf(RowMethod):
    """DataInf influence on the stored rows of one checkpoint (Kwon et al., ICLR 2024, arXiv 2310.00902).

    For every layer block ``l`` of the stored row (columns ``spec.offset : spec.offset + spec.size``
    of each ``spec`` in ``store.layers``), with ``g_lj`` the block of train row ``j`` (``[d_l]``),
    ``n`` train rows and ``v_l`` the query's block::

        λ_l = damping_scale × (1/n) Σ_j mean(g_lj²)                 (unless ``damping`` is given)
        h_l = (1/(n λ_l)) Σ_j [v_l − (v_l^T g_lj) / (λ_l + ‖g_lj‖²) · g_lj]
            ≈ (G_l + λ_l I)^{-1} v_l,       G_l = (1/n) Σ_j g_lj g_lj^T
        s(i, q) = Σ_l h_l^T g_li

    Library sign: ``s > 0`` means example ``i`` helps (lowers the query loss). The paper (and its
    reference code, ``ykwon0407/DataInf``) reports the Koh–Liang influence ``I = −s``.

    Scoring streams the train rows twice (once for ``λ_l``, once for the transformed queries
    ``h``, ``[Q, D]``), holding one block of rows at a time and accumulating sums over ``n`` in
    float64; the shared streaming scorer then forms ``<h_q, g_i>``. Self-influence
    ``s(i, i) = Σ_l h_l(g_li)^T g_li`` applies the inverse to every train row, which needs a full pass
    over the train rows per block of rows: ``O(N² D)`` time (no extra memory beyond a block).

    DataInf is designed for LoRA adapter gradients: the error of swapping inverse and average grows
    with the per-layer dimension ``d_l`` (the paper's bound scales like ``d_l²``), and LoRA keeps
    ``d_l`` small. It runs on any store (each captured layer, projected or not, is one block), but on
    large blocks the approximation is coarse; ``method="influence"`` inverts ``G_l`` exactly. With
    ``GradientLogger(projection="exact")`` on a PEFT LoRA model (frozen base, so only the ``lora_A`` /
    ``lora_B`` linears are captured, each its own block) every block is one adapter matrix's full
    per-example gradient and this is the paper's method exactly.

    A layer whose stored rows are all zero contributes nothing to any score (its ``h_l`` is set to 0
    instead of dividing by ``λ_l = 0``).

    Args:
        checkpoint: global step to use; ``None`` = the last logged checkpoint.
        damping: absolute ``λ`` for every layer; ``None`` = the paper's per-layer default
            ``damping_scale × mean(g²)`` over the training rows.
        damping_scale: see ``damping`` (the reference code's ``lambda_const_param = 10`` gives 0.1).
    """

    checkpoint: int | None = None
    damping: float | None = None
    damping_scale: float = 0.1
    name: ClassVar[str] = "datainf"

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint = int(self.checkpoint)
        if self.damping is not None and not self.damping > 0:
            raise ValueError(
                f"damping must be > 0 (or None for the per-layer default "
                f"damping_scale * mean(g^2)), got {self.damping!r}"
            )
        if not self.damping_scale > 0:
            raise ValueError(f"damping_scale must be > 0, got {self.damping_scale!r}")

    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        try:
            return [store.checkpoint(self.checkpoint)]
        except KeyError as e:
            raise KeyError(
                f"datainf: {e.args[0]}; pass DataInf(checkpoint=...) one of {store.steps} "
                "(or None for the last)"
            ) from None

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        (ck,) = self.used_checkpoints(store)
        step = ck.global_step
        v = queries[step]
        if v.dim() != 2 or v.shape[1] != store.width:
            raise ValueError(
                f"datainf: query vectors for step {step} have shape {tuple(v.shape)}, expected [Q, {store.width}]"
            )
        inverse = self._inverse(store, step, v.device)
        return [ScoreTerm(step, schema.TRAIN, inverse(v).to(device=v.device, dtype=torch.float32))]

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        (ck,) = self.used_checkpoints(store)
        step = ck.global_step
        inverse = self._inverse(store, step, torch.device("cpu"))

        def apply(block: torch.Tensor) -> torch.Tensor:
            return inverse(block).to(block.dtype)

        return [SelfTerm(step, schema.TRAIN, schema.TRAIN, torch.ones(store.width), apply=apply)]

    # -- internals ---------------------------------------------------------------------------
    def damping_per_layer(self, store: StoreReader, step: int) -> torch.Tensor:
        """``[L]`` float64 ``λ_l`` of each layer in ``store.layers`` order (one pass without ``damping``)."""
        n = store.num_examples
        if n == 0:
            raise ValueError(f"datainf: {store.path} holds no training rows")
        if self.damping is not None:
            return torch.full((len(store.layers),), float(self.damping), dtype=torch.float64)
        sq = torch.zeros(store.width, dtype=torch.float64)
        for _, _, (x,) in store.iter_blocks([(step, schema.TRAIN)], _block_rows(store)):
            sq += x.double().pow(2).sum(0)
        lam = torch.stack(
            [sq[s.offset : s.offset + s.size].sum() / (n * s.size) for s in store.layers]
        )
        if not torch.isfinite(lam).all():
            bad = [
                s.name for s, ok in zip(store.layers, torch.isfinite(lam), strict=True) if not ok
            ]
            raise ValueError(
                f"datainf: stored rows of layers {bad} at step {step} are not finite (overflow in the "
                "store's dtype?); re-log with dtype='float32' or pass damping="
            )
        return self.damping_scale * lam

    def _inverse(
        self, store: StoreReader, step: int, device: torch.device
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The DataInf inverse ``v [B, D] -> h [B, D]``, one pass over the train rows per call.

        Computed on ``device`` in float64 (float32 on MPS). Memory: ``[B, D]`` float64 accumulator
        plus one block of train rows and one ``[B', B_train]`` coefficient tile of about 256 MB.
        """
        lam = self.damping_per_layer(store, step).tolist()
        n = store.num_examples
        dtype = torch.float32 if device.type == "mps" else torch.float64
        layers = [
            (s.offset, s.offset + s.size, lam_l)
            for s, lam_l in zip(store.layers, lam, strict=True)
            if lam_l > 0  # λ_l = 0 only when the layer's rows are all zero: it scores nothing
        ]
        train_rows = min(n, _block_rows(store))

        def inverse(v: torch.Tensor) -> torch.Tensor:
            q = v.shape[0]
            chunk = max(64, _BUDGET // (8 * train_rows))  # rows of v per coefficient tile
            acc = torch.zeros(q, v.shape[1], dtype=dtype, device=device)  # Σ_j c_qj g_j per layer
            for _, _, (x,) in store.iter_blocks([(step, schema.TRAIN)], train_rows):
                x = x.to(device=device, dtype=dtype)
                for a, b, lam_l in layers:
                    g = x[:, a:b]  # [B_train, d_l]
                    denom = lam_l + g.pow(2).sum(1)  # [B_train]
                    for r in range(0, q, chunk):
                        vl = v[r : r + chunk, a:b].to(device=device, dtype=dtype)
                        acc[r : r + chunk, a:b] += ((vl @ g.T) / denom) @ g
            h = torch.zeros_like(acc)
            for a, b, lam_l in layers:
                h[:, a:b] = (v[:, a:b].to(device=device, dtype=dtype) - acc[:, a:b] / n) / lam_l
            return h

        return inverse


_BUDGET = 256 * 2**20


def _block_rows(store: StoreReader) -> int:
    """Train rows per block: one decoded fp32 block plus its float64 copy within the budget."""
    return default_block_rows(store.width, 3, budget_bytes=_BUDGET)
