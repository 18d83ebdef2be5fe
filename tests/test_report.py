"""HTML report: tables equal ``store.attribute`` / ``torch.topk(self_influence)``, images are PNGs."""

from __future__ import annotations

import argparse
import base64
import io
import logging
import warnings
from html.parser import HTMLParser
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import trainer
from PIL import Image
from torch.utils.data import DataLoader, Subset

from lightning_tda import AttributionStore, GradientLogger, Indexed
from lightning_tda.data.digits import DigitsDataModule, load_digits_splits
from lightning_tda.demo import DigitsMLP
from lightning_tda.methods import Influence
from lightning_tda.report import add_report_parser, default_render, write_report


class ReportParser(HTMLParser):
    """Collects ``<img>`` sources, per-query table rows and the self-influence rows of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.queries: list[dict] = []
        self.self_influence: list[tuple[int, float]] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "section" and "query" in a.get("class", "").split():
            self.queries.append({"id": a["data-query-id"], "proponents": [], "opponents": []})
        elif tag == "table":
            self._table = a.get("class")
        elif tag == "tr" and "data-example-id" in a:
            row = (int(a["data-example-id"]), float(a["data-score"]))
            if self._table == "self-influence":
                self.self_influence.append(row)
            else:
                self.queries[-1][self._table].append(row)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix) :], validate=True)
    Image.open(io.BytesIO(raw)).verify()  # raises on a corrupt PNG
    img = Image.open(io.BytesIO(raw))
    assert img.format == "PNG"
    return img


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits MLP trained 2 epochs on 200 examples with the logger (2 checkpoints)."""
    tmp = tmp_path_factory.mktemp("report")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(0, verbose=False)
    data = load_digits_splits(n_train=200, n_test=40, seed=0)
    logger = GradientLogger(
        tmp / "tda.h5", attribution_data=data.train, every_n_epochs=1, rank=8, verbose=False
    )
    model = DigitsMLP(hidden=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp, [logger], max_epochs=2).fit(
            model, DataLoader(data.train, batch_size=32, shuffle=True)
        )
    return AttributionStore(tmp / "tda.h5"), model, data, tmp


def test_report_tables_equal_attribute_and_topk_self_influence(digits_run):
    store, model, data, tmp = digits_run
    q, k, n_out = 3, 4, 6
    out = write_report(
        store.path, data.test, model, data.train, tmp / "sub" / "r.html", top_k=k,
        max_queries=q, num_outliers=n_out,
    )  # fmt: skip
    page = parse(out)
    # the report's default method is the store's: method="auto"
    ref = store.attribute(Subset(data.test, range(q)), model=model, top_k=k)
    assert ref.settings["chosen_by"] == "auto"
    assert [s["id"] for s in page.queries] == [str(int(i)) for i in ref.query_ids]
    for qi, sec in enumerate(page.queries):
        assert [i for i, _ in sec["proponents"]] == ref.indices[qi].tolist()
        assert [i for i, _ in sec["opponents"]] == ref.opponents[qi].tolist()
        np.testing.assert_allclose([s for _, s in sec["proponents"]], ref.scores[qi], rtol=1e-6)
        np.testing.assert_allclose(
            [s for _, s in sec["opponents"]], ref.opponent_scores[qi], rtol=1e-6
        )
    si = store.self_influence(
        method=Influence(mode="ekfac", checkpoints=store.steps)
    )  # what auto chose
    top = torch.topk(si, n_out)
    assert [i for i, _ in page.self_influence] == store.example_ids[top.indices].tolist()
    np.testing.assert_allclose([s for _, s in page.self_influence], top.values, rtol=1e-6)
    # per query: its image, a histogram, one image per table row; then histogram + outliers
    assert len(page.imgs) == q * (2 + 2 * k) + 1 + n_out
    for a in page.imgs:
        png(a["src"])
    # the image next to a proponent shows that example: grey = 255 * (1 - min-max(x)), 8x upscaled
    pid = ref.indices[0, 0].item()
    img = next(a for a in page.imgs if a.get("alt") == f"example {pid}")
    pixels = np.asarray(png(img["src"]).convert("L"), dtype=np.float64)
    assert pixels.shape == (64, 64)
    x = data.train[data.train.ids.index(pid)].data[0].numpy().reshape(8, 8).astype(np.float64)
    expect = 255 * (1 - (x - x.min()) / (x.max() - x.min()))
    np.testing.assert_allclose(pixels[::8, ::8], expect, atol=3)
    assert np.array_equal(pixels[::8, ::8], pixels[7::8, 7::8])
    assert "Self-influence outliers" in "".join(page.text)


