"""Render BENCHMARKS.md's "Scale" section from ``benchmarks/results/scale.json``
(``python -m benchmarks.render_scale``; :mod:`benchmarks.scale` calls it after its stages)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.scale import RESULTS

BENCH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
START, END = "<!-- scale:start -->", "<!-- scale:end -->"


def _index(res: dict) -> list[str]:
    out = []
    for name, r in res.items():
        if not isinstance(r, dict):  # ("ran_at")
            continue
        d = next(x for x in r["sweep"] if x.get("default"))
        out += [
            f"**{name} rows** ({r['rows']:,} × {r['width']}, float16; top 10 proponents and "
            f"opponents of {r['queries']['report']} reporting queries, timed, and "
            f"{r['queries']['choose']} choosing queries): exact scan {r['exact_seconds']:.2f} s; "
            f"the default index `{d['factory']}` built in {r['build_seconds']:.0f} s (store "
            f"written in {r['write_seconds']:.0f} s).",
            "",
            "| factory | nprobe | refine | recall@10 choosing | recall@10 reporting | "
            "opponents reporting | seconds | speed-up vs exact |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["sweep"]:
            mark = " **(default)**" if x.get("default") else ""
            refine = x["refine"] if "Refine" in x["factory"] or "RFlat" in x["factory"] else "–"
            out.append(
                f"| `{x['factory']}`{mark} | {x['nprobe']} | {refine} | "
                f"{x['recall_at_10_choose']:.3f} | {x['recall_at_10_report']:.3f} | "
                f"{x['opponent_recall_at_10_report']:.3f} | {x['seconds']:.3f} | {x['speedup']:.1f}× |"
            )
        out.append("")
    return out


def _sharded(res: dict) -> list[str]:
    out = [
        f"Exact scan of the clustered store ({res['rows']:,} rows, {res['queries']} queries, "
        f"top 10) with `attribute(..., distributed=True)` on {res['cpus']} CPU cores (gloo):",
        "",
        "| processes | torch threads each | seconds | rows × queries / s | result = 1 process |",
        "|---:|---:|---:|---:|:--:|",
    ]
    for r in res["runs"]:
        out.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['seconds']:.2f} | "
            f"{r['rows_queries_per_s']:.3g} | {'yes' if r['equal_to_one_process'] else 'NO'} |"
        )
    return [*out, ""]


def _real(res: dict) -> list[str]:
    out = [
        f"Real rows: the `{res['bank']}` bank's store ({res['rows']:,} rows), `attribute()`'s "
        f"default method ({res['method']}), the bank's queries:",
        "",
        "| rows indexed | factory | nprobe (of the lists) | recall@10 | opponents recall@10 |",
        "|---|---|---:|---:|---:|",
    ]
    for r in res["runs"]:
        kind = "whitened by the preconditioner" if r["whiten"] else "as stored"
        mark = " (default)" if r.get("default") else ""
        out.append(
            f"| {kind} | `{r['factory']}` | {r['nprobe']}{mark} | {r['recall_at_10']:.3f} | "
            f"{r['opponent_recall_at_10']:.3f} |"
        )
    return [*out, ""]


def _stages(res: dict) -> list[str]:
    out = []
    for key in ("lm", "gpt"):
        if key not in res:
            continue
        r = res[key]
        out += [f"**{r['title']}** — {r['setup']}", "", "| stage | seconds | peak RSS (GB) | store (MB) |",
                "|---|---:|---:|---:|"]  # fmt: skip
        for s in r["stages"]:
            mb = "" if s.get("store_mb") is None else f"{s['store_mb']:.1f}"
            out.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_gb']:.2f} | {mb} |")
        out += ["", *r.get("notes", []), ""]
    return out


def section(res: dict) -> str:
    lines = [
        START,
        "## Scale",
        "",
        "Produced by `python -m benchmarks.scale` (stages `index,sharded,real,lm,gpt`; "
        "one 2-core CPU machine, no GPU). Stages run at: "
        + ", ".join(
            f"`{k}` {res[k]['ran_at']}"
            for k in ("index", "sharded", "real", "lm", "gpt")
            if isinstance(res.get(k), dict) and "ran_at" in res[k]
        )  # fmt: skip
        + ".",
        "",
    ]
    if "lm" in res or "gpt" in res:
        lines += ["### Past toy size: a real pretrained LM and a 100 M GPT-2", "", *_stages(res)]
    if "index" in res:
        lines += [
            "### Approximate top-k: FAISS index against the exact scan",
            "",
            *_index(res["index"]),
        ]
    if "real" in res:
        lines += _real(res["real"])
    if "sharded" in res:
        lines += ["### Sharded scoring", "", *_sharded(res["sharded"])]
    return "\n".join([*lines, END])


def render(res: dict | None = None) -> None:
    res = json.loads(RESULTS.read_text()) if res is None else res
    text = BENCH.read_text()
    new = section(res)
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    BENCH.write_text(text)


if __name__ == "__main__":
    render()
