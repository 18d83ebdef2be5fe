"""``lightning-tda stride fit``: fit STRIDE operators on a store logged by a recipe run.

The model class and the data come from the same LightningCLI config that trained the run (weights
are read from the store's saved checkpoint state); every :class:`StrideConfig` field is a flag::

    lightning-tda fit --config recipes/digits_tracin.yaml
    lightning-tda stride fit --config recipes/digits_tracin.yaml --task classification --num-subsets 300

The targets' label convention is never guessed: ``--task classification`` (``(x, y)`` batches),
``--task causal_lm --labels hf|shifted``, or a task's JSON settings (``'{"task": "causal_lm",
"labels": "shifted"}'``); without ``--task`` the task recorded in the store is used, else the
module's own ``targets(batch)``. The task used is recorded in the store's ``stride/`` group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from lightning_tda.capture.task import CausalLMTask, ClassificationTask, Task, task_from_settings
from lightning_tda.errors import ConfigError
from lightning_tda.stride.fit import StrideConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fit_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``stride fit`` on a subparsers object."""
    p = sub.add_parser(
        "fit",
        help="fit STRIDE steering operators on a logged store",
        description="Fit STRIDE steering operators (methods.md §12) on a store written by a "
        "`lightning-tda fit --config X.yaml` run; results go into the store's stride/ group.",
    )
    p.add_argument("--config", required=True, help="the LightningCLI config that trained the run")
    p.add_argument(
        "--store", default=None, help="store path (default: the config's GradientLogger path)"
    )
    p.add_argument("--checkpoint", type=int, default=None, help="global step (default: the last)")
    p.add_argument(
        "--checkpoints",
        default=None,
        help="comma-separated global steps, or 'all' (checkpoint-aware STRIDE)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace operators already fitted")
    p.add_argument("--accelerator", default="auto", help="accelerator of the operator fit")
    p.add_argument(
        "--task",
        default=None,
        help="'classification', 'causal_lm' (with --labels) or a task's JSON settings "
        "(default: the store's recorded task, else the module's own targets(batch))",
    )
    p.add_argument(
        "--labels",
        choices=("hf", "shifted"),
        default=None,
        help="label convention of --task causal_lm: 'hf' (Hugging Face labels, shifted inside the "
        "loss) or 'shifted' ((x, y) with y = x shifted by one)",
    )
    for f in dataclasses.fields(StrideConfig):
        if f.name == "alpha_grid":
            p.add_argument(_flag(f.name), type=float, nargs="+", default=None)
        elif f.type in ("bool", bool):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" | ")[0], str)
            p.add_argument(_flag(f.name), type=kind, default=None, help=f"StrideConfig.{f.name}")
    p.set_defaults(func=run_fit)
    return p


def task_from_args(task: str | None, labels: str | None) -> Task | None:
    """The task named on the command line (``None``: none named)."""
    if task is None:
        if labels is not None:
            raise ConfigError("--labels is the label convention of --task causal_lm; pass both")
        return None
    if task.lstrip().startswith("{"):
        built = task_from_settings(json.loads(task))
        if built is None:
            raise ConfigError(f"--task {task} is not a built-in task's settings")
        return built
    if task == "classification":
        return ClassificationTask()
    if task == "causal_lm":
        return CausalLMTask(labels=labels)  # raises naming 'hf' / 'shifted' when labels is None
    raise ConfigError(
        f"--task must be 'classification', 'causal_lm' (with --labels hf|shifted) or a task's JSON "
        f"settings, got {task!r}"
    )


def run_fit(args: argparse.Namespace) -> int:
    from lightning_tda.cli.recipe_config import load_logged_run
    from lightning_tda.store.reader import StoreReader
    from lightning_tda.stride.fit import fit, fitted_steps

    task = task_from_args(args.task, args.labels)
    run = load_logged_run(args.config, args.store)
    model, data, path = run.model, run.train_data, run.store_path
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(StrideConfig)
        if getattr(args, f.name) is not None
    }
    if "alpha_grid" in overrides:
        overrides["alpha_grid"] = tuple(overrides["alpha_grid"])
    config = dataclasses.replace(StrideConfig(), **overrides)
    reader = StoreReader(path)
    steps = None
    if args.checkpoints is not None:
        if args.checkpoint is not None:
            raise ValueError("pass --checkpoint or --checkpoints, not both")
        steps = (
            reader.steps
            if args.checkpoints == "all"
            else [int(s) for s in args.checkpoints.split(",") if s.strip()]
        )
    fit(
        reader,
        model,
        data,
        config,
        args.checkpoint,
        checkpoints=steps,
        overwrite=args.overwrite,
        trainer_kwargs={"accelerator": args.accelerator, "logger": False},
        task=task,
    )
    print(f"STRIDE operators in {path}: fitted checkpoints {fitted_steps(path)}")
    return 0