def test_text_is_escaped_and_other_methods_and_renderers(digits_run):
    store, model, data, tmp = digits_run
    nasty = '<script>alert("x")</script> & <b>bold</b>'
    out = write_report(
        store, DataLoader(data.test, batch_size=8), model, None, tmp / "t.html",
        method="influence", top_k=2, max_queries=2, self_influence=False,
        render=lambda item: nasty, title="<i>t</i>",
    )  # fmt: skip
    page = parse(out)
    assert not {"script", "b", "i"} & set(page.tags)
    text = "".join(page.text)
    # shown as text, once per query (train_data=None: example cells stay empty)
    assert sum(t == nasty for t in page.text) == 2 and "<i>t</i>" in text
    assert len(page.imgs) == 2  # the two histograms; no self-influence section
    assert "Self-influence outliers" not in text
    ref = store.attribute(Subset(data.test, range(2)), model=model, method="influence", top_k=2)
    assert [[i for i, _ in s["proponents"]] for s in page.queries] == ref.indices.tolist()


def test_self_influence_fallback_and_explicit_method(digits_run):
    store, model, data, tmp = digits_run
    # gradcos defines no self-influence: the section falls back to TracIn's, and says so
    page = parse(
        write_report(
            store, data.test, model, data.train, tmp / "g.html", method="gradcos", top_k=2,
            max_queries=1, num_outliers=3,
        )
    )  # fmt: skip
    top = torch.topk(store.self_influence(method="tracin"), 3).indices
    assert [i for i, _ in page.self_influence] == store.example_ids[top].tolist()
    assert "gradcos defines no self-influence" in "".join(page.text)
    page = parse(
        write_report(
            store, data.test, model, data.train, tmp / "i.html", top_k=2, max_queries=1,
            num_outliers=3, self_influence="influence",
        )
    )  # fmt: skip
    top = torch.topk(store.self_influence(method="influence"), 3).indices
    assert [i for i, _ in page.self_influence] == store.example_ids[top].tolist()
    tracin_top = torch.topk(store.self_influence(method="tracin"), 3).indices
    assert not torch.equal(top, tracin_top)  # the two methods rank differently here


def test_bad_input_names_the_fix(digits_run):
    store, model, data, tmp = digits_run
    with pytest.raises(ValueError, match="top_k"):
        write_report(store, data.test, model, data.train, tmp / "x.html", top_k=0)
    with pytest.raises(TypeError, match="map-style Dataset"):
        write_report(store, iter([1, 2]), model, data.train, tmp / "x.html")
    with pytest.raises(ValueError, match="empty"):
        write_report(store, Subset(data.test, []), model, data.train, tmp / "x.html")


def test_default_render():
    img, caption = default_render(Indexed(5, (torch.arange(64.0), torch.tensor(3))))
    assert img.shape == (8, 8) and img[1, 0] == 8 and caption == "label 3"
    assert default_render({"text": "hi <b>", "example_id": 1}) == "hi <b>"
    assert default_render(Indexed(1, (torch.tensor([5, 6, 7]), 0))) == "tokens: 5 6 7\n[label 0]"
    assert default_render({"input_ids": [[1, 2]], "example_id": 0}) == "tokens: 1 2"
    assert default_render(torch.zeros(3, 8, 8)).shape == (8, 8, 3)
    assert default_render("plain") == "plain"
    assert default_render(Indexed(0, (torch.zeros(7), 1))).startswith("(tensor(")


def test_cli_report_on_a_recipe_run(tmp_path, monkeypatch):
    from lightning_tda.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_tracin.yaml"
    small = ["--data.init_args.n_train", "200", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochs", "3", *small]) == 0
    cfg = tmp_path / "r.yaml"
    cfg.write_text(recipe.read_text().replace("n_train: 1000", "n_train: 200"))
    parser = argparse.ArgumentParser(prog="lightning-tda")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["report", "--config", str(cfg), "--queries", "3", "--top-k", "3", "--outliers", "4"]
        + ["--out", "out/report.html"]
    )
    assert args.func(args) == 0
    page = parse(tmp_path / "out" / "report.html")
    store = AttributionStore(tmp_path / "runs" / "digits_tda.h5")
    dm = DigitsDataModule(n_train=200)
    dm.setup("validate")  # the report's queries: the first 3 of the val set
    ref = store.attribute(Subset(dm.splits.test, range(3)), model=DigitsMLP(), top_k=3)
    assert [[i for i, _ in s["proponents"]] for s in page.queries] == ref.indices.tolist()
    assert [[i for i, _ in s["opponents"]] for s in page.queries] == ref.opponents.tolist()
    top = torch.topk(
        store.self_influence(method=Influence(mode="ekfac", checkpoints=store.steps)), 4
    ).indices
    assert [i for i, _ in page.self_influence] == store.example_ids[top].tolist()
    assert len(page.imgs) == 3 * (2 + 2 * 3) + 1 + 4
    for a in page.imgs:
        png(a["src"])
    assert "validation set" in "".join(page.text)
