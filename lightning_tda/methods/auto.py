"""``method="auto"``: the default attribution method for what a store holds.

The rule (chosen on the choosing half of each benchmark bank's queries, BENCHMARKS.md "Defaults"):

1. in-flight rows (``GradientLogger(mode="in_flight")``): per-step TracIn, the only estimator those
   batch rows support exactly;
2. sweep rows with the logged K-FAC factors (``GradientLogger(curvature=True)``, the default): EK-FAC
   influence averaged over every logged checkpoint (an ensemble over the trajectory), each checkpoint
   with its own eigenbasis, corrected eigenvalues and damping (0.1 × the mean eigenvalue per layer);
3. sweep rows without factors: the raw block influence averaged over every checkpoint (damping 1.0 ×
   the mean eigenvalue per layer).

The chosen method and its settings are recorded in the result (``AttributionResult.settings``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lightning_tda.capture.task import Task
from lightning_tda.methods.base import AttributionMethod
from lightning_tda.methods.influence import Influence
from lightning_tda.methods.tracin import TracIn
from lightning_tda.store.reader import StoreReader

AUTO = "auto"


def auto_method(store: StoreReader) -> tuple[AttributionMethod, str]:
    """``(method, reason)``: the default method for ``store`` (module docstring)."""
    cks = list(store.checkpoints)
    if not cks:
        store.checkpoint(None)  # raises the informative "no complete checkpoint" error
    if any(c.in_flight for c in cks):
        return TracIn(), "in-flight rows: per-step TracIn"
    steps = [c.global_step for c in cks]
    if not all(c.has_kfac for c in cks):
        reason = (
            f"sweep rows at {len(steps)} checkpoint(s) without K-FAC factors: raw block influence "
            "averaged over all of them"
        )
        return Influence(checkpoints=steps), reason
    reason = f"sweep rows at {len(steps)} checkpoint(s): EK-FAC influence averaged over all of them"
    return Influence(mode="ekfac", checkpoints=steps), reason


def method_settings(method: AttributionMethod) -> dict[str, Any]:
    """The method's hyper-parameters as a JSON-ready dict (dataclass fields)."""
    out: dict[str, Any] = {}
    for f in fields(method):  # type: ignore[arg-type]
        v = getattr(method, f.name)
        if isinstance(v, Task):
            v = v.settings()
        elif callable(v):
            v = getattr(v, "__name__", repr(v))
        elif isinstance(v, (list, tuple)):
            v = list(v)
        out[f.name] = v
    return out


__all__ = ["AUTO", "auto_method", "method_settings"]
