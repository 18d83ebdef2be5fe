"""The report and the W&B panels render examples through the task description.

Digits are standardised for training; ``ClassificationTask(image_shape=(8, 8), mean=..., std=...)``
draws ``x * std + mean``. Every pixel check compares against scikit-learn's raw ``load_digits().images``
(an independent path: no mean, no std), drawn the way each surface scales: the report min-max scales
grey dark-on-light (``255 * (1 - v)``), the panels min-max scale to ``0..255``; both upscale 8x.
"""

from __future__ import annotations

import base64
import html
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Subset

from lightning_tda import AttributionResult, AttributionStore, ClassificationTask, IndexedDataset
from lightning_tda.capture.task import Task, task_from_settings
from lightning_tda.cli import main
from lightning_tda.data.digits import DigitsDataModule
from lightning_tda.data.text import pydoc_bpe_tokenizer, pydoc_topics
from lightning_tda.demo import DigitsMLP
from lightning_tda.explain import ExampleLookup, explain
from lightning_tda.report import report_html, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_tracin.yaml"
RAW = load_digits().images.astype(np.float64)  # [1797, 8, 8] pixels 0..16, row = example id
_IMG = re.compile(r'<img class="example" src="data:image/png;base64,([^"]+)" alt="example (\d+)">')


def _unit(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def report_pixels(raw: np.ndarray) -> np.ndarray:
    """The report's drawing of an image, by hand: grey ``255 * (1 - min-max)``, 8x nearest."""
    return np.kron(255.0 * (1.0 - _unit(raw)), np.ones((8, 8)))


def panel_pixels(raw: np.ndarray) -> np.ndarray:
    """The panels' drawing of an image, by hand: ``round(255 * min-max)``, 8x nearest."""
    return np.kron(np.round(255.0 * _unit(raw)), np.ones((8, 8)))


def example_images(page: str) -> dict[int, np.ndarray]:
    """``{example_id: grey pixels [64, 64]}`` of every example image embedded in a report."""
    out = {}
    for data, eid in _IMG.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        assert img.format == "PNG"
        out[int(eid)] = np.asarray(img.convert("L"), dtype=np.float64)
    return out


@pytest.fixture(scope="module")
def digits_recipe_run(tmp_path_factory):
    """``lightning-tda fit`` on the digits recipe at smoke size (200 examples, 3 epochs)."""
    tmp = tmp_path_factory.mktemp("rendering")
    cfg = tmp / "digits.yaml"
    text = RECIPE.read_text().replace("n_train: 1000", "n_train: 200")
    cfg.write_text(text.replace("runs/digits_tda.h5", str(tmp / "digits.h5")))
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.chdir(tmp)  # LightningCLI writes its config.yaml into the working directory
        argv = ["fit", "--config", str(cfg), "--trainer.max_epochs", "3"]
        assert main([*argv, "--trainer.enable_progress_bar", "false"]) == 0
    dm = DigitsDataModule(n_train=200)
    dm.setup("fit")
    return tmp, cfg, AttributionStore(tmp / "digits.h5"), dm


def check_report_digits(page: str, min_images: int) -> None:
    images = example_images(page)
    assert len(images) >= min_images
    for eid, pixels in images.items():
        assert pixels.shape == (64, 64)
        np.testing.assert_allclose(pixels, report_pixels(RAW[eid]), atol=1.5)


def test_datamodule_statistics_give_back_the_raw_pixels(digits_recipe_run):
    _, _, _, dm = digits_recipe_run
    assert dm.image_shape == (8, 8) and dm.mean.shape == (64,) and dm.std.shape == (64,)
    item = dm.splits.train[0]
    x = item.data[0].numpy().astype(np.float64)
    np.testing.assert_allclose(x * dm.std + dm.mean, RAW[item.example_id].ravel(), atol=1e-4)
    assert DigitsDataModule().mean is None  # before setup


def test_report_draws_un_standardised_digits_through_the_task(digits_recipe_run):
    tmp, _, store, dm = digits_recipe_run
    task = ClassificationTask(image_shape=(8, 8), mean=tuple(dm.mean), std=tuple(dm.std))
    queries = Subset(dm.splits.test, range(2))
    out = write_report(
        store, queries, DigitsMLP(), dm.splits.train, tmp / "task.html", method="tracin",
        top_k=3, num_outliers=3, task=task,
    )  # fmt: skip
    page = out.read_text()
    check_report_digits(page, 2 * 2 * 3)
    assert page.count("label ") >= 2 * (1 + 2 * 3)  # the default caption stays under each digit
    # without the task the same report draws the standardised features: a different picture
    plain = example_images(
        write_report(
            store, queries, DigitsMLP(), dm.splits.train, tmp / "plain.html", method="tracin",
            top_k=3, num_outliers=3,
        ).read_text()
    )  # fmt: skip
    eid, pixels = next(iter(plain.items()))
    assert np.abs(pixels - report_pixels(RAW[eid])).max() > 40


def test_cli_report_on_the_digits_recipe_draws_un_standardised_digits(digits_recipe_run):
    tmp, cfg, _, _ = digits_recipe_run
    out = tmp / "cli.html"
    argv = ["report", "--config", str(cfg), "--method", "tracin", "--queries", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main([*argv, "--top-k", "3", "--outliers", "3", "--out", str(out)]) == 0
    check_report_digits(out.read_text(), 2 * 2 * 3)


def test_task_render_string_and_tokenizer_text():
    tok = pydoc_bpe_tokenizer(256)
    text = pydoc_topics()["if"][:200]
    ids = torch.tensor(tok(text)["input_ids"][:40])
    padded = torch.cat([ids, torch.ones(5, dtype=torch.long)])
    mask = torch.cat([torch.ones(40, dtype=torch.long), torch.zeros(5, dtype=torch.long)])
    train = IndexedDataset([{"input_ids": padded, "attention_mask": mask}, {"input_ids": ids}])
    queries = IndexedDataset([ids[:10]], ids=[7])
    res = AttributionResult(
        "tracin", torch.tensor([[1.0, -1.0]]), None, None, None, torch.tensor([0, 1]),
        torch.tensor([7]), [3],
    )  # fmt: skip
    ex = explain(res, top_k=1, train=ExampleLookup(train), queries=ExampleLookup(queries))
    page = report_html(ex, "summary", tokenizer=tok)
    assert tok.decode(ids.tolist()) != tok.decode(padded.tolist())
    assert page.count(html.escape(tok.decode(ids.tolist()))) == 2  # padding dropped by the mask
    assert html.escape(tok.decode(ids[:10].tolist())) in page
    assert "tokens: " not in page and "tokens: " in report_html(ex, "summary")

    class Named(Task):
        def render(self, item):
            return f"row of {len(item['input_ids'])} tokens" if isinstance(item, dict) else None

    page = report_html(explain(res, top_k=1, train=ExampleLookup(train), task=Named()), "s")
    assert "row of 45 tokens" in page and "row of 40 tokens" in page


def test_panel_image_cells_are_the_un_standardised_digits(tmp_path, monkeypatch, digits_recipe_run):
    pytest.importorskip("wandb")
    from test_wandb_panels import OfflineRun, finish, offline_run

    from lightning_tda.integrations.wandb_panels import log_influence_panels

    _, _, _, dm = digits_recipe_run
    train, queries = dm.splits.train, Subset(dm.splits.test, range(2))
    task = ClassificationTask(image_shape=(8, 8), mean=tuple(dm.mean), std=tuple(dm.std))
    scores = torch.randn(2, len(train), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(train.ids)
    qids = torch.tensor([dm.splits.test.ids[0], dm.splits.test.ids[1]])
    res = AttributionResult("tracin", scores, None, None, None, ids, qids, [48])
    run = offline_run(tmp_path, monkeypatch)
    log_influence_panels(run, res, train, queries, task=task, top_k=2)
    wb = OfflineRun(finish(run))
    art = wb.artifact_rows("tda/influence")
    assert len(art) == 2 * 2 * 2
    for a in art:
        for cell, eid in ((a["example"], a["example_id"]), (a["query"], a["query_id"])):
            assert cell["_type"] == "image-file"
            pixels = np.asarray(Image.open(wb.files[cell["path"]]).convert("L"), np.float64)
            np.testing.assert_allclose(pixels, panel_pixels(RAW[eid]), atol=1)
    assert [r["label"] for r in wb.rows("tda/influence")][:1] == [
        int(train[train.ids.index(art[0]["example_id"])].data[1])
    ]


def test_causal_lm_task_renders_text_through_its_tokenizer():
    """The task description carries the tokenizer: report rows are ``tokenizer.decode`` of the
    attended tokens, with no ``tokenizer=`` passed to the report."""
    from lightning_tda import CausalLMTask

    tok = pydoc_bpe_tokenizer(256)
    ids = torch.tensor(tok(pydoc_topics()["if"][:200])["input_ids"][:30])
    padded = torch.cat([ids, torch.ones(4, dtype=torch.long)])
    mask = torch.cat([torch.ones(30, dtype=torch.long), torch.zeros(4, dtype=torch.long)])
    item = {"input_ids": padded, "attention_mask": mask, "labels": padded}
    train = IndexedDataset([item, {**item, "attention_mask": torch.ones(34, dtype=torch.long)}])
    res = AttributionResult(
        "tracin", torch.tensor([[1.0, -1.0]]), None, None, None, torch.tensor([0, 1]), None, [3]
    )
    task = CausalLMTask(labels="hf", tokenizer=tok)
    page = report_html(explain(res, top_k=1, train=ExampleLookup(train), task=task), "s")
    assert html.escape(tok.decode(ids.tolist())) in page  # row 0: padding dropped by the mask
    assert html.escape(tok.decode(padded.tolist())) in page  # row 1: every token attended
    assert "tokens: " not in page and "tokens: " in report_html(
        explain(res, top_k=1, train=ExampleLookup(train)), "s"
    )
    assert "tokenizer" not in task.settings() and task_from_settings(task.settings()) == task
