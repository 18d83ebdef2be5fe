"""STRIDE on the AdamW banks, next to the gradient methods and the peers (issue 16).

``python -m benchmarks.stride_suite [--tasks gpt_single_pass,gpt_adamw,clf_adamw] [--configs REGEX [--merge]]``

Per bank: the model is trained once with the default ``GradientLogger`` (preset "accurate") plus a
probe recording the optimizer step at which each training example was seen; the gradient methods
(``attribute()``'s default, raw influence, SOURCE, TracIn) score the bank's queries from that store,
and every STRIDE configuration is fitted on the same store and checkpoints. LDS is reported on the
choosing and the reporting half of the queries (:mod:`benchmarks.defaults`; a STRIDE default is
chosen on the choosing half). Seconds: gradient methods = logging sweeps + query gradients + scoring;
STRIDE = operator fit (features, Lightning fit, λ by cross-validation on held-out *training*
examples) + measuring and recovering the queries; training itself is not counted.

Diagnosis per STRIDE configuration (its last fitted checkpoint): on 512 training examples, how much
each subset's operator lowers its members' loss against non-members' (``lift``: the mean over
subsets of member minus non-member response, in units of the non-members' standard deviation).

Writes ``results/stride_<task>.json``, then renders BENCHMARKS.md's STRIDE section from every
bank's JSON (:mod:`benchmarks.render_stride`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from benchmarks.banks_build import TASKS
from benchmarks.common import fit_logged, logging_seconds
from benchmarks.defaults import RESULTS, BankView, dense_scores
from benchmarks.tasks import Task
from lightning_tda import AttributionStore, CausalLMTask, ClassificationTask
from lightning_tda.methods import Influence, Source, get_method
from lightning_tda.methods.auto import auto_method
from lightning_tda.stride import Stride, StrideConfig
from lightning_tda.stride import fit as stride_fit
from lightning_tda.stride import load as stride_load
from lightning_tda.stride.operator import output_module_name
from lightning_tda.stride.recover import cosamp

QUIET = {"enable_progress_bar": False, "logger": False, "accelerator": "cpu"}


@dataclass
class StrideRun:
    """One STRIDE configuration: ``which`` checkpoints (``last``, ``first``, ``all`` or
    ``pre-exposure``: every checkpoint, each example's influence from the last checkpoint before
    the step that trained on it)."""

    label: str
    config: StrideConfig
    which: str = "last"
    note: str = ""


def old_default_layer(model: torch.nn.Module) -> str:
    """The rule before issue 16: the output of the Linear/Conv1D module at 2/3 depth."""
    out = output_module_name(model)
    names = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and n != out
    ]
    return names[min(len(names) - 1, round(2 * len(names) / 3) - 1)]


def stride_runs(task: Task, model: torch.nn.Module) -> list[StrideRun]:
    runs = [StrideRun("defaults", StrideConfig())]
    if task.name.startswith("gpt"):
        blocks = [n for n, _ in model.named_modules() if re.fullmatch(r".*\.h\.\d+", n)]
        runs += [
            StrideRun(
                "Linear at 2/3 depth (old layer rule)",
                StrideConfig(layer=old_default_layer(model)),
            ),
            StrideRun(
                f"residual after the last block ({blocks[-1]})", StrideConfig(layer=blocks[-1])
            ),
        ]
    runs += [
        StrideRun("linearity weight 0", StrideConfig(linearity_weight=0.0)),
        StrideRun("linearity on 64 sampled operators", StrideConfig(linearity_subsets=64)),
        StrideRun(
            "reference batch 4x (64 non-members per subset)",
            StrideConfig(reference_per_subset=64),
        ),
        StrideRun("steps 600", StrideConfig(steps=600, linearity_subsets=64)),
        StrideRun(
            "K=1000, steps 600", StrideConfig(num_subsets=1000, steps=600, linearity_subsets=64)
        ),
        StrideRun("checkpoint-aware", StrideConfig(), "all"),
        StrideRun("d=5 subsets per example", StrideConfig(degree=5)),
        StrideRun("d=20 subsets per example", StrideConfig(degree=20)),
    ]
    if task.name == "gpt_single_pass":  # beyond the paper's K: n = 10,000 needs K >> 1000
        cfg = StrideConfig(num_subsets=3000, steps=2000, linearity_subsets=64)
        runs.append(StrideRun("K=3000, steps 2000", cfg))
    return runs


def stride_task(task: Task):
    """The targets said explicitly: ``(ids, (tokens,))`` LM batches hold Hugging Face-style labels."""
    if task.name.startswith("gpt"):
        return CausalLMTask(labels="hf", inputs=0, label_key=0)
    return ClassificationTask()


class SeenAt(pl.Callback):
    """The global step (1-based, after the optimizer step) at which each example id was trained."""

    def __init__(self) -> None:
        self.step: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch.example_id if hasattr(batch, "example_id") else batch[0]
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            self.step.setdefault(int(i), trainer.global_step)


def fit_store(task: Task, path: Path) -> tuple[torch.nn.Module, AttributionStore, SeenAt]:
    """The task's logged run with the default GradientLogger and the :class:`SeenAt` probe."""
    seen = SeenAt()
    model, store, _ = fit_logged(task, path, callbacks=[seen], batch_size=None)
    return model, store, seen


