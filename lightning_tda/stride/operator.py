"""Steering operators: a frozen model's logits plus a low-rank, per-subset perturbation.

``õ_k(x) = o_x + B_ψ(h_x) a_k`` (methods.md §12.2): ``h_x`` is read by a forward hook at a chosen layer,
``B_ψ`` is a shared ``Linear(d_h, r)``, ``a_k`` is subset ``k``'s ``[r, C]`` head. The heads start at
zero, so every steered model equals the base model exactly at initialisation. When ``K * r * C`` is
large (LM vocabularies), ``a_k = c_k W`` is factored through a shared ``[r', C]`` matrix ``W`` with
per-subset ``[r, r']`` cores ``c_k`` (zero-initialised).

Features are normalised to a token axis: classifiers give ``h [B, 1, d_h]``, ``o [B, 1, C]``,
``targets [B, 1]``; causal LMs give ``[B, T', ·]`` with ``-100`` masks. A per-example loss is the SUM
over supervised tokens (methods.md §14.4).

The targets and their alignment are never guessed from the batch: they come from
``task.targets(model, batch) -> Targets(values, shift)`` (:mod:`lightning_tda.capture.task`).
``values [B]`` are class ids; ``values [B, T]`` with ``shift=True`` are Hugging Face labels (the output
at ``t`` predicts ``values[:, t + 1]``, so ``T' = T - 1``), with ``shift=False`` they are already aligned
with the outputs (nanoGPT ``(x, y)``, ``T' = T``). A module that declares nothing, with no task, is
a :class:`~lightning_tda.errors.ConfigError` naming ``task=CausalLMTask(labels='hf' | 'shifted')`` /
``ClassificationTask()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.task import LossFnTask, Targets, Task, missing_targets_error
from lightning_tda.data.indexed import EXAMPLE_ID_KEY
from lightning_tda.errors import ConfigError

IGNORE = -100
INPUT_SUFFIX = ":input"
TargetsFn = Callable[[Any], Targets]
"""An explicit override of the task's targets: ``targets_fn(batch) -> Targets(values, shift)``."""


def _is_projectable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def output_module_name(model: nn.Module) -> str:
    """Default logits module: the last ``Linear``/``Conv1D`` in registration order."""
    names = [n for n, m in model.named_modules() if _is_projectable(m)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv1D module to read logits from; pass output_module="
        )
    return names[-1]


RESIDUAL_DEPTH = 0.63
"""Where :func:`default_layer` reads a transformer's residual stream: after block ``round(0.63·L)`` of
``L`` (the paper's 60-67 % depth; at least the first block)."""


def transformer_blocks(model: nn.Module) -> list[str]:
    """Module names of the model's repeated blocks: the longest ``nn.ModuleList`` of two or more
    children of one class that each hold a Linear/Conv1D (``transformer.h``, ``model.layers`` ...);
    ``[]`` when there is none."""
    best: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len(mod) <= len(best):
            continue
        kids = list(mod)
        same = all(type(k) is type(kids[0]) for k in kids)
        if same and all(any(_is_projectable(m) for m in k.modules()) for k in kids):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(kids))]
    return best


def default_layer(model: nn.Module, output: str) -> str:
    """Default activation layer ``h``.

    A model with repeated blocks (:func:`transformer_blocks`): the residual stream after block
    ``max(1, round(RESIDUAL_DEPTH·L))`` of ``L`` (the block module's output, as the paper reads it).
    Otherwise, with fewer than 3 Linear/Conv1D modules below the output module (small MLPs): the
    *input* of the output module (the penultimate representation, ``"<output>:input"``); else the
    output of the Linear/Conv1D module at about 2/3 depth among those modules.
    """
    blocks = transformer_blocks(model)
    if blocks:
        return blocks[max(1, round(RESIDUAL_DEPTH * len(blocks))) - 1]
    names = [n for n, m in model.named_modules() if _is_projectable(m) and n != output]
    if len(names) < 3:
        return output + INPUT_SUFFIX
    return names[min(len(names) - 1, round(2 * len(names) / 3) - 1)]


def batch_targets(
    model: nn.Module, batch: Any, task: Task | None = None, targets_fn: TargetsFn | None = None
) -> Targets:
    """The targets of ``batch`` with their alignment: ``targets_fn(batch)`` (an explicit override)
    if given, else ``task.targets(model, batch)`` (default: the module's own ``targets(batch)``,
    which raises naming ``task=`` when the module declares none). Never inferred from the batch."""
    if targets_fn is None:
        return (Task() if task is None else task).targets(model, batch)
    out = targets_fn(batch)
    if not isinstance(out, Targets):
        raise ConfigError(
            f"targets_fn(batch) must return lightning_tda.Targets(values, shift), got "
            f"{type(out).__name__}: a plain tensor is ambiguous ([B, T] token ids may be Hugging Face "
            "labels, shift=True, or targets already aligned with the outputs, shift=False). Return "
            "Targets(values, shift=...), or pass task=CausalLMTask(labels='hf' | 'shifted') / "
            "ClassificationTask() instead."
        )
    return out


