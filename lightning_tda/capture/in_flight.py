"""In-flight capture: per-example projected gradients from the training step's own forward and backward.

Forward hooks on the captured layers save the projected inputs ``x̃ = [x, 1] P_in`` of the user's
``training_step`` and register a gradient hook on the layer output; when the trainer back-propagates the
training loss, the hook receives ``δ`` (``[B, T, O]``) and adds ``Σ_t (δ_t P_out) x̃_t^T`` to the
example's row (LoGra, as in :mod:`lightning_tda.capture.hooks`). No extra forward or backward runs and
nothing touches ``.grad``, the RNG or the module modes.

The backward differentiates the *training* loss, not the per-example loss: if the training loss is
``L = c · Σ_b ℓ_b`` for a batch constant ``c`` (``1/B`` for a mean over examples, ``1/N_tok`` for a mean
over the batch's supervised tokens) and Lightning divides it by ``accumulate_grad_batches`` (``A``) and a
loss scaler multiplies it by ``S``, the hooked gradients are ``(c S / A) ∇ℓ_b``. :meth:`InFlightCapture.finish`
divides that factor out, so rows are the gradients of each example's own ``per_example_loss`` (summed
over its tokens), exactly what a sweep stores.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_tda.capture.hooks import LayerProjector, add_outer, build_projectors, project_input
from lightning_tda.capture.layers import DENSE, LayerSpec, row_width, unwrapped_module_names
from lightning_tda.capture.projection import ProjectionConfig

Reduction = str | Callable[[Any], float | torch.Tensor]
"""``"mean"``, ``"sum"`` or ``fn(batch) -> c`` with training loss ``= c · Σ_b per_example_loss_b``."""

REDUCTIONS = ("mean", "sum")
_PAUSED = [0]  # > 0 while a library pass (sweep, first-batch check, queries) runs inside a fit


@contextlib.contextmanager
def capture_paused() -> Iterator[None]:
    """No in-flight capture records the forwards of this block (they are the library's own passes,
    e.g. another logger's sweep or first-batch check during ``on_train_batch_start``, not training)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def token_mean(
    labels_key: str = "labels", ignore_index: int = -100, shift: bool = True
) -> Callable[[Any], float]:
    """Reduction of a training loss averaged over every supervised token of the batch.

    For a causal LM whose ``training_step`` returns ``F.cross_entropy(..., ignore_index=-100)`` over
    all the batch's tokens (Hugging Face's ``outputs.loss``), ``c = 1 / N_tok``.

    Args:
        labels_key: the batch key of the ``[B, T]`` labels.
        ignore_index: label value of unsupervised positions.
        shift: labels are shifted by one (next-token prediction: ``labels[:, 1:]`` are predicted).

    Example:
        >>> token_mean()({"labels": torch.tensor([[5, 6, -100], [7, 8, 9]])})
        0.3333333333333333
    """

    def factor(batch: Any) -> float:
        labels = batch[labels_key]
        if shift:
            labels = labels[:, 1:]
        n = int((labels != ignore_index).sum())
        if n == 0:
            raise ValueError(
                "token_mean: the batch has no supervised token (every label is ignored)"
            )
        return 1.0 / n

    return factor


def check_reduction(reduction: Reduction) -> None:
    """Raise a clear error for an invalid ``in_flight_reduction``."""
    if isinstance(reduction, str):
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"in_flight_reduction must be 'mean', 'sum' or a callable batch -> c, got {reduction!r}"
            )
    elif not callable(reduction):
        raise ValueError(
            "in_flight_reduction must be 'mean' (training loss = mean of per_example_loss over the batch), "
            f"'sum', or a callable batch -> c (e.g. lightning_tda.capture.in_flight.token_mean()); got {reduction!r}"
        )


def reduction_factor(reduction: Reduction, batch: Any, num_examples: int) -> float:
    """``c`` in ``training loss = c · Σ_b per_example_loss_b`` for one (micro-)batch."""
    if reduction == "mean":
        return 1.0 / num_examples
    if reduction == "sum":
        return 1.0
    c = reduction(batch)
    c = float(c.detach()) if isinstance(c, torch.Tensor) else float(c)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"in_flight_reduction returned c={c} for a batch; it must be a positive finite number with "
            "training loss = c * sum of per_example_loss over the batch"
        )
    return c


class InFlightCapture:
    """Hooks the captured layers of ``model`` and accumulates projected rows during training backward.

    Usage (per micro-batch)::

        capture.start(num_examples)   # before training_step's forward
        ...                           # the trainer runs forward and backward
        rows = capture.finish(scale)  # [B, D]: hooked gradients divided by c S / A

    Args:
        model: the model whose layers are hooked.
        layers: captured layers (no ``dense`` block: it needs per-example ``torch.func`` passes).
        config: the projection configuration.
        device: where the projection matrices live.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        config: ProjectionConfig,
        device: torch.device,
    ) -> None:
        if any(s.kind == DENSE for s in layers):
            raise ValueError("in-flight capture cannot project the dense (torch.func) block")
        self.model = model
        self.width = row_width(layers)
        self.projectors = build_projectors(layers, config, device)
        self._handles: list = []
        self._rows: torch.Tensor | None = None
        self._fired = 0

    @property
    def active(self) -> bool:
        return self._rows is not None

    def attach(self) -> None:
        """Register the forward hooks (idle until :meth:`start`)."""
        if self._handles:
            return
        modules = unwrapped_module_names(self.model)
        for name, proj in self.projectors.items():
            if name not in modules:
                raise KeyError(f"module {name!r} is not in the model")
            self._handles.append(modules[name].register_forward_hook(self._make_hook(proj)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rows = None

    def start(self, num_examples: int, device: torch.device) -> None:
        """Capture the next forward/backward of a micro-batch of ``num_examples`` examples."""
        self._rows = torch.zeros(num_examples, self.width, device=device)
        self._fired = 0

    def abort(self) -> None:
        self._rows = None

    def finish(self, factor: float) -> torch.Tensor | None:
        """Stop capturing; the micro-batch's rows ``[B, D]`` times ``factor``, or ``None`` if no
        gradient reached a captured layer (e.g. ``training_step`` returned ``None``)."""
        rows, fired = self._rows, self._fired
        self._rows = None
        if rows is None or fired == 0:
            return None
        return rows * factor

    def _make_hook(self, proj: LayerProjector):
        spec = proj.spec

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            rows = self._rows
            if (
                rows is None
                or _PAUSED[0]
                or not torch.is_grad_enabled()
                or not isinstance(output, torch.Tensor)
                or not output.requires_grad
            ):
                return
            xp = project_input(inputs[0], spec, proj.p_in)
            output.register_hook(partial(self._backward, proj, xp, rows))

        return hook

    def _backward(
        self, proj: LayerProjector, xp: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor
    ) -> None:
        spec = proj.spec
        b = rows.shape[0]
        if grad.shape[0] != b or xp.shape[0] != b:
            raise ValueError(
                f"GradientLogger(mode='in_flight'): layer {spec.name!r} saw a batch dimension of {grad.shape[0]} "
                f"but the training batch has {b} example ids; the model must keep the batch first "
                "(batch_first=True) and not mix examples."
            )
        d = grad.detach().float().reshape(b, -1, spec.out_features)
        dp = d if proj.p_out is None else d @ proj.p_out
        add_outer(rows, spec, dp, xp)
        self._fired += 1