@dataclass
class Result:
    task: str
    method: str
    library: str
    settings: str
    choose: float
    report: float
    report_ci: list[float]
    seconds: float
    extra: dict = field(default_factory=dict)


def gradient_rows(task: Task, bank: BankView, model, store: AttributionStore) -> list[Result]:
    t0 = time.perf_counter()
    qvecs, _ = store.query_vectors(task.queries, model, list(store.steps), batch_size=64)
    per_ck = (time.perf_counter() - t0) / len(store.steps)
    log_s = logging_seconds(store)
    methods = [
        ("attribute() defaults", auto_method(store)[0]),
        ("influence (raw, all ckpts)", Influence(checkpoints=store.steps)),
        ("source (L=1)", Source(segments=1)),
        ("tracin", "tracin"),
    ]
    rows, best = [], None
    for label, m in methods:
        m = get_method(m) if isinstance(m, str) else m
        t0 = time.perf_counter()
        scores = dense_scores(store, m, qvecs)
        best = scores if best is None else best
        secs = time.perf_counter() - t0 + log_s + per_ck * len(m.used_checkpoints(store))
        h = bank.halves(scores)
        rows.append(
            Result(task.name, label, "lightning_tda", "default capture", h["choose"], h["report"],
                   h["report_ci"], secs)
        )  # fmt: skip
        print(f"{task.name:16s} {label:44s} choose {h['choose']:.3f} report {h['report']:.3f}")
    return rows, best


CEILING_K = (300, 1000, 3000)


def design_ceiling_rows(task: Task, bank: BankView, store, scores: torch.Tensor) -> list[Result]:
    """What K subsets can carry at all: the default gradient method's scores ``w`` measured exactly
    through a K-subset design (``y = M w``) and recovered by the minimum-norm solution
    ``Mᵀ(MMᵀ)⁻¹y``. A dense ``w`` keeps about ``sqrt(K/n)`` of its LDS (the projection onto M's
    K-dimensional row space), whatever the operators."""
    from lightning_tda.stride.design import SubsetDesign

    rows = []
    w = scores.double().numpy().T  # [n, Q]
    for k in CEILING_K:
        if k >= store.num_examples:
            continue
        m = SubsetDesign.draw(store.example_ids, k, 10, seed=0).matrix.astype(np.float64)
        y = m @ w  # [K, Q]
        gram = (m @ m.T).toarray()
        rec = m.T @ np.linalg.solve(gram + 1e-9 * np.eye(k), y)  # [n, Q]
        h = bank.halves(torch.from_numpy(np.asarray(rec).T.copy()))
        rows.append(
            Result(task.name, f"design ceiling, K={k} (oracle)", "-",
                   f"attribute() defaults' scores through a K={k}, d=10 design, min-norm recovery",
                   h["choose"], h["report"], h["report_ci"], 0.0,
                   {"ceiling_k": k, "sqrt_k_over_n": (k / store.num_examples) ** 0.5})
        )  # fmt: skip
        print(
            f"{task.name:16s} design ceiling K={k}: choose {h['choose']:.3f} report {h['report']:.3f}"
        )
    return rows


