"""``Task``: what the library must know about the user's model and batches, in one object.

kronfluence's ``Task``, Lightning-shaped: by default every answer comes from the user's own
LightningModule (``per_example_loss(batch)``, optionally ``query_measurement(batch)`` and
``targets(batch)``), so nothing changes in a module that already defines them. Built-in tasks say the
rest explicitly for common batch shapes; none of them guesses a convention:

- :class:`ClassificationTask`: ``(x, y)`` batches (positions or keys), ``loss`` or ``margin`` queries.
- :class:`CausalLMTask`: ``labels="hf"`` (Hugging Face: ``labels`` unshifted, the shift happens inside
  the loss) or ``labels="shifted"`` (nanoGPT: ``(x, y)`` with ``y = x`` shifted by one). Required.

Every entry point (sweep, in-flight, ``attribute``, ``self_influence``, STRIDE, report, panels) takes
the same task; :meth:`Task.settings` is recorded in the store and built-in tasks are rebuilt from it
(:func:`task_from_settings`).

>>> task = CausalLMTask(labels="shifted")
>>> x = torch.tensor([[5, 6, 7]]); y = torch.tensor([[6, 7, 8]])
>>> t = task.targets(None, (x, y))
>>> t.values.tolist(), t.shift
([[6, 7, 8]], False)
>>> task_from_settings(task.settings()) == task
True
>>> CausalLMTask(labels="auto")
Traceback (most recent call last):
...
lightning_tda.errors.ConfigError: CausalLMTask(labels=...) must be 'hf' (Hugging Face labels: unshifted, shifted inside the loss) or 'shifted' ((x, y) pairs with y = x shifted by one), got 'auto'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tda.capture.losses import LossFn, causal_lm_loss
from lightning_tda.data.indexed import Indexed
from lightning_tda.data.targets import Targets
from lightning_tda.errors import ConfigError

LabelConvention = Literal["hf", "shifted"]
Measurement = Literal["loss", "margin"]
Field = int | str
"""A batch field: a tuple position or a mapping key."""
IGNORE_INDEX = -100


def missing_loss_error(model: nn.Module) -> ConfigError:
    """The error for a module without ``per_example_loss`` under the module's own task."""
    return ConfigError(
        f"{type(model).__name__} has no per_example_loss(batch) -> Tensor[B]. Define it on the "
        "LightningModule (sequence losses summed over supervised tokens), or pass a task: "
        "task=ClassificationTask() / CausalLMTask(labels='hf' | 'shifted'), or loss_fn=..."
    )


def missing_targets_error(model: nn.Module) -> ConfigError:
    """The error for a module that declares no ``targets(batch)`` under the module's own task."""
    return ConfigError(
        f"STRIDE needs the targets of each batch and their label convention, and "
        f"{type(model).__name__} does not say them. Pass task=CausalLMTask(labels='hf') (Hugging "
        "Face labels, shifted inside the loss), task=CausalLMTask(labels='shifted') ((x, y) with y "
        "= x shifted by one) or task=ClassificationTask(), or define targets(batch) -> "
        "lightning_tda.Targets on the module."
    )


class Task:
    """The user's LightningModule answers (the default task).

    The module defines ``per_example_loss(batch) -> Tensor[B]`` (sequence losses SUMMED over
    supervised tokens) and may define ``query_measurement(batch) -> Tensor[B]`` (what a query
    measures; default: its loss) and ``targets(batch) -> Targets`` (for STRIDE).
    """

    name: ClassVar[str] = "module"

    def per_example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[B]`` per-example training losses of ``batch``."""
        fn = getattr(model, "per_example_loss", None)
        if not callable(fn):
            raise missing_loss_error(model)
        return fn(batch)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[B]`` query measurements (score > 0: the training example lowers it); default the loss."""
        fn = getattr(model, "query_measurement", None)
        return fn(batch) if callable(fn) else self.per_example_loss(model, batch)

    def targets(self, model: nn.Module, batch: Any) -> Targets:
        """The targets of ``batch`` and their alignment, for STRIDE."""
        fn = getattr(model, "targets", None)
        if callable(fn):
            out = fn(batch)
            if not isinstance(out, Targets):
                raise ConfigError(
                    f"{type(model).__name__}.targets(batch) must return lightning_tda.Targets(values, "
                    f"shift), got {type(out).__name__}"
                )
            return out
        raise missing_targets_error(model)

    def render(self, item: Any) -> Any | None:
        """How the report and panels show a dataset item; ``None``: the default rendering."""
        return None

    def settings(self) -> dict[str, Any]:
        """JSON-able description, recorded in the store (``task`` root attribute)."""
        return {"task": self.name}


