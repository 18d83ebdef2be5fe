"""SOURCE: approximate unrolled differentiation over the logged checkpoints (methods.md §8).

The run's steps are split into ``L`` segments. Within segment ``ℓ`` curvature and gradients are taken
as stationary: ``H̄_ℓ`` is the block curvature of the projected gradients averaged over the segment's
checkpoints (:mod:`~lightning_tda.methods.curvature`), ``ḡ_ℓ(z_i)`` the lr-weighted mean of the example's
stored gradients, and ``η̄_ℓ K_ℓ`` the logged learning-rate sum over the segment (divided by ``1 - β``
for SGD with momentum ``β``). With ``x = η̄_ℓ K_ℓ σ`` on each eigenvalue ``σ`` of ``H̄_ℓ``:

    propagation  F_S(σ) = exp(-x)                 (how later training decays an earlier effect)
    contribution F_r(σ) = (1 - exp(-x)) / σ = η̄_ℓ K_ℓ · (-expm1(-x) / x)   (η̄_ℓ K_ℓ at σ = 0)

and ``s(i, q) = Σ_ℓ (1/N_ℓ) ⟨F_r,ℓ (Π_{ℓ' > ℓ} F_S,ℓ') g_q(θ_T), ḡ_ℓ(z_i)⟩``, evaluated by walking back
from the query gradient at the last checkpoint. ``H̄ → 0`` gives lr-weighted TracIn with the query at
``θ_T``; ``L = 1`` an influence function with damping ``1/(η̄K)`` implied by the run (no tuning).

Adam/AdamW (methods.md §8.4): the update is ``-η (P g + λ_wd θ)`` with Adam's elementwise
preconditioner ``P``. In the projected space ``P`` is the per-coordinate diagonal ``D`` of
:func:`~lightning_tda.methods.preconditioner.projected_adam_diagonal` (from the logged second moments),
and the linearised dynamics ``λ_wd I + D H̄`` are similar to the symmetric ``H' = D^½ H̄ D^½ + λ_wd I``
(AdamW's decoupled decay; Adam's L2 decay enters as ``D^½ (H̄ + λ I) D^½``). Each segment then uses
``F_r`` and ``F_S`` of ``H'``: the contribution ``D^½ F_r(H') D^½ u`` and the propagation
``u ← D^{-½} F_S(H') D^½ u``, which is exact for a quadratic loss under a fixed diagonal preconditioner.
The train side is the plain stored gradient ``ḡ_ℓ``. ``optimizer="auto"`` (the default) reads the
logged optimizer class. Weight decay of SGD (L2) shifts ``H̄`` the same way.

Multi-stage runs: give ``boundaries`` at the stage changes and ``stage_members`` (the example ids
trained on in each stage). An example absent from a stage contributes nothing there (and is left
out of that stage's curvature), but its earlier contribution is still propagated through later stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from lightning_tda.methods.base import RowMethod, select_checkpoints
from lightning_tda.methods.curvature import (
    BlockEigen,
    Curvature,
    CurvatureMode,
    apply_blocks,
    fit_curvature,
)
from lightning_tda.methods.preconditioner import (
    optimizer_kind,
    optimizer_record,
    projected_adam_diagonal,
    weight_decay_columns,
)
from lightning_tda.methods.scoring import ScoreTerm, SelfTerm
from lightning_tda.store import schema
from lightning_tda.store.reader import CheckpointInfo, StoreReader


def phi1(x: torch.Tensor) -> torch.Tensor:
    """``(1 - exp(-x)) / x`` with its limit 1 at ``x = 0``; finite for every ``x >= 0``."""
    x = x.double().clamp_min(0)
    small = x < 1e-8
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - 0.5 * x, -torch.expm1(-safe) / safe)


def source_functions(
    sigma: torch.Tensor, eta_k: float, precond: float = 1.0, damping: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F_r(σ), F_S(σ))`` of one segment for eigenvalues ``σ`` (``[k]``), float64.

    ``F_r = η̄K · φ(η̄K p̄ (σ + λ))`` and ``F_S = exp(-η̄K p̄ (σ + λ))``; negative round-off eigenvalues
    are clamped to 0.
    """
    x = float(eta_k) * float(precond) * (sigma.double().clamp_min(0) + float(damping))
    return float(eta_k) * phi1(x), torch.exp(-x)