def _measure_lift(store: AttributionStore, model, task: Task, step: int) -> float:
    """Mean over subsets of (member - non-member) response on 512 training examples, in units of
    the non-members' standard deviation, at operators fitted at ``step``."""
    from lightning_tda.capture.replay import loaded_state
    from lightning_tda.stride.operator import extract, feature_forward

    res = stride_load(store.path, step)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(store.num_examples, size=min(512, store.num_examples), replace=False))
    sub = torch.utils.data.Subset(task.train, rows.tolist())
    loader = torch.utils.data.DataLoader(sub, batch_size=64)
    st = stride_task(task)
    fwd = feature_forward(model, st)
    ys = []
    with loaded_state(model, store.state(step)):
        for batch in loader:
            ys.append(
                res.operators.measure(
                    extract(model, batch, res.layer, res.output_module, fwd, task=st)
                )
            )
    y = torch.cat(ys).numpy()  # [n, K]
    member = res.design.matrix[:, rows].T.toarray() > 0  # [n, K]
    lifts = []
    for k in range(y.shape[1]):
        mem, non = y[member[:, k], k], y[~member[:, k], k]
        if len(mem) and len(non) > 1 and non.std() > 0:
            lifts.append((mem.mean() - non.mean()) / non.std())
    return float(np.mean(lifts)) if lifts else float("nan")


def _pre_exposure_scores(store, model, task, st, seen: SeenAt, steps: list[int]) -> torch.Tensor:
    """``[Q, N]``: example i's column from the operators at the last checkpoint before its step."""
    per = {}
    for s in steps:
        per[s] = store.attribute(
            task.queries, model=model, method=Stride(checkpoints=[s], task=st), top_k=None
        ).scores
    ids = store.example_ids.tolist()
    seen_step = np.array([seen.step[int(i)] for i in ids])
    out = torch.zeros_like(per[steps[0]])
    for i, s_i in enumerate(seen_step):
        before = [s for s in steps if s < s_i]
        out[:, i] = per[before[-1] if before else steps[0]][:, i]
    return out


OMP_SPARSITY = (10, 30, 100)
"""Non-zeros per query of orthogonal matching pursuit, the Lasso's alternative (defaults' fit only)."""


