"""Regenerate the benchmark tables: ``python -m benchmarks.run --suite quality``.

The quality suite trains each task's model once with the GradientLogger attached, scores the
held-out queries with every lightning_tda method and every peer library that runs on CPU, and
measures LDS against the task's retraining bank (``benchmarks/banks/<task>``, rebuilt or resumed by
``python -m benchmarks.banks_build``), plus mislabel-detection AUC. Results go to
``benchmarks/results/quality.json`` and the quality section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.data import Subset

from benchmarks.banks_build import bank_path
from benchmarks.banks_build import build as build_bank
from benchmarks.common import (  # noqa: F401 (re-exported: the helpers shared with benchmarks.perf)
    RESULTS,
    ROOT,
    GPTLogits,
    fit_logged,
    logging_seconds,
    stored_bytes_per_example,
    update_benchmarks_md,
)
from benchmarks.tasks import TASKS, Task, classification_measure
from lightning_tda import AttributionStore, CausalLMTask, ClassificationTask
from lightning_tda.eval.metrics import lds_report, mislabel_detection_auc
from lightning_tda.eval.removal import topk_removal_test
from lightning_tda.eval.retrain import Bank
from lightning_tda.methods import AttributionMethod, DataInf, Influence, Source, get_method
from lightning_tda.stride import Stride, StrideConfig
from lightning_tda.stride import fit as stride_fit
from lightning_tda.stride import load as stride_load


@dataclass
class Row:
    task: str
    method: str
    library: str
    config: str
    seconds: float
    lds: float | None = None
    ci: tuple[float, float] | None = None
    auc: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


MethodFactory = Callable[[AttributionStore, Task], "str | AttributionMethod"]


@dataclass
class Config:
    """One logged run of a task: GradientLogger kwargs and the methods scored on its store."""

    label: str
    logger: dict
    methods: list[tuple[str, MethodFactory]]
    dropout_members: int = 0  # add a dropout ensemble of this many members to every checkpoint
    # STRIDE fits on this run's store: (label, StrideConfig, "last" | "all" checkpoints)
    stride: list[tuple[str, StrideConfig, str]] = field(default_factory=list)


def _named(*names: str) -> list[tuple[str, MethodFactory]]:
    return [(n, lambda store, task, n=n: n) for n in names]


def curvature_methods(task: Task, adam: bool) -> list[tuple[str, MethodFactory]]:
    """Influence, SOURCE and DataInf at their defaults (nothing tuned on the evaluation queries)."""
    out: list[tuple[str, MethodFactory]] = [
        ("influence (raw, last ckpt)", lambda store, task: Influence()),
        ("influence (raw, all ckpts)", lambda store, task: Influence(checkpoints=store.steps)),
        ("influence (ekfac, last ckpt)", lambda store, task: Influence(mode="ekfac")),
    ]
    if task.measure is classification_measure:
        out.append(("influence (trak, all ckpts)", lambda store, task: Influence(mode="trak")))
    out += [
        ("source (L=3)", lambda store, task: Source()),
        ("source (L=1)", lambda store, task: Source(segments=1)),
    ]
    if adam:
        out.append(
            ("source (L=3, Adam form)", lambda store, task: Source(optimizer="adam")),
        )
    if task.stages is not None:
        out.append(
            (
                "source (stage boundaries)",
                lambda store, task: Source(
                    boundaries=task.stages["boundaries"], stage_members=task.stages["members"]
                ),
            )
        )
    out.append(("datainf (last ckpt)", lambda store, task: DataInf()))
    return out


def our_configs(task: Task) -> list[Config]:
    """The logged configurations of a task and the methods scored on each."""
    adam = task.name == "tinygpt"
    base = _named("graddot", "gradcos", "tracin") + (_named("tracin_adam") if adam else [])
    curv = curvature_methods(task, adam)
    lorif = [("lorif (last ckpt)", lambda store, task: get_method("lorif"))]
    if task.name in ("digits_short", "digits_two_stage"):
        return [
            Config(
                "kronecker r32 pca fp32",
                dict(rank=32, basis="pca", dtype="float32"),
                _named("tracin") + curv,
            )
        ]
    if task.flipped is not None:  # mislabel: self-influence
        return [
            Config("exact", dict(projection="exact", dtype="float32"), _named("graddot", "tracin")),
            Config(
                "kronecker r16 pca",
                dict(rank=16, basis="pca"),
                _named("graddot", "tracin") + curv[:4],
            ),
        ]
    configs = [
        Config("kronecker r16 pca", dict(rank=16, basis="pca"), base + curv + lorif),
        Config("kronecker r16 random", dict(rank=16), _named("tracin") + curv[:1]),
        Config(
            "lorif c=1, kronecker r16 pca",
            dict(rank=16, basis="pca", storage="lorif", lorif_rank=1),
            lorif,
        ),
    ]
    if adam:
        configs.append(
            Config(
                "lorif c=4, kronecker r16 pca",
                dict(rank=16, basis="pca", storage="lorif", lorif_rank=4),
                lorif,
            )
        )
        configs.append(
            Config(
                "kronecker r16 pca + dense 256",
                dict(rank=16, basis="pca", dense_dim=256),
                _named("tracin", "tracin_adam") + curv[:6],
            )
        )
    else:  # exact rows of the GPT would be ~100k wide
        configs.insert(0, Config("exact", dict(projection="exact", dtype="float32"), base))
        configs.append(
            Config(
                "kronecker r32 pca fp32 + dropout ensemble",
                dict(rank=32, basis="pca", dtype="float32"),
                curv[:3]
                + [
                    (
                        "influence (raw, last ckpt, 8 dropout members p=0.1)",
                        lambda store, task: Influence(dropout_members=8),
                    ),
                    (
                        "influence (raw, all ckpts, 8 dropout members p=0.1)",
                        lambda store, task: Influence(dropout_members=8, checkpoints=store.steps),
                    ),
                    (
                        "influence (trak, all ckpts, 8 dropout members p=0.1)",
                        lambda store, task: Influence(mode="trak", dropout_members=8),
                    ),
                ]
                + curv[3:],
                dropout_members=8,
            )
        )
        configs.append(
            Config(
                "lorif c=1, kronecker r32 pca fp32",
                dict(rank=32, basis="pca", dtype="float32", storage="lorif", lorif_rank=1),
                curv[:1] + curv[4:6] + lorif,
            )
        )
    return configs


def stride_configs(task: Task) -> list[Config]:
    """The STRIDE suite: STRIDE next to the best gradient-based configuration of the quality suite."""
    fits = [
        ("defaults", StrideConfig(), "last"),
        ("defaults, checkpoint-aware", StrideConfig(), "all"),
    ]
    if task.name != "tinygpt":  # K=1000 on the GPT: LDS 0.098 for a 532 s fit (explored once)
        fits += [
            ("K=1000", StrideConfig(num_subsets=1000, steps=600), "last"),
            ("K=1000, checkpoint-aware", StrideConfig(num_subsets=1000, steps=600), "all"),
        ]
    if task.name == "tinygpt":
        logger = dict(rank=16, basis="pca", dense_dim=256)
        label = "kronecker r16 pca + dense 256"
    else:
        logger = dict(rank=32, basis="pca", dtype="float32")
        label = "kronecker r32 pca fp32"
    methods = _named("tracin") + [
        ("influence (raw, all ckpts)", lambda store, task: Influence(checkpoints=store.steps)),
        ("source (L=3)", lambda store, task: Source()),
        ("source (L=1)", lambda store, task: Source(segments=1)),
    ]
    return [Config(label, logger, methods, stride=fits)]


def _stride_task(task: Task) -> CausalLMTask | ClassificationTask:
    """The STRIDE targets, said explicitly: the tiny GPT's ``(ids, (tokens,))`` batches hold Hugging
    Face-style labels (the tokens themselves, shifted inside the loss); the classifiers ``(x, y)``."""
    if task.name == "tinygpt":
        return CausalLMTask(labels="hf", inputs=0, label_key=0)
    return ClassificationTask()


def run_stride(task: Task, cfg: Config, model, store: AttributionStore, bank, subsets, out):
    """Fit every STRIDE configuration of ``cfg`` on ``store`` and score the queries (two-sided and
    non-negative Lasso). Seconds: operator fit + measurement + recovery (no gradient logging)."""
    rows = []
    stride_task = _stride_task(task)
    for label, config, which in cfg.stride:
        steps = store.steps if which == "all" else store.steps[-1:]
        t0 = time.perf_counter()
        stride_fit(
            store,
            model,
            task.train,
            config,
            checkpoints=steps,
            task=stride_task,
            overwrite=True,
            trainer_kwargs={"enable_progress_bar": False, "logger": False, "accelerator": "cpu"},
        )
        fit_s = time.perf_counter() - t0
        alphas = [stride_load(store.path, s).alpha for s in steps]
        for positive in (False, True):
            method = Stride(
                checkpoints="all" if which == "all" else None,
                positive=positive,
                task=stride_task,
            )
            t0 = time.perf_counter()
            res = store.attribute(task.queries, model=model, method=method, top_k=None)
            secs = fit_s + time.perf_counter() - t0
            rep = lds_report(res.scores, subsets, out, bank.measurement(task.primary))
            c = config
            settings = (
                f"K={c.num_subsets}, d={c.degree}, r={c.rank}, steps={c.steps}, "
                f"ckpts={which} ({len(steps)}), Lasso {'non-negative' if positive else 'two-sided'}, "
                f"λ={'/'.join(f'{a:g}' for a in alphas)}·λ_max (CV on training examples)"
            )
            rows.append(
                Row(
                    task.name,
                    f"stride ({label})",
                    "lightning_tda",
                    settings,
                    secs,
                    rep.mean,
                    (rep.ci_low, rep.ci_high),
                    notes=f"fit {fit_s:.1f} s",
                    extra={"stride": config.__dict__ | {"alpha": alphas, "checkpoints": steps}},
                )
            )
    return rows


def run_task(
    task: Task, workdir: Path, peers: bool, suite: str = "quality"
) -> tuple[list[Row], dict]:
    bank = Bank.load(bank_path(task.name)) if task.flipped is None else None
    rows: list[Row] = []
    info: dict = {"describe": task.describe}
    if bank is not None:
        out = torch.from_numpy(bank.outputs[task.primary])
        info["bank"] = dict(
            M=int(bank.subsets.shape[0]),
            R=int(out.shape[1]),
            Q=int(out.shape[2]),
            alpha=bank.meta["spec"]["alpha"],
            measurement=task.primary,
        )
        subsets = torch.from_numpy(bank.subsets.astype(np.int64))
        rep = lds_report(
            torch.from_numpy(np.random.default_rng(0).normal(size=(out.shape[2], len(task.train)))),
            subsets,
            out,
            bank.measurement(task.primary),
        )
        info["bank"]["ceiling"] = rep.ceiling
        info["bank"]["reliability"] = rep.reliability
        rows.append(
            Row(task.name, "random scores", "-", "-", 0.0, rep.mean, (rep.ci_low, rep.ci_high))
        )
    exact_scores = None
    models = {}
    configs = stride_configs(task) if suite == "stride" else our_configs(task)
    for cfg in configs:
        label, kwargs = cfg.label, cfg.logger
        model, store, fit_s = fit_logged(
            task, workdir / f"{task.name}-{label.replace(' ', '_').replace(',', '')}.h5", **kwargs
        )
        models[label] = (model, store)
        log_s = logging_seconds(store)
        if cfg.dropout_members:
            t0 = time.perf_counter()
            store.add_dropout_ensemble(
                model,
                task.train,
                members=cfg.dropout_members,
                p=0.1,
                steps=store.steps,
                batch_size=250,
            )
            log_s += time.perf_counter() - t0
        info.setdefault("bytes_per_example_per_checkpoint", {})[label] = stored_bytes_per_example(
            store
        )
        for method_label, factory in cfg.methods:
            method = factory(store, task)
            t0 = time.perf_counter()
            try:
                if bank is not None:
                    res = store.attribute(task.queries, model=model, method=method, top_k=None)
                else:
                    si = store.self_influence(method=method)
            except Exception as e:  # report, never hide: a failing method is a row with its error
                rows.append(
                    Row(
                        task.name,
                        method_label,
                        "lightning_tda",
                        label,
                        0.0,
                        notes=f"failed: {e!r}"[:200],
                    )
                )
                continue
            secs = time.perf_counter() - t0 + log_s
            if bank is not None:
                rep = lds_report(res.scores, subsets, out, bank.measurement(task.primary))
                rows.append(
                    Row(
                        task.name,
                        method_label,
                        "lightning_tda",
                        label,
                        secs,
                        rep.mean,
                        (rep.ci_low, rep.ci_high),
                        extra={"bytes_per_example_per_checkpoint": stored_bytes_per_example(store)},
                    )
                )
                if label == "exact" and method == "tracin":
                    exact_scores = res.scores
            else:
                auc = float(mislabel_detection_auc(si, torch.from_numpy(task.flipped)))
                rows.append(
                    Row(
                        task.name,
                        f"{method_label} self-influence",
                        "lightning_tda",
                        label,
                        secs,
                        auc=auc,
                    )
                )
        if cfg.stride:
            rows += run_stride(task, cfg, model, store, bank, subsets, out)
        info.setdefault("fit_seconds", {})[label] = fit_s
        info.setdefault("logging_seconds", {})[label] = log_s
    if suite == "stride":
        if peers and task.name == "tinygpt":
            rows += run_lm_peer_rows(
                task, store, bank, info, names=("dattri_trak_lm", "kronfluence_ekfac_lm")
            )
        elif peers:
            rows += run_peer_rows(task, (model, store), bank, None, info, names=CURVATURE_PEERS)
        return rows, info
    if task.name == "digits" and exact_scores is not None:
        t0 = time.perf_counter()
        n_q = 20
        rep = topk_removal_test(
            workdir / "removal",
            task.factory,
            task.train,
            Subset(task.queries, range(n_q)),
            task.measure,
            exact_scores[:n_q],
            k=10,
            seeds=(0, 1),
            recipe=task.recipe,
        )
        info["removal"] = dict(
            k=rep.k,
            queries=n_q,
            method="tracin (exact)",
            mean_topk=rep.mean_topk,
            mean_random=rep.mean_random,
            fraction=rep.fraction_topk_larger,
            seconds=time.perf_counter() - t0,
        )
    if peers and task.name in ("digits", "mislabel"):
        rows += run_peer_rows(task, models["exact"], bank, exact_scores, info)
    if peers and (task.stages is not None or task.name == "digits_short"):
        rows += run_peer_rows(
            task, next(iter(models.values())), bank, None, info, names=CURVATURE_PEERS
        )
    if peers and task.name == "tinygpt":
        rows += run_lm_peer_rows(task, models["kronecker r16 pca"][1], bank, info)
    return rows, info


CURVATURE_PEERS = ("dattri_trak", "kronfluence_ekfac")


def run_peer_rows(task: Task, model_store, bank, exact_scores, info, names=None) -> list[Row]:
    from benchmarks.peers import ClassificationTask, run_peers

    model, store = model_store
    x, y = task.train.dataset.tensors
    qx = torch.stack([task.queries[i].data[0] for i in range(len(task.queries))])
    qy = torch.stack([task.queries[i].data[1] for i in range(len(task.queries))])
    if task.flipped is not None:  # self-influence: the training set is its own query set
        qx, qy = x, y
    cks = [{k.removeprefix("net."): v for k, v in store.state(s).items()} for s in store.steps]
    ctask = ClassificationTask(
        model_factory=lambda: task.factory().net,
        checkpoints=cks,
        lr_weights=[c.lr_sum[0] for c in store.checkpoints],
        x_train=x,
        y_train=y,
        x_test=qx,
        y_test=qy,
    )
    return peer_rows(task, run_peers(ctask, names), bank, exact_scores, info)


def run_lm_peer_rows(task: Task, store: AttributionStore, bank, info, names=None) -> list[Row]:
    from benchmarks.peers_lm import LMTask, run_peers_lm

    def full_state(
        step: int,
    ) -> dict[str, torch.Tensor]:  # the store keeps trainable tensors; tied ones come back here
        model = GPTLogits(task)
        model.load_state_dict(store.state(step), strict=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    tokens = torch.stack([task.train[i].data[0] for i in range(len(task.train))])
    queries = torch.stack([task.queries[i].data[0] for i in range(len(task.queries))])
    lm_task = LMTask(
        model_factory=lambda: GPTLogits(task),
        checkpoints=[full_state(s) for s in store.steps],
        lr_weights=[c.lr_sum[0] for c in store.checkpoints],
        train_tokens=tokens,
        test_tokens=queries,
    )
    return peer_rows(task, run_peers_lm(lm_task, names), bank, None, info)


def peer_rows(task: Task, results, bank, exact_scores, info) -> list[Row]:
    """Rows (LDS or mislabel AUC) of peer results; records the TracIn plumbing check in ``info``."""
    rows = []
    for r in results:
        settings, notes = _settings(r.settings)
        row = Row(
            task.name,
            r.method,
            r.library,
            settings,
            r.seconds,
            notes=notes,
            extra={"settings": r.settings},
        )
        if r.error:
            row.notes = f"failed: {r.error.splitlines()[0][:160]}"
            rows.append(row)
            continue
        scores = torch.from_numpy(r.scores)
        if task.flipped is not None:
            row.method = f"{r.method} self-influence"
            row.auc = float(
                mislabel_detection_auc(torch.diagonal(scores), torch.from_numpy(task.flipped))
            )
            rows.append(row)
            continue
        out = torch.from_numpy(bank.outputs[task.primary])
        subsets = torch.from_numpy(bank.subsets.astype(np.int64))
        rep = lds_report(scores, subsets, out, bank.measurement(task.primary))
        row.lds, row.ci = rep.mean, (rep.ci_low, rep.ci_high)
        if exact_scores is not None and "TracIn" in r.method and "exact" in r.method.lower():
            rho = float(
                np.mean([spearmanr(exact_scores[q], scores[q])[0] for q in range(len(scores))])
            )
            row.extra["spearman_vs_lightning_tda_exact_tracin"] = rho
            info.setdefault("plumbing", {})[f"{r.library} {r.method}"] = rho
        rows.append(row)
    return rows


_NOTE_KEYS = ("note", "known_issue", "workaround")


def _settings(settings: dict) -> tuple[str, str]:
    """Compact ``k=v`` settings and the notes a peer attached (full settings stay in quality.json)."""
    keep = {k: v for k, v in settings.items() if k not in _NOTE_KEYS and k != "train_batch_size"}
    text = ", ".join(f"{k}={v}" for k, v in keep.items())
    notes = "; ".join(str(settings[k]) for k in _NOTE_KEYS if k in settings)
    return (text[:110] + " ...") if len(text) > 110 else text, (notes[:160] + " ...") if len(
        notes
    ) > 160 else notes


def _fmt(v: float | None, ci: tuple[float, float] | None = None) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def write_markdown(rows: list[Row], infos: dict, command: str) -> str:
    lines = [
        "## Quality (counterfactual)",
        "",
        f"Produced by `{command}` on {date.today().isoformat()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}). LDS = mean per-query Spearman "
        "between the summed scores of each retraining subset and the subset models' measurement, with a 95% "
        "bootstrap CI over queries; the noise ceiling is the square root of the Spearman–Brown reliability of the bank's seed average "
        "(the correlation a noise-free predictor can expect against that average). "
        "Seconds are wall time in this process: logging sweeps (or a peer's featurization) plus scoring; "
        "lightning_tda's training itself is not counted. Every method runs at its default settings "
        "(settings column); nothing is tuned on the evaluation queries.",
        "",
    ]
    for task_name, info in infos.items():
        lines.append(f"### {task_name}: {info['describe']}")
        lines.append("")
        if "bank" in info:
            b = info["bank"]
            ceil = f"{b['ceiling']:.3f}" if b.get("ceiling") is not None else "n/a"
            lines.append(
                f"Bank: M = {b['M']} subsets × R = {b['R']} seeds, α = {b['alpha']}, Q = {b['Q']} queries, "
                f"measurement `{b['measurement']}`; reliability {b.get('reliability', float('nan')):.3f}, "
                f"noise ceiling {ceil}."
            )
            lines.append("")
        if info.get("plumbing"):
            lines.append(
                "Plumbing proof (same checkpoints, exact gradients): mean per-query Spearman against "
                "lightning_tda `tracin` (exact): "
                + ", ".join(f"{k} {v:.4f}" for k, v in info["plumbing"].items())
                + "."
            )
            lines.append("")
        if info.get("removal"):
            rm = info["removal"]
            lines.append(
                f"Top-k removal ({rm['method']}, {rm['queries']} queries, 2 seeds): retraining without each "
                f"query's top-{rm['k']} proponents changes its loss by {rm['mean_topk']:+.4f} on average, "
                f"without {rm['k']} random examples by {rm['mean_random']:+.4f}; the proponents' removal "
                f"hurts more for {rm['fraction']:.0%} of queries ({rm['seconds']:.0f} s)."
            )
            lines.append("")
        if info.get("bytes_per_example_per_checkpoint"):
            lines.append(
                "Stored row bytes per example per checkpoint: "
                + ", ".join(
                    f"{k} {v:,.0f} B" for k, v in info["bytes_per_example_per_checkpoint"].items()
                )
                + "."
            )
            lines.append("")
        metric = "LDS [95% CI]" if "bank" in info else "mislabel AUC"
        lines.append(f"| method | library | config / settings | {metric} | seconds | notes |")
        lines.append("|---|---|---|---|---|---|")
        for r in [r for r in rows if r.task == task_name]:
            val = _fmt(r.lds, r.ci) if r.lds is not None else _fmt(r.auc)
            lines.append(
                f"| {r.method} | {r.library} | {r.config} | {val} | {r.seconds:.2f} | {r.notes} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_stride_markdown(rows: list[Row], infos: dict, command: str) -> str:
    """The STRIDE section: LDS and end-to-end seconds of STRIDE next to the gradient methods."""
    lines = [
        "## STRIDE next to gradient-based attribution",
        "",
        f"Produced by `{command}` on {date.today().isoformat()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch threads), every row in one process on the same banks as the "
        "quality section. Seconds are the post-training cost: for gradient methods the logging sweeps "
        "plus scoring (a peer: its featurization plus scoring); for STRIDE the operator fit "
        "(feature cache, Lightning fit, λ by cross-validation on 64 held-out *training* examples) plus "
        "measuring and recovering the queries — STRIDE reads no gradient rows. Training itself, the "
        "same for all, is not counted. K subsets, d subsets per example, basis rank r; λ is the Lasso "
        "penalty as a fraction of λ_max = ‖Mᵀy‖_∞, chosen per checkpoint.",
        "",
    ]
    for task_name, info in infos.items():
        lines.append(f"### {task_name}: {info['describe']}")
        lines.append("")
        if "bank" in info:
            b = info["bank"]
            lines.append(
                f"Bank: M = {b['M']} × R = {b['R']}, Q = {b['Q']}, noise ceiling {b['ceiling']:.3f}; "
                f"training the logged run took {next(iter(info['fit_seconds'].values())):.1f} s."
            )
            lines.append("")
        lines.append("| method | library | config / settings | LDS [95% CI] | seconds | notes |")
        lines.append("|---|---|---|---|---|---|")
        for r in [r for r in rows if r.task == task_name]:
            lines.append(
                f"| {r.method} | {r.library} | {r.config} | {_fmt(r.lds, r.ci)} | "
                f"{r.seconds:.2f} | {r.notes} |"
            )
        lines.append("")
    return "\n".join(lines)


SUITES = {
    "quality": "digits,tinygpt,mislabel,digits_short,digits_two_stage",
    "stride": "digits,tinygpt",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=[*sorted(SUITES), "perf"], default="quality")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: the suite's)")
    ap.add_argument("--no-peers", action="store_true")
    args, rest = ap.parse_known_args()
    if (
        args.suite == "perf"
    ):  # the performance suite has its own options (python -m benchmarks.perf -h)
        from benchmarks.perf import main as perf_main

        perf_main(rest + (["--tasks", args.tasks] if args.tasks else []))
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    tasks = args.tasks or SUITES[args.suite]
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    rows, infos = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in tasks.split(","):
            task = TASKS[name]()
            if (
                task.flipped is None
                and not (bank_path(name) / f"outputs_{task.primary}.npy").exists()
            ):
                print(f"building the {name} bank (resumable) ...", flush=True)
                build_bank(name)
            print(f"task {name} ...", flush=True)
            r, info = run_task(task, Path(tmp), peers=not args.no_peers, suite=args.suite)
            rows += r
            infos[name] = info
            for row in r:
                print(
                    f"  {row.method:32s} {row.library:14s} {row.config[:40]:40s} "
                    f"{_fmt(row.lds, row.ci) or _fmt(row.auc):26s} {row.seconds:7.2f}s {row.notes}",
                    flush=True,
                )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.suite}.json"
    command = f"python -m benchmarks.run --suite {args.suite}"
    if tasks != SUITES[args.suite] and path.exists():  # re-ran some tasks: keep the others' rows
        old = json.loads(path.read_text())
        ran = set(tasks.split(","))
        keep = [Row(**(r | {"ci": tuple(r["ci"]) if r["ci"] else None})) for r in old["rows"]]
        rows = [r for r in keep if r.task not in ran] + rows
        infos = {k: v for k, v in old["tasks"].items() if k not in ran} | infos
        command += f"` and then `{command} --tasks {tasks}"  # rendered inside backticks
    elif tasks != SUITES[args.suite]:
        command += f" --tasks {tasks}"
    path.write_text(
        json.dumps({"rows": [r.__dict__ for r in rows], "tasks": infos}, indent=1, default=float)
    )
    if args.suite == "stride":
        update_benchmarks_md(write_stride_markdown(rows, infos, command), marker="stride")
    else:
        update_benchmarks_md(write_markdown(rows, infos, command))
    print(f"wrote BENCHMARKS.md and benchmarks/results/{args.suite}.json")


if __name__ == "__main__":
    main()
