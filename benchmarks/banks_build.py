"""Build (or resume) the retraining banks: ``python -m benchmarks.banks_build [task ...]``.

Tasks: digits, tinygpt (the default pair), digits_short, digits_two_stage (mislabel has no bank), and
the realistic AdamW banks clf_adamw, gpt_adamw, gpt_single_pass, lora_ft (benchmarks/tasks_realistic.py).
A staged task's recipe carries its curriculum, so each subset run trains stage by stage on
``subset ∩ stage members``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.tasks import TASKS as SGD_TASKS
from benchmarks.tasks_realistic import REALISTIC
from lightning_tda.eval.retrain import build_bank

BANKS = Path(__file__).parent / "banks"
TASKS = {**SGD_TASKS, **REALISTIC}


def bank_path(task_name: str) -> Path:
    return BANKS / task_name


def build(task_name: str, processes: int = 2):
    if task_name not in TASKS or task_name == "mislabel":
        raise SystemExit(
            f"no bank for task {task_name!r}; choose from {sorted(set(TASKS) - {'mislabel'})}"
        )
    task = TASKS[task_name]()
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            print(
                f"  {task_name}: {done}/{total} runs, {time.perf_counter() - t0:.0f}s", flush=True
            )

    return build_bank(
        bank_path(task_name),
        task.factory,
        task.train,
        task.queries,
        task.measure,
        task.measurements,
        task.spec,
        task.recipe,
        processes=processes,
        query_ids=task.queries.ids,
        progress=progress,
    )


if __name__ == "__main__":
    for name in sys.argv[1:] or ["digits", "tinygpt"]:
        t0 = time.perf_counter()
        bank = build(name)
        print(
            name,
            {k: v.shape for k, v in bank.outputs.items()},
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