def omp_rows(task, bank, model, store, steps: list[int], fit_s: float) -> list[Result]:
    """Orthogonal matching pursuit (scikit-learn), CoSaMP and minimum-norm recovery on the same
    measurements as the Lasso."""
    from sklearn.linear_model import orthogonal_mp

    rows = []
    step = steps[-1]
    t0 = time.perf_counter()
    y, _ = Stride(checkpoints=[step], task=stride_task(task)).measurements(
        store, task.queries, model, step
    )
    measure_s = time.perf_counter() - t0
    m = stride_load(store.path, step).design.matrix.toarray().astype(np.float64)  # [K, n]
    for k in OMP_SPARSITY:
        t0 = time.perf_counter()
        coef = orthogonal_mp(m, y.T.double().numpy(), n_nonzero_coefs=k)  # [n, Q]
        scores = torch.from_numpy(np.asarray(coef).T.copy())
        h = bank.halves(scores)
        secs = fit_s + measure_s + time.perf_counter() - t0
        rows.append(
            Result(task.name, f"stride (defaults, OMP {k} non-zeros)", "lightning_tda",
                   f"the defaults' operators; recovery by OMP with {k} non-zeros per query",
                   h["choose"], h["report"], h["report_ci"], secs, {"omp": k})
        )  # fmt: skip
        print(f"{task.name:16s} stride OMP {k}: choose {h['choose']:.3f} report {h['report']:.3f}")
    for k in OMP_SPARSITY:
        if 3 * k > m.shape[0]:
            continue
        t0 = time.perf_counter()
        h = bank.halves(cosamp(m, y, k))
        rows.append(
            Result(task.name, f"stride (defaults, CoSaMP {k} non-zeros)", "lightning_tda",
                   f"the defaults' operators; recovery by CoSaMP with {k} non-zeros per query",
                   h["choose"], h["report"], h["report_ci"],
                   fit_s + measure_s + time.perf_counter() - t0, {"cosamp": k})
        )  # fmt: skip
        print(
            f"{task.name:16s} stride CoSaMP {k}: choose {h['choose']:.3f} report {h['report']:.3f}"
        )
    t0 = time.perf_counter()
    gram = m @ m.T
    dense = m.T @ np.linalg.solve(gram + 1e-9 * np.eye(len(gram)), y.T.double().numpy())  # [n, Q]
    h = bank.halves(torch.from_numpy(dense.T.copy()))
    rows.append(
        Result(task.name, "stride (defaults, minimum-norm recovery)", "lightning_tda",
               "the defaults' operators; w = Mᵀ(MMᵀ)⁻¹y (dense, no sparsity prior)",
               h["choose"], h["report"], h["report_ci"],
               fit_s + measure_s + time.perf_counter() - t0, {"recovery": "min-norm"})
    )  # fmt: skip
    print(f"{task.name:16s} stride min-norm: choose {h['choose']:.3f} report {h['report']:.3f}")
    return rows


def stride_rows(task, bank, model, store, seen, runs: list[StrideRun]) -> list[Result]:
    st = stride_task(task)
    rows = []
    for run in runs:
        steps = {
            "last": store.steps[-1:],
            "first": store.steps[:1],
        }.get(run.which, list(store.steps))
        t0 = time.perf_counter()
        stride_fit(store, model, task.train, run.config, checkpoints=steps, task=st,
                   overwrite=True, trainer_kwargs=QUIET)  # fmt: skip
        fit_s = time.perf_counter() - t0
        alphas = [stride_load(store.path, s).alpha for s in steps]
        layer = stride_load(store.path, steps[-1]).layer
        lift = _measure_lift(store, model, task, steps[-1])
        if run.label == "defaults":
            rows += omp_rows(task, bank, model, store, steps, fit_s)
        combos = [(run.label, run.which)]
        if run.which == "all":  # the same fits: the first alone; each example from the
            # checkpoint before the step that trained on it
            combos.append(("first checkpoint", "first"))
            if task.name == "gpt_single_pass":  # each example seen once: its step is meaningful
                combos.append(("pre-exposure checkpoints", "pre-exposure"))
        for label, which in combos:
            t0 = time.perf_counter()
            if which == "pre-exposure":
                scores = _pre_exposure_scores(store, model, task, st, seen, steps)
            elif which == "first":
                method = Stride(checkpoints=steps[:1], task=st)
                scores = store.attribute(
                    task.queries, model=model, method=method, top_k=None
                ).scores
            else:
                method = Stride(checkpoints=steps, task=st)
                scores = store.attribute(
                    task.queries, model=model, method=method, top_k=None
                ).scores
            used_fit = fit_s / len(steps) if which == "first" else fit_s  # one of the fits
            secs = used_fit + time.perf_counter() - t0
            h = bank.halves(scores)
            c = run.config
            settings = (
                f"K={c.num_subsets}, d={c.degree}, r={c.rank}, steps={c.steps}, "
                f"linearity {c.linearity_weight:g}, layer {layer}, ckpts={which} ({len(steps)}), "
                f"λ={'/'.join(f'{a:g}' for a in alphas)}·λ_max"
            )
            rows.append(
                Result(task.name, f"stride ({label})", "lightning_tda", settings, h["choose"],
                       h["report"], h["report_ci"], secs,
                       {"fit_seconds": fit_s, "lift": lift, "config": asdict(c), "which": which,
                        "checkpoints": steps, "alpha": alphas, "layer": layer})
            )  # fmt: skip
            print(
                f"{task.name:16s} stride ({label}) choose {h['choose']:.3f} report {h['report']:.3f} "
                f"lift {lift:.3f} ({secs:.0f} s)",
                flush=True,
            )
    return rows


