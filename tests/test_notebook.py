"""examples/attribution.ipynb runs top to bottom in a fresh kernel and prints a finite, correct LDS."""

from __future__ import annotations

import math
import re
from pathlib import Path

import ipykernel.kernelspec
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from scipy.stats import spearmanr
from torch.utils.data import Subset

from lightning_tda import AttributionStore
from lightning_tda.data.digits import load_digits_splits
from lightning_tda.demo import DigitsMLP
from lightning_tda.eval import Bank

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "attribution.ipynb"
KERNEL = "lightning-tda-test"


def kernel_for_this_python(tmp_path: Path, monkeypatch) -> str:
    """A kernelspec that launches ``sys.executable`` (this venv), found through ``JUPYTER_PATH``."""
    prefix = tmp_path / "jupyter_prefix"
    ipykernel.kernelspec.install(kernel_name=KERNEL, prefix=str(prefix), display_name=KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return KERNEL


def text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                out.append(o["text"])
    return "".join(out)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_attribution_notebook_runs_and_prints_a_finite_lds(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name=kernel_for_this_python(tmp_path, monkeypatch),
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = text_outputs(nb)
    found = dict(re.findall(r"LDS \((\w+)\) = (-?\d+\.\d+)", text))
    assert set(found) == {"tracin", "influence", "source"}, text[-2000:]
    assert all(math.isfinite(float(v)) and -1 <= float(v) <= 1 for v in found.values())
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # top examples, distributions, agreement, self-influence, LDS bars
    work = tmp_path / "attribution_run"
    assert (work / "report.html").stat().st_size > 0

    # independent reference: TracIn scores from the store, LDS by scipy's Spearman over the bank
    bank = Bank.load(work / "bank")
    store = AttributionStore(work / "digits_tda.h5")
    data = load_digits_splits(n_train=500, n_test=200, seed=0)
    n_q = bank.outputs["margin"].shape[2]
    scores = store.attribute(
        Subset(data.test, range(n_q)), model=DigitsMLP(), method="tracin", top_k=None
    ).scores.double()
    masks = np.zeros((bank.subsets.shape[0], scores.shape[1]))
    np.put_along_axis(masks, bank.subsets.astype(np.int64), 1.0, axis=1)
    predicted = masks @ scores.numpy().T  # [M, Q]
    measured = bank.outputs["margin"].mean(axis=1)  # [M, Q]
    rho = [spearmanr(predicted[:, q], measured[:, q])[0] for q in range(n_q)]
    assert abs(float(np.nanmean(rho)) - float(found["tracin"])) < 1.5e-3
    assert bank.outputs["margin"].shape[:2] == (16, 1)
    assert torch.isfinite(scores).all()
