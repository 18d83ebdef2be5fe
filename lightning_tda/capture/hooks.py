"""Module hooks that turn one backward pass into projected per-example layer gradients.

For a layer with inputs ``x_t`` (``[B, T, I]``) and output gradients ``δ_t`` (``[B, T, O]``) the
per-example gradient of ``[W | b]`` is ``G = Σ_t δ_t [x_t, 1]^T``. The hooks project both sides first,
``x̃ = [x, 1] P_in`` and ``δ̃ = δ P_out``, and form ``G̃ = Σ_t δ̃_t x̃_t^T = P_out^T G P_in``
(``[B, k_out, k_in]``) without ever materialising ``G`` (LoGra, methods.md §4.1, §14.3).

Output gradients are taken with ``torch.autograd.grad`` on the hooked outputs, so parameter
``.grad`` fields are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_tda.capture.basis import Bases
from lightning_tda.capture.layers import DENSE, LayerSpec, row_width, unwrapped_module_names
from lightning_tda.capture.projection import ProjectionConfig, projection_matrix

# (a [O], b [I+1]): factor-wise preconditioner G ⊙ (a b^T), e.g. Adam's factored 1/sqrt(v) (methods.md §2.3)
Scales = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Record:
    x: torch.Tensor  # [B, T, k_in] projected input
    x_scaled: torch.Tensor | None  # [B, T, k_in] projected (b ⊙ input)
    output: torch.Tensor  # hooked module output, for autograd.grad


@dataclass
class ProjectedCovariance:
    """Running projected K-FAC factors of one layer (methods.md §8.7).

    ``A' = Σ_t x̃_t x̃_t^T`` (``[k_in, k_in]``) and ``S' = Σ_t δ̃_t δ̃_t^T`` (``[k_out, k_out]``) over
    every token of every example, from the loss-gradient backward (empirical Fisher).
    """

    a: torch.Tensor | None = None
    s: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """``x``: ``[B, T, k_in]`` projected inputs, ``d``: ``[B, T, k_out]`` projected output grads."""
        x2 = x.reshape(-1, x.shape[-1]).double()
        d2 = d.reshape(-1, d.shape[-1]).double()
        a, s = x2.T @ x2, d2.T @ d2
        self.a = a if self.a is None else self.a + a
        self.s = s if self.s is None else self.s + s
        self.tokens += x2.shape[0]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', S')`` averaged over tokens, fp32."""
        n = max(self.tokens, 1)
        return (self.a / n).float(), (self.s / n).float()


@dataclass
class LayerProjector:
    spec: LayerSpec
    p_out: torch.Tensor | None  # [O, k_out], None = exact
    p_in: torch.Tensor | None  # [I+1, k_in], None = exact
    records: list[_Record] = field(default_factory=list)