def peer_rows(task: Task) -> list[Result]:
    """The peers' defaults and best-on-choosing-half rows from ``benchmarks.peer_sweep``'s JSON."""
    path = RESULTS / f"peers_{task.name}.json"
    if not path.exists():
        return []
    out = []
    for r in json.loads(path.read_text()):
        if r.get("error") or not (r.get("is_default") or r.get("best_on_choose")):
            continue
        tag = "defaults" if r.get("is_default") else "best on choosing half"
        out.append(
            Result(task.name, f"{r['method']} ({tag})", r["library"],
                   json.dumps(r["settings"])[:90], r["choose"], r["report"], r["report_ci"],
                   float(r["seconds"]), {"from": path.name})
        )  # fmt: skip
    return out


def run_task(name: str, pattern: str | None, stride_only: bool = False) -> dict:
    """Every row of bank ``name`` (``stride_only``: only the STRIDE runs matching ``pattern``)."""
    task = TASKS[name]()
    bank = BankView.load(task)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, store, seen = fit_store(task, Path(tmp) / f"{name}.h5")
        train_s = time.perf_counter() - t0
        rows = []
        if not stride_only:
            rows, best = gradient_rows(task, bank, model, store)
            rows += design_ceiling_rows(task, bank, store, best)
        runs = [
            r for r in stride_runs(task, model) if pattern is None or re.search(pattern, r.label)
        ]
        rows += stride_rows(task, bank, model, store, seen, runs)
    if not stride_only:
        rows += peer_rows(task)
    return {
        "task": name,
        "describe": task.describe,
        "train_seconds": train_s,
        "checkpoints": list(store.steps),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [asdict(r) for r in rows],
    }


def merged(old: dict, new: dict) -> dict:
    """``old``'s rows with ``new``'s STRIDE rows put in (replacing rows of the same name, else
    after the last STRIDE row), each marked with the date of its run."""
    for r in new["rows"]:
        r["extra"]["note"] = (
            f"run {new['date']} (--merge), same training seed and store configuration"
        )
        old["rows"] = [x for x in old["rows"] if x["method"] != r["method"]]
    last = max(i for i, r in enumerate(old["rows"]) if r["method"].startswith("stride"))
    old["rows"][last + 1 : last + 1] = new["rows"]
    return old


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="gpt_single_pass,gpt_adamw,clf_adamw")
    ap.add_argument("--configs", default=None, help="regex: only STRIDE runs whose label matches")
    ap.add_argument(
        "--no-render", dest="render", action="store_false", help="skip rendering BENCHMARKS.md"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="with --configs: replace only those STRIDE rows in the bank's JSON (dated)",
    )
    a = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for name in a.tasks.split(","):
        path = RESULTS / f"stride_{name}.json"
        res = run_task(name, a.configs, stride_only=a.merge)
        if a.merge:
            res = merged(json.loads(path.read_text()), res)
        path.write_text(json.dumps(res, indent=1) + "\n")
    if a.render:
        from benchmarks.render_stride import main as render

        render([])


if __name__ == "__main__":
    main()
