"""The flat ``GradientLogger`` keywords (``rank=``, ``every_n_epochs=`` ...) as shorthands of config fields.

:data:`SHORTHANDS` maps each keyword to the ``(group, field)`` it sets. :func:`resolve_config` builds
each group from its config object (or, for ``projection``/``storage``, the old string kind), the
preset's values for what neither gives, and the keywords: a keyword that differs from its signature
default overrides the config object's field (as :meth:`QuerySpec.resolve` does); one left at its
default leaves the field alone.

>>> cfg = resolve_config(mode="sweep", preset=None, given={"rank": 8}, projection="kronecker")
>>> cfg.projection.rank, cfg.projection.basis, cfg.storage.dtype, cfg.schedule.every_n_epochs
(8, 'pca', 'float32', 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from lightning_tda.callbacks.config import GROUPS, PRESETS, LoggerConfig, check_mode
from lightning_tda.errors import ConfigError

SHORTHANDS: dict[str, tuple[str, str]] = {
    **{
        k: ("schedule", k)
        for k in (
            "every_n_train_steps",
            "every_n_epochs",
            "at_steps",
            "log_at_fit_start",
            "log_at_fit_end",
        )
    },
    **{
        k: ("projection", k)
        for k in (
            "rank",
            "dims",
            "distribution",
            "seed",
            "dense_dim",
            "basis",
            "basis_examples",
            "basis_tokens",
        )
    },
    "dtype": ("storage", "dtype"),
    "lorif_rank": ("storage", "lorif_rank"),
    "overwrite": ("storage", "overwrite"),
    **{
        k: ("capture", k)
        for k in (
            "modules",
            "exclude",
            "optimizer_state",
            "curvature",
            "save_state",
            "loss_fn",
            "batch_size",
            "collate_fn",
            "example_ids",
            "task",
        )
    },
    "in_flight_reduction": ("in_flight", "reduction"),
    "flush_every": ("in_flight", "flush_every"),
}
"""``GradientLogger`` keyword -> ``(config group, field)``."""

KIND_FIELD = {"projection": "kind", "storage": "kind"}
"""Groups whose argument may also be a plain string: the old ``projection="exact"`` / ``storage="lorif"``."""
DEFAULT_KIND = {"projection": "kronecker", "storage": "dense"}
"""The kind of such a group when its argument is not passed at all."""


def given_shorthands(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The shorthand keywords of ``values`` that differ from their ``defaults`` (same type and value
    counts as the default, so ``True`` is not the default ``1``)."""
    return {
        k: v
        for k, v in values.items()
        if k in SHORTHANDS and not (type(v) is type(defaults[k]) and v == defaults[k])
    }


def resolve_preset(preset: Any, mode: str) -> str:
    """The preset name: the mode's default for ``None`` (``"fast"`` in flight, else ``"accurate"``)."""
    if preset is None:
        return "fast" if mode == "in_flight" else "accurate"
    if preset not in PRESETS:
        raise ConfigError(
            f"preset must be one of {sorted(PRESETS)} (or None for the mode's default), got {preset!r}"
        )
    return preset


def resolve_config(
    *, mode: Any, preset: Any, given: Mapping[str, Any], **groups: Any
) -> LoggerConfig:
    """One :class:`LoggerConfig` from the group arguments (``schedule=``, ``projection=`` ...), the
    preset and the given shorthands."""
    check_mode(mode)
    preset = resolve_preset(preset, mode)
    overrides: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in given.items():
        group, name = SHORTHANDS[key]
        overrides[group][name] = value
    built = {
        name: _build(
            name, groups.get(name, DEFAULT_KIND.get(name)), overrides[name], PRESETS[preset]
        )
        for name in GROUPS
    }
    return LoggerConfig(mode=mode, preset=preset, **built)


def _build(group: str, value: Any, overrides: dict[str, Any], preset: dict[str, Any]) -> Any:
    cls = GROUPS[group]
    if isinstance(value, cls):
        base = {f.name: getattr(value, f.name) for f in fields(cls) if f.init}
    elif value is None and group not in KIND_FIELD:
        base = {}
    elif group in KIND_FIELD:
        base = {KIND_FIELD[group]: value} | _preset_fields(group, value, preset)
    else:
        raise ConfigError(f"{group} must be a {cls.__name__} (or None), got {value!r}")
    return cls(**(base | overrides))  # a storage dtype left open is the preset's (LoggerConfig)


def _preset_fields(group: str, kind: Any, preset: dict[str, Any]) -> dict[str, Any]:
    """The preset's defaults of a group given by its kind string (exact rows need no basis)."""
    if group != "projection":
        return {}
    return {"rank": preset["rank"], "basis": "random" if kind == "exact" else preset["basis"]}