@dataclass(frozen=True)
class LossFnTask(Task):
    """A ``loss_fn(model, batch) -> Tensor[B]`` as the task (the ``loss_fn=`` keyword).

    Not rebuilt from a store: the function itself is not recorded, only its name.
    """

    loss_fn: LossFn
    name: ClassVar[str] = "loss_fn"

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ConfigError(
                f"loss_fn must be callable as loss_fn(model, batch) -> Tensor[B], got {self.loss_fn!r}"
            )

    def per_example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_fn(model, batch)

    def settings(self) -> dict[str, Any]:
        fn = self.loss_fn
        return {"task": self.name, "loss_fn": getattr(fn, "__qualname__", type(fn).__name__)}


def _user_batch(batch: Any) -> Any:
    """The batch without the ``Indexed`` wrapper an :class:`~lightning_tda.IndexedDataset` added."""
    return batch.data if isinstance(batch, Indexed) else batch


def _field(batch: Any, where: Field, what: str) -> Any:
    batch = _user_batch(batch)
    try:
        return batch[where]
    except (KeyError, IndexError, TypeError):
        shape = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(
            f"the batch has no {what} at {where!r} (batch: {shape}); set the task's {what} field to "
            "the tuple position or mapping key that holds it"
        ) from None


@dataclass(frozen=True)
class _FieldTask(Task):
    """A built-in task reading named fields of the batch and calling ``model(inputs)``."""

    forward: Callable[[nn.Module, Any], torch.Tensor] | None = field(default=None, kw_only=True)
    """Keyword-only: ``CausalLMTask("shifted")`` is the label convention, never a forward."""

    def _check_forward(self) -> None:
        if self.forward is not None and not callable(self.forward):
            raise ConfigError(
                f"{type(self).__name__}(forward=...) must be callable as forward(model, batch) -> "
                f"logits, got {self.forward!r}"
            )

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.forward is not None:
            return self.forward(model, batch)
        out = model(_field(batch, self.inputs, "inputs"))
        return getattr(out, "logits", out)

    def settings(self) -> dict[str, Any]:
        values = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("forward", "tokenizer")
        }
        custom = self.forward is not None
        return {"task": self.name, **values, **({"forward": "custom"} if custom else {})}


