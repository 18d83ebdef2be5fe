"""Capture configurations and candidate method settings explored by :mod:`benchmarks.defaults`."""

from __future__ import annotations

from benchmarks.tasks import Task, classification_measure
from lightning_tda.methods import DataInf, Influence, Source


def captures_for(task: Task) -> list[tuple[str, dict]]:
    """``(label, GradientLogger kwargs)``: the current defaults first, then the alternatives."""
    out = [
        ("default", {}),
        ("r16 pca fp32", dict(rank=16, basis="pca", dtype="float32")),
        ("r32 pca fp32", dict(rank=32, basis="pca", dtype="float32")),
        ("r32 random fp32", dict(rank=32, dtype="float32")),
    ]
    if task.name == "clf_adamw":
        out.append(("r64 pca fp32", dict(rank=64, basis="pca", dtype="float32")))
    if task.name == "gpt_single_pass":
        out = [out[0], out[1], out[2]]  # 10,000 rows: sweeps are the cost
    if task.name in ("lora_ft", "gpt_single_pass"):  # after the preset change: {} is "accurate"
        return [("accurate preset", {}), ("fast preset", dict(preset="fast"))]
    if task.name == "gpt_adamw":
        out.append(("r32 pca fp32 + dense 512", dict(dense_dim=512)))
        out.append(
            ("r16 pca fp32 + dense 256", dict(rank=16, basis="pca", dtype="float32", dense_dim=256))
        )
    return out


def candidates_for(task: Task, capture: str) -> list[tuple[str, object]]:
    """``(label, store -> method)`` for every setting scored on a capture."""
    c: list[tuple[str, object]] = [
        ("graddot", lambda s: "graddot"),
        ("tracin", lambda s: "tracin"),
        ("tracin_adam", lambda s: "tracin_adam"),
        ("datainf", lambda s: DataInf()),
        ("influence raw last ds=0.1", lambda s: Influence(damping_scale=0.1)),
    ]
    for scale in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        c.append(
            (
                f"influence raw all ds={scale:g}",
                lambda s, x=scale: Influence(damping_scale=x, checkpoints=s.steps),
            )
        )
    c.append(("influence ekfac all", lambda s: Influence(mode="ekfac", checkpoints=s.steps)))
    if task.measure is classification_measure:
        for scale in (0.3, 1.0, 3.0):
            c.append(
                (
                    f"influence trak all ds={scale:g}",
                    lambda s, x=scale: Influence(mode="trak", damping_scale=x),
                )
            )
    for L in (1, 3):
        c.append((f"source L={L} sgd", lambda s, L=L: Source(segments=L, optimizer="sgd")))
        c.append((f"source L={L} adam", lambda s, L=L: Source(segments=L, optimizer="adam")))
    return c


# -- the published run: every method at its defaults, on the default capture and the "fast" preset --


def final_captures(task: Task) -> list[tuple[str, dict]]:
    """The default ``GradientLogger`` (preset "accurate") and the "fast" preset."""
    return [("default", {}), ("fast preset", dict(preset="fast"))]


def final_candidates(task: Task, capture: str) -> list[tuple[str, object]]:
    """``attribute()`` with no method (``"auto"``), then every method at its own defaults."""
    from lightning_tda.methods.auto import auto_method

    c: list[tuple[str, object]] = [("attribute() defaults", lambda s: auto_method(s)[0])]
    if capture != "default":
        return c + [("tracin", lambda s: "tracin")]
    c += [
        ("graddot", lambda s: "graddot"),
        ("gradcos", lambda s: "gradcos"),
        ("tracin", lambda s: "tracin"),
        ("tracin_adam", lambda s: "tracin_adam"),
        ("influence (last ckpt)", lambda s: "influence"),
        ("influence (ekfac, all ckpts)", lambda s: Influence(mode="ekfac", checkpoints=s.steps)),
        (
            "influence (ekfac, all ckpts, damping_scale=0.1)",
            lambda s: Influence(mode="ekfac", checkpoints=s.steps, damping_scale=0.1),
        ),
        (
            "influence (raw, all ckpts, damping_scale=0.3)",
            lambda s: Influence(checkpoints=s.steps, damping_scale=0.3),
        ),
        (
            "influence (raw, all ckpts, damping_scale=3)",
            lambda s: Influence(checkpoints=s.steps, damping_scale=3.0),
        ),
        ("source (L=3, optimizer auto)", lambda s: "source"),
        ("source (L=3, SGD form)", lambda s: Source(optimizer="sgd")),
        ("datainf", lambda s: "datainf"),
        ("lorif", lambda s: "lorif"),
    ]
    if task.measure is classification_measure:
        c.append(("influence (trak, all ckpts)", lambda s: Influence(mode="trak")))
    return c
