"""Command line: ``lightning-tda demo | fit | inspect | stride fit | report``.

The top layer of the package: :mod:`~lightning_tda.cli.recipe_config` rebuilds a logged run from its
LightningCLI config, :mod:`~lightning_tda.cli.stride` and :mod:`~lightning_tda.cli.report` register the
post-fit subcommands. ``python -m lightning_tda.cli`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from lightning_tda.demo import run_demo

    run_demo(
        out=args.out, epochs=args.epochs, n_queries=args.queries, top_k=args.top_k, seed=args.seed
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lightning_tda.attribution import AttributionStore

    print(AttributionStore(args.file).summary())
    return 0


def _fit(argv: list[str]) -> int:
    from unittest import mock

    from lightning.pytorch.cli import LightningCLI

    # LightningCLI warns when both args= and sys.argv carry arguments; argv is the whole truth here
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        LightningCLI(
            args=argv,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-tda", description="Training-data attribution for Lightning runs."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="train a small digits MLP with the logger attached and attribute test digits"
    )
    d.add_argument("--out", default=None, help="store path (default: a temporary directory)")
    d.add_argument("--epochs", type=_positive_int, default=12)
    d.add_argument("--queries", type=_positive_int, default=3)
    d.add_argument("--top-k", type=_positive_int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    sub.add_parser(
        "fit", help="LightningCLI fit: lightning-tda fit --config recipes/X.yaml", add_help=False
    )
    i = sub.add_parser("inspect", help="print a store's checkpoints, shapes, dtypes and sizes")
    i.add_argument("file")
    i.set_defaults(func=_inspect)
    s = sub.add_parser(
        "stride", help="STRIDE post-fit stage: lightning-tda stride fit --config X.yaml"
    )
    from lightning_tda.cli.stride import add_fit_parser

    add_fit_parser(s.add_subparsers(dest="stride_command", required=True))
    from lightning_tda.cli.report import add_report_parser

    add_report_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit"]:  # everything after `fit` belongs to LightningCLI
        return _fit(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        if os.environ.get("LIGHTNING_TDA_DEBUG"):
            raise
        print(f"lightning-tda {args.command}: error: {e}", file=sys.stderr)
        return 2