def layer_input(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """A captured layer's input as ``[B, T, in (+1 bias column)]`` fp32, detached."""
    x = x.detach().float()
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if spec.has_bias:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


def project_input(
    x: torch.Tensor, spec: LayerSpec, p_in: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``([x, 1] ⊙ scale) P_in`` as ``[B, T, k_in]`` fp32 from a layer input ``x`` ``[B, ..., I]``.

    One fused ``addmm`` per layer (``x P_in[:I] + P_in[I]``): the bias column is never materialised.
    ``p_in=None`` (exact input side) returns ``[x, 1] ⊙ scale`` itself; ``scale``: ``[I (+1)]``.
    """
    if p_in is None:
        full = layer_input(x, spec)
        return full if scale is None else full * scale
    w = p_in if scale is None else p_in * scale[:, None]
    b = x.shape[0]
    x2 = x.detach().reshape(-1, x.shape[-1]).to(w.dtype)
    out = torch.addmm(w[-1], x2, w[:-1]) if spec.has_bias else x2 @ w
    return out.reshape(b, -1, w.shape[1])


def add_outer(rows: torch.Tensor, spec: LayerSpec, dp: torch.Tensor, xp: torch.Tensor) -> None:
    """``rows[:, layer block] += Σ_t dp_t ⊗ xp_t`` per example, in place (one ``baddbmm``).

    Args:
        rows: ``[B, D]`` fp32 rows; the layer's ``k_out x k_in`` block is flattened row-major.
        dp: ``[B, T, k_out]`` projected output gradients; ``xp``: ``[B, T, k_in]`` projected inputs.
    """
    b = rows.shape[0]
    block = rows[:, spec.offset : spec.offset + spec.size].view(b, spec.k_out, spec.k_in)
    block.baddbmm_(dp.reshape(b, -1, spec.k_out).transpose(1, 2), xp.reshape(b, -1, spec.k_in))


def build_projectors(
    layers: list[LayerSpec],
    config: ProjectionConfig,
    device: torch.device,
    bases: Bases | None = None,
) -> dict[str, LayerProjector]:
    """Projection matrices per layer: stored ``bases`` (PCA) if given, else regenerated from the seed."""
    if config.basis == "pca" and bases is None:
        raise ValueError("this projection uses a fitted PCA basis; pass the store's bases")
    out = {}
    for s in layers:
        if s.kind == DENSE:
            continue
        if bases is not None:
            p_out, p_in = bases[s.name]
            out[s.name] = LayerProjector(
                s,
                None if p_out is None else p_out.to(device),
                None if p_in is None else p_in.to(device),
            )
            continue
        p_out = (
            None
            if s.exact_out
            else projection_matrix(
                config.seed, s.name, "out", s.out_features, s.k_out, config.distribution, device
            )
        )
        p_in = (
            None
            if s.exact_in
            else projection_matrix(
                config.seed, s.name, "in", s.in_features, s.k_in, config.distribution, device
            )
        )
        out[s.name] = LayerProjector(s, p_out, p_in)
    return out


class LayerGradientHooks:
    """Context manager hooking the captured layers of ``model``.

    Usage::

        with LayerGradientHooks(model, layers, config) as hooks:
            losses = loss_fn(model, batch)              # [B]
            rows, scaled = hooks.projected_gradients(losses)   # [B, D_layers]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        config: ProjectionConfig,
        device: torch.device,
        scales: Scales | None = None,
        bases: Bases | None = None,
        covariances: bool = False,
    ) -> None:
        self.model = model
        self.layers = [s for s in layers if s.kind != DENSE]
        self.width = row_width(layers)
        self.projectors = build_projectors(self.layers, config, device, bases)
        self.scales = scales
        self.covariances: dict[str, ProjectedCovariance] | None = (
            {s.name: ProjectedCovariance() for s in self.layers} if covariances else None
        )
        self._handles: list = []

    def __enter__(self) -> LayerGradientHooks:
        modules = unwrapped_module_names(self.model)  # (FSDP1 / checkpoint wrappers looked through)
        for name, proj in self.projectors.items():
            if name not in modules:
                raise KeyError(f"module {name!r} is not in the model")
            self._handles.append(modules[name].register_forward_hook(self._make_hook(proj)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        for proj in self.projectors.values():
            proj.records.clear()

    def _make_hook(self, proj: LayerProjector):
        spec = proj.spec

        @torch.compiler.disable  # under a compiled loss: a graph break, the output a real tensor
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if (
                not torch.is_grad_enabled()
                or not isinstance(output, torch.Tensor)
                or not output.requires_grad
            ):
                return
            x = inputs[0]
            xs = None
            if self.scales is not None:
                xs = project_input(x, spec, proj.p_in, self.scales[spec.name][1])
            xp = project_input(x, spec, proj.p_in)
            proj.records.append(_Record(xp, xs, output))

        return hook

    def projected_gradients(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backward ``losses.sum()`` to the hooked outputs and project.

        Args:
            losses: ``[B]`` per-example losses from a forward pass run inside this context.

        Returns:
            ``(rows, scaled_rows)``: ``[B, D]`` fp32 (dense block columns left at zero) and the same for
            the factor-wise scaled gradients (``None`` without ``scales``).
        """
        return self.project(losses, self.output_gradients(losses))

    def output_gradients(self, losses: torch.Tensor) -> list:
        """Backward ``losses.sum()`` to the hooked outputs: ``[(projector, x̃, x̃_scaled, grad or None)]``
        per recorded call (``None``: the loss does not reach that call's output)."""
        records = [(p, r) for p in self.projectors.values() for r in p.records]
        grads = (
            torch.autograd.grad(losses.sum(), [r.output for _, r in records], allow_unused=True)
            if records
            else ()
        )
        self.clear()
        return [(p, r.x, r.x_scaled, g) for (p, r), g in zip(records, grads, strict=True)]

    def project(
        self, losses: torch.Tensor, items: list
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows (and scaled rows) of the ``[B]`` ``losses`` from :meth:`output_gradients`' items."""
        return self._project(losses.shape[0], items, losses)

    def rows_from(
        self, calls: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], losses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`projected_gradients` of the ``[B]`` ``losses`` from kept layer inputs and output gradients
        (``{layer: [(input [B, ..., I], grad [B, ..., O] or None), ...]}`` in call order, e.g. the PCA
        basis pass's at the same weights), without a forward or backward."""
        items = []
        for name, proj in self.projectors.items():
            for x, g in calls.get(name, ()):
                xs = None
                if self.scales is not None:
                    xs = project_input(x, proj.spec, proj.p_in, self.scales[name][1])
                items.append((proj, project_input(x, proj.spec, proj.p_in), xs, g))
        return self._project(losses.shape[0], items, losses)

    def _project(
        self, b: int, items: list, losses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows from ``[(projector, x̃ [B,T,k_in], x̃_scaled or None, output grad or None), ...]``."""
        rows = losses.new_zeros(b, self.width, dtype=torch.float32)
        scaled = rows.clone() if self.scales is not None else None
        for proj, x, x_scaled, g in items:
            if g is None:
                continue
            spec = proj.spec
            if g.shape[0] != b or x.shape[0] != b:
                raise ValueError(
                    f"layer {spec.name!r} saw a batch dimension of {g.shape[0]} but the loss has {b} examples; "
                    "the model must keep the batch first (batch_first=True) and not mix examples."
                )
            d = g.detach().float().reshape(b, -1, spec.out_features)
            dp = d if proj.p_out is None else d @ proj.p_out
            add_outer(rows, spec, dp, x)
            if self.covariances is not None:
                self.covariances[spec.name].add(x, dp)
            if scaled is not None:
                ds = d * self.scales[spec.name][0]
                ds = ds if proj.p_out is None else ds @ proj.p_out
                add_outer(scaled, spec, ds, x_scaled)
        return rows, scaled
