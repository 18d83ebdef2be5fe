"""Is this the model the store was logged with? The check behind ``attribute(..., check_model=True)``.

The store's root attributes ``frozen_fingerprint`` and ``architecture_fingerprint``
(:mod:`lightning_tda.capture.fingerprint`) are compared with the query model's before any query
gradient is computed. A store written before they existed is not checked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from torch import nn

from lightning_tda.capture.fingerprint import (
    ARCHITECTURE_FINGERPRINT,
    FROZEN_FINGERPRINT,
    architecture_fingerprint,
    dtype_note,
    frozen_mismatches,
    mismatches,
    parse,
)
from lightning_tda.capture.layers import LayerSpec, discover_layers
from lightning_tda.errors import StoreError
from lightning_tda.store.reader import StoreReader

CHECK_MODEL = "check_model"
"""The keyword that skips the check (``attribute(..., check_model=False)``), named in the error."""

SHOWN = 4
"""Differing names listed in the error."""


def _few(names: Sequence[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def store_layers(store: StoreReader, model: nn.Module) -> list[LayerSpec]:
    """The layers of ``model`` captured with ``store``'s projection and module selection."""
    selection = json.loads(store.attrs.get("capture_selection", "{}"))
    layers, _ = discover_layers(
        model, store.projection, selection.get("modules"), selection.get("exclude")
    )
    return layers


def model_differences(
    store: StoreReader, model: nn.Module, layers: Sequence[LayerSpec] | None = None
) -> list[str]:
    """What differs between ``model`` and the model ``store`` was logged with (empty: nothing, or a
    store without fingerprints). ``layers``: ``model``'s captured layers, if already discovered."""
    out = []
    arch = parse(store.attrs, ARCHITECTURE_FINGERPRINT)
    if arch is not None:
        found = store_layers(store, model) if layers is None else layers
        bad = mismatches(arch, architecture_fingerprint(model, found))
        if bad:
            out.append(
                f"the captured layers differ (kind, shape, parameters or module classes on their "
                f"path) at {_few(bad)}"
            )
    frozen = parse(store.attrs, FROZEN_FINGERPRINT)
    if frozen is not None:
        bad = frozen_mismatches(frozen, model)
        if bad:
            unit = "blocks" if frozen.granularity == "block" else "parameters"
            out.append(
                f"the frozen weights differ at {_few(bad)} ({len(bad)} of the store's "
                f"{len(frozen.entries)} frozen {unit}){dtype_note(frozen, model, bad)}"
            )
    return out


def check_model_matches(
    store: StoreReader, model: nn.Module, layers: Sequence[LayerSpec] | None = None
) -> None:
    """Raise a :class:`~lightning_tda.errors.StoreError` naming what differs and the override when
    ``model`` is not the model ``store`` was logged with (frozen weights or captured architecture).

    Cost: one BLAKE2b pass over the model's frozen weights (about 1 GB/s on the CPU)."""
    problems = model_differences(store, model, layers)
    if problems:
        raise StoreError(
            f"the model given is not the one {store.path} was logged with: "
            + "; ".join(problems)
            + ". The store's rows are gradients at the logged frozen weights, so this model's query "
            "gradients would not be comparable with them (the top proponents would silently change). "
            "Pass the model the run was trained with (the same frozen base and architecture), or "
            f"{CHECK_MODEL}=False to skip this check."
        )