def check_targets_declared(
    model: nn.Module, task: Task | None, targets_fn: TargetsFn | None = None
) -> None:
    """Raise before any work when nothing says the targets: no ``targets_fn``, the module's own task
    (or a ``loss_fn`` one) and a module without ``targets(batch)``."""
    own = task is None or type(task) in (Task, LossFnTask)
    if targets_fn is None and own and not callable(getattr(model, "targets", None)):
        raise missing_targets_error(model)


def feature_forward(model: nn.Module, task: Task | None, loss_fn: LossFn | None = None) -> LossFn:
    """What STRIDE runs once per batch so its hooks read ``h`` and the logits: ``loss_fn`` if given,
    a ``loss_fn`` task's function, else the module's own ``per_example_loss`` (the forward it was
    trained with) when it has one, else the task's training loss."""
    if loss_fn is not None:
        return loss_fn
    if isinstance(task, LossFnTask):
        return task.loss_fn
    if task is None or callable(getattr(model, "per_example_loss", None)):
        return Task().per_example_loss
    return task.per_example_loss


def align(
    h: torch.Tensor, o: torch.Tensor, targets: Targets
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [B, T', d_h], o [B, T', C], targets [B, T'])`` on a common token axis (see the module
    docstring): class ids get ``T' = 1``; token targets are shifted only when ``targets.shift``."""
    t = torch.as_tensor(targets.values)
    if t.dim() == 1 and o.dim() == 2:
        return h.reshape(h.shape[0], 1, -1), o.unsqueeze(1), t.reshape(-1, 1)
    if t.dim() != 2 or h.dim() != 3 or o.dim() != 3:
        raise ConfigError(
            f"targets of shape {tuple(t.shape)} need [B] class ids (logits [B, C]) or [B, T] token "
            f"ids (activations and logits [B, T, .]); got activations {tuple(h.shape)} and logits "
            f"{tuple(o.shape)}"
        )
    if targets.shift:
        h, o, t = h[:, :-1], o[:, :-1], t[:, 1:]
    if tuple(t.shape) != tuple(o.shape[:2]):
        raise ConfigError(
            f"token targets {tuple(t.shape)} (shift={targets.shift}) do not line up with the logits "
            f"{tuple(o.shape[:2])} [B, T]; check the task's label convention"
        )
    return h, o, t


def batch_ids(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        ids = batch.get(EXAMPLE_ID_KEY)
    else:
        ids = getattr(batch, "example_id", None)
    return None if ids is None else torch.as_tensor(ids).reshape(-1).cpu()


@dataclass
class Features:
    """Frozen-model features of a batch. ``h [B, T, d_h]``, ``o [B, T, C]``, ``targets [B, T]``."""

    h: torch.Tensor
    o: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor | None


@contextlib.contextmanager
def _capture(model: nn.Module, layer: str, output: str) -> Iterator[dict[str, torch.Tensor]]:
    mods = dict(model.named_modules())
    want_input = layer.endswith(INPUT_SUFFIX)
    lname = layer[: -len(INPUT_SUFFIX)] if want_input else layer
    for n in (lname, output):
        if n not in mods:
            raise KeyError(f"module {n!r} not found in {type(model).__name__}")
    got: dict[str, torch.Tensor] = {}
    if want_input:
        h1 = mods[lname].register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0]))
    else:
        h1 = mods[lname].register_forward_hook(
            lambda m, a, out: got.__setitem__("h", _hidden_states(out, lname))
        )
    h2 = mods[output].register_forward_hook(lambda m, a, out: got.__setitem__("o", out))
    try:
        yield got
    finally:
        h1.remove()
        h2.remove()


def _hidden_states(out: Any, name: str) -> torch.Tensor:
    """A module's output as ``h``: the tensor itself, or the first element of a block's tuple /
    ``ModelOutput`` (``(hidden_states, present, ...)``)."""
    if isinstance(out, torch.Tensor):
        return out
    first = (
        out[0]
        if isinstance(out, (tuple, list)) and out
        else getattr(out, "last_hidden_state", None)
    )
    if first is None and hasattr(out, "to_tuple"):
        first = out.to_tuple()[0]
    if not isinstance(first, torch.Tensor):
        raise ConfigError(
            f"module {name!r} returns {type(out).__name__}, not a tensor or a tuple led by one; pass "
            "StrideConfig(layer=...) naming a module that outputs the hidden states [B, T, d]"
        )
    return first