@dataclass
class Segment:
    """One SOURCE segment: its checkpoints, their weights, lr sums, curvature and members."""

    steps: list[int]
    ck_weights: list[torch.Tensor]  # per checkpoint [D]: its share of the segment's lr sum
    eta_k: torch.Tensor  # [D] η̄K per column (momentum-corrected)
    shift: dict[str, float]  # per block: λ added to the eigenvalues (weight decay)
    curvature: Curvature  # of H̄ (SGD) or of H' = D^½ H̄ D^½ (Adam)
    scale: torch.Tensor | None  # [D] D^½ (Adam) or None (SGD)
    mask: torch.Tensor | None  # [N] float 0/1 stage membership, None = every example
    members: int


@dataclass
class Source(RowMethod):
    """SOURCE influence over ``L`` segments of the logged trajectory.

    Args:
        segments: number of equal splits of the logged checkpoints (ignored with ``boundaries``).
        boundaries: global steps that end a segment (each a logged checkpoint), e.g. stage changes;
            segment ``ℓ`` holds the checkpoints in ``(b_{ℓ-1}, b_ℓ]`` and the last one runs to the last
            checkpoint.
        stage_members: per segment, the example ids trained on in it (``None`` = every example).
        curvature: ``"raw"`` (exact block Fisher of the stored rows) or ``"ekfac"`` (logged K-FAC basis).
        optimizer: ``"auto"`` (default: the logged optimizer's form), ``"sgd"`` (plain gradient
            dynamics with the logged lr sums) or ``"adam"`` (the per-coordinate Adam form above).
        momentum: SGD heavy-ball ``β``; ``None`` = the logged hyper-parameter (``η/(1-β)`` is used).
        damping: optional extra ``λ`` added to every eigenvalue (numerical safety; default 0).
        weight_decay: include the logged weight decay in the dynamics (default ``True``).
        checkpoints: restrict to these logged steps (default: all).
    """

    segments: int = 3
    boundaries: Sequence[int] | None = None
    stage_members: Sequence[Sequence[int] | None] | None = None
    curvature: CurvatureMode = "raw"
    optimizer: Literal["auto", "sgd", "adam"] = "auto"
    momentum: float | None = None
    damping: float = 0.0
    weight_decay: bool = True
    checkpoints: Sequence[int] | None = None
    name: ClassVar[str] = "source"

    def __post_init__(self) -> None:
        if self.boundaries is None and (not isinstance(self.segments, int) or self.segments < 1):
            raise ValueError(f"segments must be a positive int, got {self.segments!r}")
        if self.curvature not in ("raw", "ekfac"):
            raise ValueError(f"curvature must be 'raw' or 'ekfac', got {self.curvature!r}")
        if self.optimizer not in ("auto", "sgd", "adam"):
            raise ValueError(f"optimizer must be 'auto', 'sgd' or 'adam', got {self.optimizer!r}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping!r}")
        if self.boundaries is not None:
            self.boundaries = sorted(int(b) for b in self.boundaries)
        if self.checkpoints is not None:
            self.checkpoints = [int(s) for s in self.checkpoints]

    # -- segments ------------------------------------------------------------------------------
    def used_checkpoints(self, store: StoreReader) -> list[CheckpointInfo]:
        return select_checkpoints(store, self.checkpoints)

    def _groups(self, cks: list[CheckpointInfo]) -> list[list[CheckpointInfo]]:
        if self.boundaries is None:
            n = min(self.segments, len(cks))
            return [list(g) for g in np.array_split(np.array(cks, dtype=object), n)]
        steps = [c.global_step for c in cks]
        bad = [b for b in self.boundaries if b not in steps]
        if bad:
            raise ValueError(
                f"segment boundaries {bad} are not logged checkpoints (logged: {steps}); log a checkpoint "
                "at each stage boundary, e.g. GradientLogger(at_steps=[...])"
            )
        edges = [-1, *self.boundaries, steps[-1]]
        groups = [
            [c for c in cks if lo < c.global_step <= hi]
            for lo, hi in zip(edges, edges[1:], strict=False)
        ]
        if any(not g for g in groups):
            raise ValueError(
                f"segment boundaries {self.boundaries} leave a segment with no checkpoint"
            )
        return groups

    def _optimizer(self, store: StoreReader) -> tuple[str, list[float]]:
        """``(kind, per-group momentum)``: kind ``"sgd"``, ``"adam"`` or ``"adamw"``."""
        logged = optimizer_kind(store)
        kind = self.optimizer
        if kind == "auto":
            kind = logged
        elif kind == "adam":
            kind = logged if logged != "sgd" else "adamw"
        if kind != "sgd":
            return kind, [0.0]
        groups = [g for o in optimizer_record(store) for g in o["groups"]]
        betas = [
            float(self.momentum if self.momentum is not None else g.get("momentum", 0.0) or 0.0)
            for g in groups
        ] or [float(self.momentum or 0.0)]
        return kind, betas

    def build(self, store: StoreReader) -> list[Segment]:
        """Fit every segment (curvature, lr sums, weights); exposed for inspection and tests."""
        cks = self.used_checkpoints(store)
        groups = self._groups(cks)
        if self.stage_members is not None and len(self.stage_members) != len(groups):
            raise ValueError(
                f"stage_members has {len(self.stage_members)} entries for {len(groups)} segments"
            )
        kind, betas = self._optimizer(store)
        ngroups = len(cks[-1].lr_cumsum)
        if ngroups == 0:
            raise ValueError(
                "the store has no learning-rate record; source needs checkpoints logged during fit"
            )
        ids = store.example_ids.numpy()
        out = []
        prev = [0.0] * ngroups
        for li, group in enumerate(groups):
            end = list(group[-1].lr_cumsum)
            eta = [
                (e - p) / (1.0 - b)
                for e, p, b in zip(end, prev, _expand(betas, ngroups), strict=True)
            ]
            prev = end
            eta_cols = store.column_weights(group[-1].global_step, eta)
            lr = [store.column_weights(c.global_step, c.lr_sum) for c in group]
            total = sum(lr)
            if float(total.abs().max()) == 0.0:  # e.g. only a fit-start checkpoint
                weights = [torch.full_like(total, 1.0 / len(group)) for _ in group]
            else:
                weights = [w / total.clamp_min(1e-30) for w in lr]
            members = None if self.stage_members is None else self.stage_members[li]
            mask = None
            count = store.num_examples
            if members is not None:
                m = np.isin(ids, np.asarray(list(members), dtype=np.int64))
                unknown = set(int(i) for i in members) - set(ids.tolist())
                if unknown:
                    raise ValueError(
                        f"stage_members[{li}] has ids not in the store, e.g. {sorted(unknown)[:5]}"
                    )
                mask = torch.from_numpy(m.astype(np.float32))
                count = int(m.sum())
                if count == 0:
                    raise ValueError(f"stage_members[{li}] is empty")
            steps = [c.global_step for c in group]
            row_w = None if mask is None else {s: mask.double() for s in steps}
            curv = fit_curvature(store, steps, self.curvature, schema.TRAIN, row_w)
            wd = weight_decay_columns(store, steps[-1]) if self.weight_decay else None
            scale, shift = None, {b.name: 0.0 for b in curv}
            if kind in ("sgd", "adamw") and wd is not None:
                shift = {b.name: float(wd[b.cols.start]) for b in curv}
            if kind != "sgd":
                scale = projected_adam_diagonal(store, steps).sqrt()
                l2 = wd if (kind == "adam" and wd is not None) else None
                curv = preconditioned_curvature(curv, scale, l2)
            out.append(Segment(steps, weights, eta_cols, shift, curv, scale, mask, count))
        return out

    # -- evaluation ------------------------------------------------------------------------------
    def _walk(self, segs: list[Segment], u: torch.Tensor):
        """Yield ``(segment, contribution of u)`` from the last segment back, propagating ``u``."""
        for seg in reversed(segs):
            curv = [b.to(u.device) for b in seg.curvature]

            def funcs(b, s, seg=seg):
                eta_k = float(seg.eta_k[b.cols.start])
                return source_functions(s, eta_k, damping=self.damping + seg.shift[b.name])

            scale = None if seg.scale is None else seg.scale.to(u.device, u.dtype)
            w = u if scale is None else u * scale
            contrib = apply_blocks(curv, w, lambda b, s: funcs(b, s)[0])
            yield seg, (contrib if scale is None else contrib * scale)
            w = apply_blocks(curv, w, lambda b, s: funcs(b, s)[1])
            u = w if scale is None else w / scale

    def score_terms(self, store: StoreReader, queries: dict[int, torch.Tensor]) -> list[ScoreTerm]:
        segs = self.build(store)
        last = segs[-1].steps[-1]
        terms = []
        for seg, contrib in self._walk(segs, queries[last].float()):
            rw = _row_weight(seg, store.num_examples)
            for step, w in zip(seg.steps, seg.ck_weights, strict=True):
                q = contrib * w.to(contrib.device)
                terms.append(ScoreTerm(step, schema.TRAIN, q, row_weight=rw))
        return terms

    def query_steps(self, store: StoreReader) -> list[int]:
        return [self.used_checkpoints(store)[-1].global_step]

    def self_terms(self, store: StoreReader) -> list[SelfTerm]:
        segs = self.build(store)
        last = segs[-1].steps[-1]
        terms = []
        for li, seg in enumerate(segs):
            rw = _row_weight(seg, store.num_examples)
            for step, w in zip(seg.steps, seg.ck_weights, strict=True):

                def contribution(a, li=li, w=w):
                    for j, (_, c) in enumerate(self._walk(segs, a)):
                        if len(segs) - 1 - j == li:
                            return c * w
                    raise AssertionError("unreachable")

                terms.append(
                    SelfTerm(
                        last,
                        schema.TRAIN,
                        schema.TRAIN,
                        torch.ones(store.width),
                        apply=contribution,
                        row_weight=rw,
                        step_b=step,
                    )
                )
        return terms


