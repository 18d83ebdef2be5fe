"""One batch in, projected per-example gradients out; shared by the logger and the query side."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_tda.capture.basis import Bases, CachedBatch
from lightning_tda.capture.checks import _check_finite, _check_losses
from lightning_tda.capture.dense import DenseProjector
from lightning_tda.capture.hooks import LayerGradientHooks, Scales
from lightning_tda.capture.in_flight import capture_paused
from lightning_tda.capture.layers import DENSE, LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.capture.task import Task
from lightning_tda.data.ids import ExampleIds


@dataclass
class FeatureBatch:
    """Projected gradients of one batch.

    Attributes:
        ids: ``[B]`` int64 example ids (``None`` when the batch carries none and none were required).
        losses: ``[B]`` per-example losses.
        rows: ``[B, D]`` fp32 projected gradients.
        scaled: ``[B, D]`` fp32 projected preconditioned gradients, or ``None``.
    """

    ids: torch.Tensor | None
    losses: torch.Tensor
    rows: torch.Tensor
    scaled: torch.Tensor | None


class Featurizer:
    """Turns batches into :class:`FeatureBatch` es at the model's current weights.

    Args:
        model: the model to differentiate (left in whatever mode the caller set).
        layers: the layout (from :func:`discover_layers` or a store).
        config: the projection configuration.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, or a :class:`~lightning_tda.capture.task.Task`
            (its ``per_example_loss``).
        device: where projections live (the model's device).
        scales: optional factor-wise preconditioner per layer, plus ``"<dense>:<param>"`` entries
            (full-shape tensors) for dense parameters.
        require_ids: raise when a batch has no example ids.
        bases: stored projection bases (``ProjectionConfig.basis == "pca"``).
        covariances: accumulate projected K-FAC factors over every batch (see :meth:`take_covariances`).
        example_ids: where a batch keeps its ids (default: ``Indexed`` batches and the keys
            ``example_id``, ``idx``, ``index``, ``id``); ids passed to :meth:`__call__` win.
        compile_loss: ``torch.compile`` the per-example loss (``True``: inductor; a string: that
            backend); the layer hooks stay eager, so each captured layer ends a compiled region.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        config: ProjectionConfig,
        loss_fn: LossFn | Task,
        device: torch.device,
        scales: Scales | None = None,
        dense_scales: dict[str, torch.Tensor] | None = None,
        require_ids: bool = True,
        bases: Bases | None = None,
        covariances: bool = False,
        example_ids: ExampleIds | None = None,
        compile_loss: bool | str = False,
    ) -> None:
        self.model = model
        self.loss_fn = as_loss_fn(loss_fn)
        if compile_loss:  # the capture hooks run eagerly between compiled regions (graph breaks)
            backend = compile_loss if isinstance(compile_loss, str) else "inductor"
            self.loss_fn = torch.compile(self.loss_fn, backend=backend, dynamic=True)
        self.require_ids = require_ids
        self.example_ids = example_ids if example_ids is not None else ExampleIds()
        self.hooks = LayerGradientHooks(model, layers, config, device, scales, bases, covariances)
        dense = [s for s in layers if s.kind == DENSE]
        self.dense = DenseProjector(model, dense[0], config, device) if dense else None
        self.dense_scales = dense_scales
        self.scaled = scales is not None

    def take_covariances(self) -> dict[str, torch.Tensor]:
        """``{"<layer>/A": [k_in, k_in], "<layer>/S": [k_out, k_out]}`` token-averaged factors accumulated
        so far; stops accumulating (later batches, e.g. queries, are not counted)."""
        covs = self.hooks.covariances or {}
        self.hooks.covariances = None
        out = {}
        for name, c in covs.items():
            if c.tokens:
                out[f"{name}/A"], out[f"{name}/S"] = c.means()
        return out

    def ids_of(self, batch: Any) -> torch.Tensor | None:
        """``[B]`` ids of the user's ``batch`` (``None`` when it has none and none are required)."""
        if self.require_ids:
            return self.example_ids(batch)
        try:
            return self.example_ids.find(batch)
        except (ValueError, KeyError, IndexError, TypeError):  # queries need no ids
            return None

    def __call__(self, batch: Any, ids: torch.Tensor | None = None) -> FeatureBatch:
        """Rows of the user's ``batch`` (as its data yields it); ``ids``: its ``[B]`` ids when the
        library numbered the items itself, else they are read from the batch."""
        if ids is None:
            ids = self.ids_of(batch)
        with torch.enable_grad(), self.hooks:
            losses = self.loss_fn(self.model, batch)
            _check_losses(losses, ids)
            rows, scaled = self.hooks.projected_gradients(losses)
        if self.dense is not None:
            spec = self.dense.spec
            d_rows, d_scaled = self.dense(
                self.loss_fn, batch, self.dense_scales if self.scaled else None
            )
            rows[:, spec.offset : spec.offset + spec.size] = d_rows
            if scaled is not None:
                scaled[:, spec.offset : spec.offset + spec.size] = d_scaled
        return self._checked(ids, losses, rows, scaled)

    def from_kept(self, kept: CachedBatch) -> FeatureBatch:
        """The :class:`FeatureBatch` of a batch the PCA basis pass kept at the same weights: its layer
        inputs and output gradients projected, no forward or backward (equal to :meth:`__call__` on
        that batch). Needs a featurizer without a dense block."""
        if self.dense is not None:
            raise ValueError("kept basis-pass batches carry no dense-block gradients")
        rows, scaled = self.hooks.rows_from(kept.calls, kept.losses)
        return self._checked(kept.ids, kept.losses, rows, scaled)

    @staticmethod
    def _checked(
        ids: torch.Tensor | None,
        losses: torch.Tensor,
        rows: torch.Tensor,
        scaled: torch.Tensor | None,
    ) -> FeatureBatch:
        """The batch, after one device-side finiteness test of its rows (the per-example
        :class:`NonFiniteError` naming the examples only when it fails)."""
        ok = torch.isfinite(rows).all()
        if scaled is not None:
            ok = ok & torch.isfinite(scaled).all()
        if not ok:  # one host sync per batch (the rows go to the host for the store next anyway)
            _check_finite(rows, ids, "gradient")
            if scaled is not None:
                _check_finite(scaled, ids, "preconditioned gradient")
        return FeatureBatch(ids, losses.detach().float(), rows, scaled)


def as_loss_fn(loss: LossFn | Task) -> LossFn:
    """``loss_fn(model, batch) -> Tensor[B]`` of a task (its ``per_example_loss``) or a loss function."""
    return loss.per_example_loss if isinstance(loss, Task) else loss


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Run a block in eval mode and give back exactly the RNG streams and module modes it found.

    Restores the python, numpy, torch CPU and CUDA RNG states and every module's ``training``
    flag, so a sweep in the middle of ``fit`` cannot change what training does next; in-flight
    capture ignores the block's forwards (:func:`~lightning_tda.capture.in_flight.capture_paused`).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with preserved_rng(), capture_paused():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Give back the python, numpy, torch CPU and CUDA RNG states a block found (e.g. a DataLoader
    iterator draws its base seed from torch's global generator)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