@torch.no_grad()
def extract(
    model: nn.Module,
    batch: Any,
    layer: str,
    output: str,
    loss_fn: LossFn,
    targets_fn: TargetsFn | None = None,
    *,
    task: Task | None = None,
) -> Features:
    """Run ``loss_fn(model, batch)`` once, read ``h`` and the logits ``o`` by hooks, and align them
    with the batch's targets (:func:`batch_targets`: ``targets_fn``, else ``task``'s)."""
    was = model.training
    model.eval()
    try:
        with _capture(model, layer, output) as got:
            loss_fn(model, batch)
    finally:
        model.train(was)
    if "h" not in got or "o" not in got:
        raise RuntimeError(f"the forward pass did not run through {layer!r} and {output!r}")
    h, o = got["h"].detach().float(), got["o"].detach().float()
    h, o, t = align(h, o, batch_targets(model, batch, task, targets_fn))
    return Features(h, o, t.to(o.device).long(), batch_ids(batch))


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example CE summed over supervised tokens. ``logits [..., T, C]``, ``targets`` broadcastable
    to ``[..., T]`` -> ``[...]``."""
    targets = targets.expand(logits.shape[:-1])
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return tok.view(targets.shape).sum(-1)


class SteeringOperators(nn.Module):
    """``K`` steering operators sharing a low-rank basis.

    Args:
        num_subsets: ``K``.
        d_h: activation width at the chosen layer.
        num_outputs: ``C`` (classes, or vocabulary size).
        rank: ``r`` of the basis.
        head_rank: ``r'`` of the factored heads; ``None`` picks full ``[r, C]`` heads when
            ``K * r * C <= 2**24`` and ``r' = r`` otherwise.
    """

    def __init__(
        self,
        num_subsets: int,
        d_h: int,
        num_outputs: int,
        rank: int = 16,
        head_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.num_subsets, self.rank, self.num_outputs = (
            int(num_subsets),
            int(rank),
            int(num_outputs),
        )
        self.basis = nn.Linear(int(d_h), self.rank)
        if head_rank is None and self.num_subsets * self.rank * self.num_outputs <= 2**24:
            self.heads = nn.Parameter(torch.zeros(self.num_subsets, self.rank, self.num_outputs))
            self.out = None
        else:
            rr = int(head_rank or rank)
            self.heads = nn.Parameter(torch.zeros(self.num_subsets, self.rank, rr))
            self.out = nn.Parameter(torch.randn(rr, self.num_outputs) / rr**0.5)

    def head(self, ks: torch.Tensor | slice) -> torch.Tensor:
        """``[S, r, C]`` heads of subsets ``ks``."""
        a = self.heads[ks]
        return a if self.out is None else a @ self.out

    def delta(self, h: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """Per-subset perturbation: ``h [S, B, T, d_h]``, ``ks [S]`` -> ``[S, B, T, C]``."""
        return torch.einsum("sbtr,src->sbtc", self.basis(h), self.head(ks))

    def steered(self, o: torch.Tensor, h: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """``õ_k = o + B(h) a_k`` for subsets ``ks`` (``o, h``: ``[S, B, T, ·]``)."""
        return o + self.delta(h, ks)

    @torch.no_grad()
    def measure(self, feats: Features, chunk: int = 64) -> torch.Tensor:
        """``y [B, K]``: ``loss_base - loss_k`` of every example under every operator (no gradients)."""
        base = token_ce(feats.o, feats.targets)  # [B]
        code = self.basis(feats.h)  # [B, T, r]
        out = []
        for s in range(0, self.num_subsets, chunk):
            a = self.head(slice(s, s + chunk))  # [c, r, C]
            logits = feats.o.unsqueeze(0) + torch.einsum("btr,krc->kbtc", code, a)
            out.append(base.unsqueeze(0) - token_ce(logits, feats.targets.unsqueeze(0)))
        return torch.cat(out).T.contiguous()


@contextlib.contextmanager
def steered_model(
    model: nn.Module, operators: SteeringOperators, k: int, layer: str, output: str
) -> Iterator[nn.Module]:
    """``model`` whose ``output`` module returns ``o + B(h) a_k`` (for inspection and tests)."""
    mods = dict(model.named_modules())
    with _capture(model, layer, output) as got:

        def hook(m, a, out):
            h = got["h"]
            d = operators.basis(h.float()) @ operators.head(torch.tensor([k]))[0]
            return out + d.to(out.dtype)

        handle = mods[output].register_forward_hook(hook)
        try:
            yield model
        finally:
            handle.remove()