@dataclass(frozen=True)
class ClassificationTask(_FieldTask):
    """``logits = model(batch[inputs])`` against ``batch[targets]``.

    Args:
        inputs, targets_at: tuple positions or mapping keys of the inputs and the class ids ``[B]``.
        measurement_kind: ``"loss"`` (cross-entropy) or ``"margin"`` (``-(z_y - max_{c != y} z_c)``, so a
            positive score raises the query's margin).
        image_shape: render a flattened input as an image of this shape in the report and panels.
        mean, std: per-feature statistics the inputs were standardised with; the report shows
            ``x * std + mean``.
        forward: ``forward(model, batch) -> logits [B, C]`` when ``model(inputs)`` is not it.
    """

    inputs: Field = 0
    targets_at: Field = 1
    measurement_kind: Measurement = "loss"
    image_shape: tuple[int, ...] | None = None
    mean: tuple[float, ...] | float | None = None
    std: tuple[float, ...] | float | None = None
    name: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        self._check_forward()
        if self.measurement_kind not in ("loss", "margin"):
            raise ConfigError(
                f"ClassificationTask(measurement_kind=...) must be 'loss' or 'margin', got "
                f"{self.measurement_kind!r}"
            )

    def per_example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        y = _field(batch, self.targets_at, "targets_at")
        return F.cross_entropy(self.logits(model, batch).float(), y, reduction="none")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.measurement_kind == "loss":
            return self.per_example_loss(model, batch)
        z = self.logits(model, batch).float()
        y = _field(batch, self.targets_at, "targets_at")
        true = z.gather(1, y[:, None]).squeeze(1)
        other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return other - true

    def targets(self, model: nn.Module, batch: Any) -> Targets:
        return Targets(_field(batch, self.targets_at, "targets_at"), shift=False)

    def render(self, item: Any) -> Any | None:
        if self.image_shape is None and self.mean is None:
            return None
        x = torch.as_tensor(_field(item, self.inputs, "inputs"), dtype=torch.float32)
        if self.std is not None:
            x = x * torch.as_tensor(self.std, dtype=torch.float32)
        if self.mean is not None:
            x = x + torch.as_tensor(self.mean, dtype=torch.float32)
        return x.reshape(self.image_shape) if self.image_shape is not None else x


@dataclass(frozen=True)
class CausalLMTask(_FieldTask):
    """Next-token prediction with an explicit label convention (never inferred).

    Args:
        labels: ``"hf"``: Hugging Face batches, ``batch[label_key]`` unshifted (``-100`` masked), the
            output at ``t`` predicts label ``t + 1``; ``"shifted"``: ``(x, y)`` pairs whose targets
            ``batch[label_key]`` are already aligned with the outputs (``y = x`` shifted by one).
        inputs, label_key: where the token ids and the labels are (defaults: ``"input_ids"`` /
            ``"labels"`` for ``"hf"``, ``0`` / ``1`` for ``"shifted"``).
        tokenizer: decodes an example's token ids for the report and the W&B panels
            (``tokenizer.decode``; padding dropped by ``attention_mask``); not recorded in the store.
        forward: ``forward(model, batch) -> logits [B, T, V]`` when ``model(inputs)`` is not it
            (``"hf"`` default: ``model(input_ids=..., attention_mask=...)``).
    """

    labels: LabelConvention | None = None
    inputs: Field | None = None
    label_key: Field | None = None
    tokenizer: Any = field(default=None, kw_only=True, compare=False, repr=False)
    name: ClassVar[str] = "causal_lm"

    def __post_init__(self) -> None:
        self._check_forward()
        if self.labels not in ("hf", "shifted"):
            raise ConfigError(
                "CausalLMTask(labels=...) must be 'hf' (Hugging Face labels: unshifted, shifted inside "
                "the loss) or 'shifted' ((x, y) pairs with y = x shifted by one), got "
                f"{self.labels!r}"
            )
        hf = self.labels == "hf"
        if self.inputs is None:
            object.__setattr__(self, "inputs", "input_ids" if hf else 0)
        if self.label_key is None:
            object.__setattr__(self, "label_key", "labels" if hf else 1)

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        data = _user_batch(batch)
        if self.forward is None and self.labels == "hf" and isinstance(data, Mapping):
            kwargs = {"input_ids": _field(data, self.inputs, "inputs")}
            if "attention_mask" in data:
                kwargs["attention_mask"] = data["attention_mask"]
            out = model(**kwargs)
            return getattr(out, "logits", out)
        return super().logits(model, batch)

    def render(self, item: Any) -> Any | None:
        """The example's text through the tokenizer (``None`` without one: default rendering)."""
        if self.tokenizer is None:
            return None
        data = _user_batch(item)
        ids = torch.as_tensor(_field(data, self.inputs, "inputs")).reshape(-1)
        if isinstance(data, Mapping) and "attention_mask" in data:
            ids = ids[torch.as_tensor(data["attention_mask"]).reshape(-1).bool()]
        return self.tokenizer.decode(ids.tolist())

    def per_example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        t = self.targets(model, batch)
        return causal_lm_loss(self.logits(model, batch), t.values, IGNORE_INDEX, shift=t.shift)

    def targets(self, model: nn.Module | None, batch: Any) -> Targets:
        values = _field(batch, self.label_key, "label_key")
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            shape = (
                tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            )
            raise ConfigError(
                f"CausalLMTask(labels={self.labels!r}) expects [B, T] token targets at "
                f"{self.label_key!r}, got {shape}"
            )
        return Targets(values, shift=self.labels == "hf")


