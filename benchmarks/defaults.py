"""Choose defaults on half of each bank's queries, report LDS on the other half (issue 12).

``python -m benchmarks.defaults --task clf_adamw [--task ...] [--out results/defaults_<task>.json]``

For each task the model is trained once per capture configuration (``GradientLogger`` kwargs), the query
gradients are computed once per store, and every candidate method setting is scored. Each candidate
gets its LDS on the *choosing* half and on the *reporting* half of the queries (a seeded split of the
query positions, :func:`query_halves`); defaults are picked on the choosing half only.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.banks_build import TASKS, bank_path
from benchmarks.common import fit_logged, logging_seconds, stored_bytes_per_example
from benchmarks.tasks import Task
from lightning_tda.eval.metrics import bootstrap_ci, linear_datamodeling_score
from lightning_tda.eval.retrain import Bank
from lightning_tda.methods.scoring import stream_scores

RESULTS = Path(__file__).parent / "results"


def query_halves(num_queries: int, seed: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """``(choose, report)`` query positions: a seeded random half each (sorted)."""
    perm = np.random.default_rng(seed).permutation(num_queries)
    half = num_queries // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


@dataclass
class BankView:
    """A bank's subsets and primary outputs as tensors, with the query halves."""

    subsets: torch.Tensor
    outputs: torch.Tensor  # [M, R, Q]
    measurement: str
    choose: np.ndarray
    report: np.ndarray

    @classmethod
    def load(cls, task: Task) -> BankView:
        bank = Bank.load(bank_path(task.name))
        out = torch.from_numpy(bank.outputs[task.primary])
        choose, report = query_halves(out.shape[2])
        subsets = torch.from_numpy(bank.subsets.astype(np.int64))
        return cls(subsets, out, bank.measurement(task.primary), choose, report)

    def per_query(self, scores: torch.Tensor) -> torch.Tensor:
        return linear_datamodeling_score(scores, self.subsets, self.outputs, self.measurement)

    def halves(self, scores: torch.Tensor) -> dict:
        pq = self.per_query(scores.double()).numpy()
        rep = pq[self.report]
        lo, hi = bootstrap_ci(torch.from_numpy(rep), 2000, seed=0)
        return {
            "choose": float(np.nanmean(pq[self.choose])),
            "report": float(np.nanmean(rep)),
            "report_ci": [lo, hi],
            "all": float(np.nanmean(pq)),
        }


def dense_scores(store, method, qvecs) -> torch.Tensor:
    """``[Q, N]`` scores of ``method`` for precomputed query vectors (losses kept for TRAK)."""
    terms = method.score_terms(store, qvecs)
    return stream_scores(store, terms, None, None, description=None)


Candidate = tuple[str, Callable]  # (label, store -> AttributionMethod | str)


def evaluate_capture(
    task: Task,
    bank: BankView,
    label: str,
    logger_kwargs: dict,
    candidates: list[Candidate],
    workdir: Path,
) -> list[dict]:
    """Train with one capture, score every candidate, return one row per candidate."""
    from lightning_tda.methods import get_method

    path = workdir / f"{task.name}-{label.replace(' ', '_')}.h5"
    model, store, fit_s = fit_logged(task, path, **logger_kwargs)
    log_s = logging_seconds(store)
    t0 = time.perf_counter()
    qvecs, _ = store.query_vectors(task.queries, model, list(store.steps), batch_size=64)
    q_s = time.perf_counter() - t0
    per_ck_q = q_s / max(1, len(store.steps))
    rows = []
    for name, make in candidates:
        m = make(store)
        m = get_method(m) if isinstance(m, str) else m
        t0 = time.perf_counter()
        try:
            scores = dense_scores(store, m, qvecs)
        except Exception as e:  # a failing candidate is a row with its error
            rows.append({"capture": label, "method": name, "error": repr(e)[:300]})
            continue
        secs = time.perf_counter() - t0
        used = len(m.used_checkpoints(store))
        res = bank.halves(scores)
        finite = bool(torch.isfinite(scores).all())
        rows.append(
            {
                "capture": label,
                "method": name,
                **res,
                "finite": finite,
                "seconds": secs + log_s + per_ck_q * used,
                "score_seconds": secs,
                "bytes_per_example_per_ckpt": stored_bytes_per_example(store),
                "checkpoints": len(store.steps),
            }
        )
        print(
            f"{task.name:16s} {label:28s} {name:44s} choose {res['choose']:.3f} report "
            f"{res['report']:.3f} ({secs:.1f}s)",
            flush=True,
        )
    path.unlink(missing_ok=True)
    return rows


def main() -> None:
    from benchmarks.explore import candidates_for, captures_for, final_candidates, final_captures

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--captures", nargs="*", default=None, help="capture labels to run")
    ap.add_argument("--tag", default="explore")
    ap.add_argument("--methods", default=None, help="regex: only candidates whose label matches")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    for name in args.task:
        task = TASKS[name]()
        bank = BankView.load(task)
        rows = []
        final = args.tag == "final"
        captures = final_captures(task) if final else captures_for(task)
        with tempfile.TemporaryDirectory() as tmp:
            for label, kwargs in captures:
                if args.captures and label not in args.captures:
                    continue
                cands = (final_candidates if final else candidates_for)(task, label)
                if args.methods:
                    cands = [c for c in cands if re.search(args.methods, c[0])]
                rows += evaluate_capture(task, bank, label, kwargs, cands, Path(tmp))
        out = RESULTS / f"{args.tag}_{name}.json"
        old = json.loads(out.read_text()) if out.exists() else []
        keep = [
            r
            for r in old
            if (r["capture"], r["method"]) not in {(x["capture"], x["method"]) for x in rows}
        ]
        out.write_text(json.dumps(keep + rows, indent=1))


if __name__ == "__main__":
    main()
