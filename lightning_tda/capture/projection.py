"""Seeded random projections: the same (seed, module name, side) gives the same matrix anywhere.

Nothing is stored: the train side (logger) and the query side (scoring) regenerate identical
matrices from the seed rule recorded in the store.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from lightning_tda.errors import ConfigError

Distribution = Literal["orthogonal", "gaussian", "rademacher"]
ProjectionKind = Literal["kronecker", "exact"]
Basis = Literal["random", "pca"]


@dataclass(frozen=True)
class ProjectionConfig:
    """How each captured layer's gradient is compressed.

    Attributes:
        kind: ``"kronecker"`` stores ``P_out^T G P_in`` (LoGra style); ``"exact"`` stores ``G``.
        rank: default projected size of each side (``k_out = k_in = rank``); a side whose dimension
            is ``<= rank`` is kept exact (identity), since projecting up adds nothing.
        dims: per-layer override ``{module_name: (k_out, k_in)}``; ``0`` on a side means exact.
        distribution: ``"orthogonal"`` (default): ``sqrt(dim/k)`` times ``k`` Haar-random orthonormal
            columns, which estimates inner products with lower variance than i.i.d. entries;
            ``"gaussian"``: i.i.d. ``N(0, 1/k)``; ``"rademacher"``: i.i.d. ``±1/sqrt(k)``.
        seed: base seed; each matrix is seeded from ``(seed, module name, side)``.
        dense_dim: size of the dense ``torch.func`` projection of trainable parameters outside the
            captured layers (embeddings, norms); ``0`` skips those parameters.
        basis: ``"random"`` (default): seeded random matrices, nothing stored; ``"pca"``: top
            eigenvectors of each layer's K-FAC factors, fitted once at the first logged checkpoint
            on up to ``basis_examples`` examples and stored in the store (LoGra's PCA option; far
            better inner-product fidelity at small ranks, one extra pass).
        basis_examples: examples used to fit the ``"pca"`` basis.
        basis_tokens: token positions per example (drawn at random, seeded) that the ``"pca"``
            basis's factors use; ``None``: every position. The covariances cost ``2·tokens·(I² + O²)``
            per layer, more than training itself on wide layers; 16 positions (16,384 token rows at
            1024 examples) left the choosing-half LDS of the GPT and LoRA banks unchanged (0.248,
            0.423, 0.767 at 16 and at all 64) and cut gpt10m's basis pass from 18.6 s to 12.9 s.

    Raises:
        ConfigError: an invalid field (a ``ValueError`` and a ``MisconfigurationException``).
    """

    kind: ProjectionKind = "kronecker"
    rank: int = 16
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    distribution: Distribution = "orthogonal"
    seed: int = 0
    dense_dim: int = 0
    basis: Basis = "random"
    basis_examples: int = 1024
    basis_tokens: int | None = 16

    def __post_init__(self) -> None:
        if self.basis not in ("random", "pca"):
            raise ConfigError(f"basis must be 'random' or 'pca', got {self.basis!r}")
        if not _is_int(self.basis_examples) or self.basis_examples < 1:
            raise ConfigError(f"basis_examples must be a positive int, got {self.basis_examples!r}")
        if self.basis_tokens is not None and (
            not _is_int(self.basis_tokens) or self.basis_tokens < 1
        ):
            raise ConfigError(
                f"basis_tokens must be None (every token) or a positive int, got {self.basis_tokens!r}"
            )
        if self.kind not in ("kronecker", "exact"):
            raise ConfigError(f"projection must be 'kronecker' or 'exact', got {self.kind!r}")
        if self.distribution not in ("orthogonal", "gaussian", "rademacher"):
            raise ConfigError(
                f"distribution must be 'orthogonal', 'gaussian' or 'rademacher', got {self.distribution!r}"
            )
        if self.kind == "kronecker" and (not _is_int(self.rank) or self.rank < 1):
            raise ConfigError(f"rank must be a positive int, got {self.rank!r}")
        if not _is_int(self.dense_dim) or self.dense_dim < 0:
            raise ConfigError(f"dense_dim must be an int >= 0, got {self.dense_dim!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.dims, dict):
            raise ConfigError(
                f"dims must be a dict {{module_name: (k_out, k_in)}}, got {self.dims!r}"
            )
        for name, dims in self.dims.items():
            if (
                not isinstance(dims, (tuple, list))
                or len(dims) != 2
                or not all(_is_int(d) and d >= 0 for d in dims)
            ):
                raise ConfigError(
                    f"dims[{name!r}] must be a pair (k_out, k_in) of non-negative ints, got {dims!r}"
                )

    def side_dim(self, module_name: str, side: Literal["out", "in"], full: int) -> int:
        """Projected size of one side of a layer; returns ``full`` when that side stays exact."""
        if self.kind == "exact":
            return full
        if module_name in self.dims:
            k = int(self.dims[module_name][0 if side == "out" else 1])
        else:
            k = self.rank
        return full if k == 0 or k >= full else k

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dims"] = {k: list(v) for k, v in self.dims.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProjectionConfig:
        d = dict(d)
        d["dims"] = {k: tuple(v) for k, v in d.get("dims", {}).items()}
        return cls(**d)


def _is_int(v: object) -> bool:
    """True for a Python or NumPy integer, not a bool (``True`` would silently mean 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def stable_seed(seed: int, *names: str) -> int:
    """A 63-bit seed from ``seed`` and names, identical across processes and platforms."""
    h = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def projection_matrix(
    seed: int,
    name: str,
    side: str,
    dim: int,
    k: int,
    distribution: Distribution = "orthogonal",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random projection ``P`` of shape ``[dim, k]`` with ``E[P P^T] = I``.

    Generated on the CPU in float64 with its own generator (so results do not depend on the device
    or on the global RNG), then cast to float32 and moved to ``device``. Orthogonal columns come from
    a QR factorisation with the signs fixed by ``diag(R) > 0``, which makes them unique.

    Example:
        >>> p = projection_matrix(0, "layer", "in", 50, 8)
        >>> torch.allclose(p.T @ p, torch.eye(8) * 50 / 8, atol=1e-4)
        True
        >>> torch.equal(p, projection_matrix(0, "layer", "in", 50, 8))
        True
    """
    if k < 1 or dim < 1:
        raise ValueError(f"projection sizes must be positive, got dim={dim}, k={k}")
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name, side))
    if distribution == "rademacher":
        p = (
            torch.randint(0, 2, (dim, k), generator=gen, dtype=torch.int8).double() * 2 - 1
        ) / k**0.5
    else:
        p = torch.randn(dim, k, generator=gen, dtype=torch.float64)
        if distribution == "orthogonal" and k <= dim:  # orthogonal columns, scaled: E[P P^T] = I
            q, r = torch.linalg.qr(p)
            p = q * _signs(r) * (dim / k) ** 0.5
        elif distribution == "orthogonal":  # more columns than rows: orthonormal rows, P P^T = I
            q, r = torch.linalg.qr(p.T)
            p = (q * _signs(r)).T
        else:
            p = p / k**0.5
    p = p.float()
    return p.to(device) if device is not None else p


def _signs(r: torch.Tensor) -> torch.Tensor:
    """Column signs making ``diag(R) > 0``: the unique QR factorisation."""
    return torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(r.dtype)