_BUILT_IN: dict[str, type[Task]] = {"classification": ClassificationTask, "causal_lm": CausalLMTask}


def task_from_settings(settings: Mapping[str, Any]) -> Task | None:
    """The built-in task recorded as ``settings`` (``None`` for the module default, a ``loss_fn``
    or a custom ``forward``: those cannot be rebuilt from a file)."""
    cls = _BUILT_IN.get(str(settings.get("task")))
    if cls is None or settings.get("forward") == "custom":
        return None
    kwargs = {k: v for k, v in settings.items() if k != "task"}
    for key in ("image_shape", "mean", "std"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)


def resolve_task(
    task: Task | None = None, loss_fn: LossFn | None = None, default: Task | None = None
) -> Task:
    """The task of an entry point: ``task``, else ``loss_fn`` wrapped, else ``default`` (e.g. the
    store's recorded task, :func:`recorded_task`), else the module's own."""
    if task is not None and loss_fn is not None:
        raise ConfigError("pass either task= or loss_fn= (a loss_fn is a task), not both")
    if task is not None:
        if not isinstance(task, Task):
            raise ConfigError(f"task must be a lightning_tda Task, got {type(task).__name__}")
        return task
    if loss_fn is not None:
        return LossFnTask(loss_fn)
    return Task() if default is None else default


def recorded_task(record: str | Mapping[str, Any] | None, where: str = "the store") -> Task:
    """The task to use when an entry point gets neither ``task=`` nor ``loss_fn=``.

    ``record``: the ``task`` attribute written with the store (JSON of :meth:`Task.settings`), or
    ``None`` for a store without one. A built-in task is rebuilt from it; the module default, or no
    record, gives the module's own :class:`Task`. A ``loss_fn`` task or a built-in with a custom
    ``forward`` cannot be rebuilt from a file: a :class:`ConfigError` asks for it again.

    >>> recorded_task('{"task": "causal_lm", "labels": "shifted", "inputs": 0, "label_key": 1}')
    CausalLMTask(forward=None, labels='shifted', inputs=0, label_key=1)
    >>> type(recorded_task(None)).__name__
    'Task'
    """
    if record is None:
        return Task()
    settings = json.loads(record) if isinstance(record, (str, bytes)) else dict(record)
    built = task_from_settings(settings)
    if built is not None:
        return built
    if settings.get("task") == LossFnTask.name or settings.get("forward") == "custom":
        raise ConfigError(
            f"{where} was logged with task {json.dumps(settings, sort_keys=True)}, which cannot be "
            "rebuilt from the file (a function is not stored). Pass the same description again: "
            "task=... (e.g. the built-in task with its forward=) or loss_fn=...; task=Task() uses "
            "the module's own per_example_loss instead."
        )
    return Task()


__all__ = [
    "IGNORE_INDEX",
    "CausalLMTask",
    "ClassificationTask",
    "LabelConvention",
    "LossFnTask",
    "Measurement",
    "Targets",
    "Task",
    "missing_loss_error",
    "missing_targets_error",
    "recorded_task",
    "resolve_task",
    "task_from_settings",
]
