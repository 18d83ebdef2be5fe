"""The PCA basis pass's K-FAC factors: the bias block without a ones column, the token subsample
(``basis_tokens``) and the host memory cap on kept batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tda.capture import basis
from lightning_tda.capture.layers import discover_layers
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.errors import ConfigError


def test_gram_with_bias_equals_the_ones_column_product():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(50, 7, generator=g) for _ in range(3)]
    acc: dict[str, torch.Tensor] = {}
    for x in parts:
        basis._add_gram(acc, "layer", x, bias=True)
    ref = torch.cat([torch.cat([x, torch.ones(50, 1)], dim=1) for x in parts]).double()
    torch.testing.assert_close(acc["layer"].double(), ref.T @ ref, rtol=1e-5, atol=1e-4)


class _OneHotTokens(nn.Module):
    """A Linear whose input at (example b, position t) is the one-hot ``e_{bT+t}`` and whose loss
    gradient at position t is ``e_t``: ``A``'s diagonal marks the (b, t) used, ``S``'s counts each t."""

    def __init__(self, b: int, t: int) -> None:
        super().__init__()
        self.b, self.t = b, t
        self.lin = nn.Linear(b * t, t)

    def loss(self) -> torch.Tensor:
        x = torch.eye(self.b * self.t).reshape(self.b, self.t, -1)
        out = self.lin(x)  # [B, T, T]
        return out.diagonal(dim1=1, dim2=2).sum(dim=1)  # d loss_b / d out[b, t] = e_t


def _factors(b: int, t: int, tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    model = _OneHotTokens(b, t)
    layers, _ = discover_layers(model, ProjectionConfig(rank=2, basis="pca"))
    hooks = basis._CovarianceHooks(model, layers, tokens_per_example=tokens, seed=3)
    with torch.enable_grad(), hooks:
        hooks.backward(model.loss())
    return hooks.a["lin"], hooks.s["lin"]


def test_basis_tokens_picks_that_many_positions_per_example_for_both_factors():
    b, t, c = 5, 12, 4
    a, s = _factors(b, t, c)
    used = a.diagonal()[: b * t].reshape(b, t)  # 1 where (b, t) entered A, else 0
    assert set(used.unique().tolist()) == {0.0, 1.0}
    assert used.sum(dim=1).tolist() == [c] * b  # c distinct positions per example
    assert not torch.equal(used[0], used[1]) or not torch.equal(
        used[1], used[2]
    )  # random per example
    assert a[-1, -1] == b * c  # the bias entry counts the tokens used
    torch.testing.assert_close(s.diagonal(), used.sum(dim=0))  # S from the same positions as A
    again, _ = _factors(b, t, c)
    assert torch.equal(a, again)  # seeded


@pytest.mark.parametrize("tokens", [None, 12, 50])
def test_basis_tokens_at_or_above_the_sequence_length_uses_every_position(tokens):
    b, t = 3, 12
    a, s = _factors(b, t, tokens)
    assert torch.equal(a.diagonal()[: b * t], torch.ones(b * t))
    assert torch.equal(s.diagonal(), torch.full((t,), float(b)))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_basis_tokens_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match="basis_tokens"):
        ProjectionConfig(basis="pca", basis_tokens=bad)


def test_host_reuse_budget_is_capped_and_an_explicit_budget_wins():
    cpu = torch.device("cpu")
    assert 0 < basis.reuse_budget(cpu) <= basis.HOST_REUSE_CAP
    assert basis.reuse_budget(cpu, 5 * basis.HOST_REUSE_CAP) == 5 * basis.HOST_REUSE_CAP
    assert basis.reuse_budget(cpu, 0) == 0