def _row_weight(seg: Segment, n: int) -> torch.Tensor:
    w = torch.full((n,), 1.0 / seg.members) if seg.mask is None else seg.mask / seg.members
    return w.float()


def _expand(values: list[float], n: int) -> list[float]:
    return values if len(values) == n else [values[0]] * n


def preconditioned_curvature(
    curv: Curvature, scale: torch.Tensor, l2: torch.Tensor | None = None
) -> Curvature:
    """Eigendecompose ``H' = S (H̄ + diag(l2)) S`` per block, ``S = diag(scale)`` (``scale = D^½``).

    ``curv`` holds ``H̄``'s eigendecomposition (raw or Kronecker basis); ``l2`` is an optional ``[D]``
    L2 weight decay added before preconditioning (Adam's coupled decay). Returns raw blocks.
    """
    out: Curvature = []
    for b in curv:
        q = b.q if b.q is not None else torch.kron(b.q_s, b.q_a)
        h = (q * b.sigma.double().clamp_min(0)) @ q.T
        if l2 is not None:
            h = h + torch.diag(l2[b.cols].double())
        s = scale[b.cols].double()
        hp = s[:, None] * h * s[None, :]
        sigma, qp = torch.linalg.eigh(0.5 * (hp + hp.T))
        out.append(BlockEigen(b.name, b.cols, sigma, q=qp))
    return out


__all__ = ["Source", "phi1", "preconditioned_curvature", "source_functions"]
