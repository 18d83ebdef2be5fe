"""Render ``results/stride_<task>.json`` (:mod:`benchmarks.stride_suite`) into BENCHMARKS.md.

``python -m benchmarks.render_stride [--tasks gpt_single_pass,gpt_adamw,clf_adamw]``

One table per bank (LDS on the choosing and the reporting half, with the reporting half's 95 %
bootstrap CI, and end-to-end seconds), and ``results/stride_lift.png``: each STRIDE row's member
lift against its reporting-half LDS.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import ROOT, update_benchmarks_md
from benchmarks.defaults import RESULTS

TASKS = ("gpt_single_pass", "gpt_adamw", "clf_adamw")
PLOT = RESULTS / "stride_lift.png"


def _table(res: dict) -> list[str]:
    lines = [
        f"### {res['task']}: {res['describe']}",
        "",
        f"Run {res['date']}; checkpoints at steps {', '.join(map(str, res['checkpoints']))}; "
        f"training the logged run took {res['train_seconds']:.0f} s (not counted below).",
        "",
        "| method | library | settings | LDS choosing half | LDS reporting half [95% CI] | seconds | member lift |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lo, hi = r["report_ci"]
        lift = r["extra"].get("lift")
        src = r["extra"].get("from")
        secs = f"{r['seconds']:.1f}" + (f" ({src})" if src else "")
        note = r["extra"].get("note")
        settings = r["settings"] + (f"; {note}" if note else "")
        lines.append(
            f"| {r['method']} | {r['library']} | {settings} | {r['choose']:.3f} | "
            f"{r['report']:.3f} [{lo:.3f}, {hi:.3f}] | {secs} | "
            f"{'' if lift is None else f'{lift:.3f}'} |"
        )
    return lines


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        pts = [(r["extra"]["lift"], r["report"]) for r in res["rows"] if "lift" in r["extra"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, label=res["task"])
    ax.set_xlabel("member lift (members' minus non-members' response, in non-member SDs)")
    ax.set_ylabel("STRIDE LDS, reporting half")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(tasks: tuple[str, ...] | list[str] = TASKS) -> str:
    results = [
        json.loads((RESULTS / f"stride_{t}.json").read_text())
        for t in tasks
        if (RESULTS / f"stride_{t}.json").exists()
    ]
    plot(results)
    lines = [
        "## STRIDE next to gradient-based attribution",
        "",
        "Produced by `python -m benchmarks.stride_suite` (it renders this section through "
        "`benchmarks.render_stride`), on the AdamW banks of the Defaults section, each bank in one "
        "process on a 2-core CPU. Each bank's queries are split as in the Defaults section (seed 12); "
        "STRIDE's defaults are chosen on the choosing half. Seconds: gradient methods = logging sweeps "
        "+ query gradients + scoring; STRIDE = operator fit (features, Lightning fit, λ by "
        "cross-validation on 64 held-out *training* examples) + measuring and recovering the queries "
        "(it reads no gradient rows); a peer's = its featurization + scoring, from "
        "`benchmarks.peer_sweep`'s run (file named). Training is not counted. K subsets, d subsets per "
        "example, basis rank r, λ as a fraction of λ_max = ‖Mᵀy‖_∞. Member lift: on 512 training "
        "examples, the mean over subsets of (members' − non-members' loss decrease under the subset's "
        "operator) in units of the non-members' standard deviation, at the last fitted checkpoint; "
        f"plotted against LDS in `{PLOT.relative_to(ROOT)}`.",
        "",
    ]
    for res in results:
        lines += _table(res) + [""]
    lines.append(f"![member lift against LDS]({PLOT.relative_to(ROOT)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    a = ap.parse_args(argv)
    update_benchmarks_md(render(a.tasks.split(",")), marker="stride")


if __name__ == "__main__":
    main()
