"""Typed configuration of :class:`~lightning_tda.GradientLogger`, one dataclass per concern.

Each config validates itself when built (raising :class:`~lightning_tda.errors.ConfigError`, both a
``ValueError`` and a Lightning ``MisconfigurationException``) and serialises to JSON (``to_dict``).
:class:`LoggerConfig` bundles them for one logger; its :meth:`~LoggerConfig.saved_arguments` are
stored in the store's root attribute ``logger_config`` and checked when a fit resumes.

>>> StorageConfig(kind="lorif", lorif_rank=2).to_dict()["kind"]
'lorif'
>>> StorageConfig(dtype="int8")
Traceback (most recent call last):
...
lightning_tda.errors.ConfigError: dtype must be one of ('float16', 'bfloat16', 'float32'), got 'int8'
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch

from lightning_tda.callbacks.schedule import ScheduleConfig
from lightning_tda.capture.in_flight import Reduction, check_reduction
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.capture.query_spec import QuerySpec
from lightning_tda.capture.task import Task, resolve_task
from lightning_tda.data.ids import ExampleIds, IdsSpec
from lightning_tda.errors import ConfigError
from lightning_tda.store import schema

Mode = Literal["sweep", "in_flight"]
Preset = Literal["accurate", "fast"]
StorageKind = Literal["dense", "lorif"]
StorageDtype = Literal["float16", "bfloat16", "float32"]

MODES = ("sweep", "in_flight")
PRESETS: dict[str, dict[str, Any]] = {
    "accurate": {"rank": 32, "basis": "pca", "dtype": "float32"},
    "fast": {"rank": 16, "basis": "random", "dtype": "float16"},
}
"""Named capture settings; ``GradientLogger(preset=...)``."""


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class StorageConfig:
    """How rows are stored.

    Args:
        dtype: storage dtype of rows (``None``: the preset's).
        kind: ``"dense"`` (each projected gradient as is) or ``"lorif"`` (rank-``c`` factors of each
            layer's ``[k_out, k_in]`` block, docs/store.md "Factored rows").
        lorif_rank: ``c`` of ``kind="lorif"``.
        overwrite: replace an existing store on a fresh (not resumed) fit.
    """

    dtype: StorageDtype | None = None
    kind: StorageKind = "dense"
    lorif_rank: int = 1
    overwrite: bool = False

    may_change_on_resume: ClassVar[frozenset[str]] = frozenset({"overwrite"})

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in schema.STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {schema.STORAGE_DTYPES}, got {self.dtype!r}")
        if self.kind not in schema.STORAGE_KINDS:
            raise ConfigError(
                f"storage must be 'dense' or 'lorif' (rank-c factors per layer), got {self.kind!r}"
            )
        if not _positive_int(self.lorif_rank):
            raise ConfigError(
                f"lorif_rank must be a positive int (the rank c of the stored factors), got {self.lorif_rank!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_sweep_speed(c: CaptureConfig) -> None:
    """Validate the sweep's speed switches (autocast, compile, basis reuse)."""
    if not isinstance(c.sweep_autocast, bool):
        raise ConfigError(f"sweep_autocast must be True or False, got {c.sweep_autocast!r}")
    if not isinstance(c.compile_loss, (bool, str)) or c.compile_loss == "":
        raise ConfigError(
            f"compile_loss must be True/False or a torch.compile backend name, got {c.compile_loss!r}"
        )
    b = c.basis_reuse_bytes
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
        raise ConfigError(f"basis_reuse_bytes must be None or an int >= 0, got {b!r}")


@dataclass(frozen=True)
class CaptureConfig:
    """What each checkpoint captures, and how the swept data is batched and differentiated.

    Args:
        modules: names/regexes of the modules to capture (default: every eligible one); one string
            is one pattern.
        exclude: names/regexes of modules to skip.
        optimizer_state: record optimizer hyper-parameters, factored Adam second moments and
            preconditioned rows.
        curvature: accumulate each layer's projected K-FAC factors during the sweep.
        save_state: save trainable parameters and buffers ``θ_t`` at each checkpoint (``True``), never
            (``False``), or ``"auto"`` (default): at every sweep checkpoint; in flight, at a logged step
            when the state's bytes do not exceed the row bytes logged since the last saved state (and at
            the first logged step), so state never more than doubles what is written. Only query
            gradients recomputed later (``attribute(queries, model=...)``), STRIDE and dropout
            ensembles read it; a step without its own state uses the latest saved one before it
            (its ``state_step`` attribute).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default ``model.per_example_loss(batch)``.
            A shorthand of ``task=LossFnTask(loss_fn)`` (give one of the two).
        batch_size: sweep batch size (``None``: for the training set, the train loader's raised to 64
            but at most 8× for throughput; else 64).
        collate_fn: collate function of a Dataset.
        example_ids: where the user's batches keep their example ids: a tuple position, a mapping key,
            ``fn(batch) -> Tensor[B]`` or an :class:`~lightning_tda.data.ids.ExampleIds`; ``None``:
            ``Indexed`` batches and the keys ``example_id``, ``idx``, ``index``, ``id`` (sweep data
            without any id is numbered by position).
        task: the :class:`~lightning_tda.capture.task.Task` whose ``per_example_loss`` every row is the
            gradient of; ``None``: ``loss_fn``, else the module's own ``per_example_loss``.
        sweep_autocast: sweep under the training precision's autocast (bf16/fp16-mixed); ``False``:
            full precision.
        compile_loss: ``torch.compile`` the sweep's per-example loss (``True``: inductor, or a backend
            name); the capture hooks stay eager (graph breaks).
        basis_reuse_bytes: bytes of PCA-basis-pass layer inputs/output gradients kept so the first
            sweep checkpoint projects them instead of a second forward+backward (``0``: off;
            ``None``: a quarter of the free device memory).
    """

    modules: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    optimizer_state: bool = True
    curvature: bool = True
    save_state: bool | Literal["auto"] = "auto"
    loss_fn: LossFn | None = None
    batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    example_ids: IdsSpec | ExampleIds = None
    task: Task | None = None
    sweep_autocast: bool = True
    compile_loss: bool | str = False
    basis_reuse_bytes: int | None = None

    may_change_on_resume: ClassVar[frozenset[str]] = frozenset(
        {
            "loss_fn", "batch_size", "collate_fn", "task",
            "sweep_autocast", "compile_loss", "basis_reuse_bytes",
        }
    )  # fmt: skip

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", _patterns("modules", self.modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        if self.batch_size is not None and not _positive_int(self.batch_size):
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.save_state not in (True, False, "auto"):
            raise ConfigError(f"save_state must be True, False or 'auto', got {self.save_state!r}")
        _check_sweep_speed(self)
        for name in ("loss_fn", "collate_fn"):
            v = getattr(self, name)
            if v is not None and not callable(v):
                raise ConfigError(f"{name} must be callable, got {type(v).__name__}")
        self.ids()  # validates example_ids
        self.resolved_task()  # task= or loss_fn=, not both

    def ids(self) -> ExampleIds:
        """The :class:`~lightning_tda.data.ids.ExampleIds` reading the ids of the user's batches."""
        return ExampleIds.resolve(self.example_ids)

    def resolved_task(self) -> Task:
        """``task``, else ``loss_fn`` as a ``LossFnTask``, else the module's own ``Task()``."""
        return resolve_task(self.task, self.loss_fn)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["loss_fn"], d["collate_fn"] = describe(self.loss_fn), describe(self.collate_fn)
        d["example_ids"], d["task"] = self.ids().describe(), self.resolved_task().settings()
        return d

    def query_spec(self) -> QuerySpec:
        """The loss and batching of a Dataset sweep as a :class:`QuerySpec` (batch size 64 when unset)."""
        loss = self.loss_fn if self.task is None else self.task.per_example_loss
        return QuerySpec(loss, self.batch_size or 64, self.collate_fn)


@dataclass(frozen=True)
class InFlightConfig:
    """Options of ``mode="in_flight"``.

    Args:
        reduction: how ``training_step``'s loss reduces ``per_example_loss`` over a (micro-)batch:
            ``"mean"`` (``c = 1/B``), ``"sum"`` (``c = 1``) or ``fn(batch) -> c``.
        flush_every: logged steps written per file open (one commit).
        background: write on a background thread while training goes on (``True``), between steps
            (``False``), or ``"auto"`` (default): the thread when the model is on an accelerator,
            between steps on CPU, where the writer's CRC/HDF5 work competes with training for the
            same cores (measured on 2 cores: 2.09× the plain fit with the thread, 1.42× without).
        max_pending: groups of ``flush_every`` steps that may wait for the background writer before
            training waits for it (bounds the memory the rows and states of unwritten steps hold).
    """

    reduction: Reduction = "mean"
    flush_every: int = 16
    background: bool | Literal["auto"] = "auto"
    max_pending: int = 2

    may_change_on_resume: ClassVar[frozenset[str]] = frozenset(
        {"flush_every", "background", "max_pending"}
    )

    def __post_init__(self) -> None:
        try:
            check_reduction(self.reduction)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not _positive_int(self.flush_every):
            raise ConfigError(f"flush_every must be a positive int, got {self.flush_every!r}")
        if not _positive_int(self.max_pending):
            raise ConfigError(f"max_pending must be a positive int, got {self.max_pending!r}")
        if self.background not in (True, False, "auto"):
            raise ConfigError(f"background must be True, False or 'auto', got {self.background!r}")

    def background_for(self, device: torch.device) -> bool:
        """Whether to write on a background thread when training on ``device`` (resolves ``"auto"``)."""
        if self.background == "auto":
            return device.type != "cpu"
        return bool(self.background)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reduction": describe(self.reduction),
            "flush_every": self.flush_every,
            "background": self.background,
            "max_pending": self.max_pending,
        }


GROUPS: dict[str, type] = {
    "schedule": ScheduleConfig,
    "projection": ProjectionConfig,
    "storage": StorageConfig,
    "capture": CaptureConfig,
    "in_flight": InFlightConfig,
}
"""The config groups of a logger, by the ``GradientLogger`` argument that takes each."""


@dataclass(frozen=True)
class LoggerConfig:
    """Every setting of one :class:`~lightning_tda.GradientLogger`, resolved (no ``None`` left to a preset).

    Built by :func:`lightning_tda.callbacks.shorthands.resolve_config` from the logger's arguments.
    The schedule gets the mode's default trigger; options one mode does not support are refused.
    """

    mode: Mode = "sweep"
    preset: Preset = "accurate"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    in_flight: InFlightConfig = field(default_factory=InFlightConfig)

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        if self.mode == "in_flight":
            _check_in_flight(self)
        object.__setattr__(self, "schedule", self.schedule.for_mode(self.mode))
        if self.storage.dtype is None:  # the preset's row dtype
            object.__setattr__(
                self, "storage", replace(self.storage, dtype=PRESETS[self.preset]["dtype"])
            )

    def to_dict(self) -> dict[str, Any]:
        return self.saved_arguments()

    def saved_arguments(self) -> dict[str, Any]:
        """JSON-ready ``{group: fields}`` (kronfluence-style saved arguments); ``in_flight`` only in
        that mode."""
        groups = [g for g in GROUPS if g != "in_flight" or self.mode == "in_flight"]
        return {
            "mode": self.mode,
            "preset": self.preset,
            **{g: getattr(self, g).to_dict() for g in groups},
        }

    def resume_mismatch(self, saved: dict[str, Any]) -> str | None:
        """The first setting a resumed fit may not change that differs from ``saved`` (as
        ``"group.field: saved -> now"``), or ``None``."""
        now = json.loads(schema.to_json(self.saved_arguments()))
        if saved.get("mode", now["mode"]) != now["mode"]:
            return f"mode: {saved['mode']!r} -> {now['mode']!r}"
        for group, values in now.items():
            if not isinstance(values, dict) or not isinstance(saved.get(group), dict):
                continue
            free = getattr(GROUPS[group], "may_change_on_resume", frozenset())
            for key, value in values.items():
                if key not in free and key in saved[group] and saved[group][key] != value:
                    return f"{group}.{key}: {saved[group][key]!r} -> {value!r}"
        return None


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ConfigError(
            f"mode must be 'sweep' (sweep attribution_data at each trigger) or 'in_flight' (log the "
            f"training batches themselves), got {mode!r}"
        )


def _check_in_flight(config: LoggerConfig) -> None:
    """Clear errors for sweep-only options given with ``mode="in_flight"``."""
    s, p = config.schedule, config.projection
    fixes = {
        "every_n_epochs": (
            s.every_n_epochs is not None,
            "in-flight mode logs optimizer steps; use every_n_train_steps=n or at_steps=[...] (default: every step)",
        ),
        "log_at_fit_start": (
            s.log_at_fit_start,
            "in-flight mode logs no sweep; the first step's batch is logged at step 0 anyway",
        ),
        "log_at_fit_end": (
            s.log_at_fit_end,
            "in-flight mode logs no sweep of the final weights; use mode='sweep' for that",
        ),
        "dense_dim": (
            p.dense_dim > 0,
            "the dense (torch.func) block needs an extra per-example pass; use dense_dim=0 with in-flight mode",
        ),
        "basis": (
            p.basis != "random",
            "a PCA basis is fitted by a sweep; use basis='random' with in-flight mode",
        ),
        "storage": (
            config.storage.kind != "dense",
            "in-flight steps are stored dense; use storage='dense'",
        ),
    }
    for name, (bad, fix) in fixes.items():
        if bad:
            raise ConfigError(f"GradientLogger(mode='in_flight', {name}=...): {fix}.")


def describe(fn: Any) -> Any:
    """A JSON-able name of a callable setting (a string setting as is; ``None`` for none)."""
    if fn is None or isinstance(fn, str):
        return fn
    return f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``modules``/``exclude`` as a list of names/regexes; a single string is one pattern."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]  # not list("net.0"), which would be the patterns 'n', 'e', 't', ...
    try:
        patterns = list(value)
    except TypeError:
        raise ConfigError(
            f"{name} must be a list of module names/regexes (or one string), got {value!r}"
        ) from None
    if not all(isinstance(p, (str, re.Pattern)) for p in patterns):
        raise ConfigError(f"{name} must be a list of module names/regexes (strings), got {value!r}")
    return patterns
