"""The PCA basis's token subsample (``basis_tokens``) on the LM banks, chosen on the choosing half.

``python -m benchmarks.basis_tokens [--tasks gpt_adamw,gpt_single_pass,lora_ft] [--tokens None,16,8]``

Per bank and per ``basis_tokens`` value: the default ``GradientLogger`` (preset "accurate") with only
that setting changed, scored by ``attribute()``'s default method and by TracIn; LDS on the choosing
and the reporting half of the queries (:mod:`benchmarks.defaults`). Writes
``results/basis_tokens.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

from benchmarks.banks_build import TASKS
from benchmarks.defaults import RESULTS, BankView, evaluate_capture


def main(argv: list[str] | None = None) -> list[dict]:
    from lightning_tda.methods.auto import auto_method

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="gpt_adamw,gpt_single_pass,lora_ft")
    ap.add_argument("--tokens", default="None,16,8")
    a = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    methods = [("auto", lambda s: auto_method(s)[0]), ("tracin", lambda s: "tracin")]
    rows: list[dict] = []
    for name in a.tasks.split(","):
        task = TASKS[name]()
        bank = BankView.load(task)
        for tok in a.tokens.split(","):
            value = None if tok == "None" else int(tok)
            with tempfile.TemporaryDirectory() as tmp:
                got = evaluate_capture(
                    task, bank, f"basis_tokens={tok}", {"basis_tokens": value}, methods, Path(tmp)
                )
            rows += [{"task": name, "basis_tokens": value, **r} for r in got]
    (RESULTS / "basis_tokens.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
