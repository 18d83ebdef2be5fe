"""W&B influence panels: log into offline runs, read the run back from disk, compare with the store."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TokenDataset, loader, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import TensorDataset

from lightning_tda import (
    AttributionResult,
    AttributionStore,
    GradientLogger,
    IndexedDataset,
    StoreError,
    classification_loss,
)
from lightning_tda.callbacks.influence_panels import InfluencePanels, attribute_by_checkpoint
from lightning_tda.integrations.wandb_panels import (
    ExampleLookup,
    log_influence_panels,
    render_example,
)

wandb = pytest.importorskip("wandb")

pytest.importorskip("PIL")


# -- a tiny model on 4x4 "images" ------------------------------------------------------------
class ImgMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

    def per_example_loss(self, batch):
        _, (x, y) = batch
        return classification_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        _, (x, y) = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def image_data(n: int, seed: int, first_id: int) -> IndexedDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, generator=g)
    y = (x.flatten(1) @ torch.randn(16, 3, generator=torch.Generator().manual_seed(7))).argmax(1)
    return IndexedDataset(TensorDataset(x, y), ids=range(first_id, first_id + n))


def fit(tmp_path, callbacks, train, **kw) -> ImgMLP:
    pl.seed_everything(0, verbose=False)
    model = ImgMLP()
    trainer(tmp_path, callbacks, max_epochs=2, **kw).fit(model, loader(train, batch_size=10))
    return model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("panels")
    train, queries = image_data(30, 0, 500), image_data(3, 1, 900)
    grads = GradientLogger(
        tmp / "s.h5",
        attribution_data=train,
        every_n_epochs=1,
        log_at_fit_start=True,
        rank=4,
        verbose=False,
    )
    model = fit(tmp, [grads], train)
    return AttributionStore(tmp / "s.h5"), model, train, queries


# -- reading an offline run back --------------------------------------------------------------
def read_records(run_dir: Path) -> list:
    """Records of the run's ``.wandb`` log (leveldb-style: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + n > len(data):  # padding, or a record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


class OfflineRun:
    """What an offline run wrote: summary values, media tables, run-table artifacts (with images)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.summary: dict[str, dict] = {}
        self.files: dict[str, str] = {}  # artifact entry path -> staged local file
        for rec in read_records(run_dir):
            kind = rec.WhichOneof("record_type")
            if kind in ("summary", "history"):
                items = rec.summary.update if kind == "summary" else rec.history.item
                for item in items:
                    key = list(item.nested_key) or [item.key]
                    if len(key) == 2:
                        self.summary.setdefault(key[0], {})[key[1]] = json.loads(item.value_json)
            elif kind == "artifact":
                for e in rec.artifact.manifest.contents:
                    self.files[e.path] = e.local_path

    def table(self, key: str) -> dict:
        """The table json written into the run dir (media cells show as their type name)."""
        path = self.dir / "files" / self.summary[key]["path"]
        return json.loads(path.read_text())

    def rows(self, key: str) -> list[dict]:
        t = self.table(key)
        return [dict(zip(t["columns"], r, strict=True)) for r in t["data"]]

    def artifact_rows(self, key: str) -> list[dict]:
        """The same table from its run-table artifact, where images are ``image-file`` entries."""
        t = json.loads(Path(self.files[f"{key}.table.json"]).read_text())
        return [dict(zip(t["columns"], r, strict=True)) for r in t["data"]]


def offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # artifact staging
    return wandb.init(dir=str(tmp_path), project="tda-test", mode="offline")


def finish(run) -> Path:
    """Finish the run and wait until wandb-core has written its exit record (writes are async)."""
    from google.protobuf.message import DecodeError  # a wandb dependency

    run_dir = Path(run.dir).parent
    run.finish()
    for _ in range(300):
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_records(run_dir)):
                return run_dir
        except DecodeError:  # the last record is still being written
            pass
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} has no exit record after 30 s")


def labels_by_id(data: IndexedDataset) -> dict[int, int]:
    return {i: int(data.dataset[p][1]) for p, i in enumerate(data.ids)}


def check_influence_rows(rows, res: AttributionResult, k: int, train, queries) -> None:
    q = res.scores.shape[0]
    assert len(rows) == q * 2 * k
    ylab, qlab = labels_by_id(train), labels_by_id(queries)
    for r in range(q):
        qid = int(res.query_ids[r])
        mine = [row for row in rows if row["query_id"] == qid]
        for kind, ids, scores in (
            ("proponent", res.indices[r], res.scores[r]),
            ("opponent", res.opponents[r], res.opponent_scores[r]),
        ):
            part = sorted((row for row in mine if row["kind"] == kind), key=lambda x: x["rank"])
            assert [row["rank"] for row in part] == list(range(1, k + 1))
            assert [row["example_id"] for row in part] == ids[:k].tolist()
            np.testing.assert_allclose(
                [row["score"] for row in part], scores[:k].numpy(), rtol=1e-6, atol=1e-9
            )
            assert [row["label"] for row in part] == [ylab[i] for i in ids[:k].tolist()]
            assert all(row["query_label"] == qlab[qid] for row in part)


def expected_pixels(x: torch.Tensor) -> np.ndarray:
    """Independent reference: min-max to 0..255, each pixel repeated 16x (4x4 -> 64x64)."""
    a = x.double().numpy()
    a = np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    return np.kron(a, np.ones((16, 16), dtype=np.uint8))


# -- tests ------------------------------------------------------------------------------------
def test_panels_read_back_from_an_offline_run(tmp_path, monkeypatch, fitted):
    from PIL import Image

    store, model, train, queries = fitted
    k = 3
    res, parts = attribute_by_checkpoint(store, queries, model, "tracin", top_k=k)
    dense = store.attribute(queries, model=model, method="tracin", top_k=None).scores
    for r in range(3):  # the breakdown path agrees with a plain dense attribution
        assert res.indices[r].tolist() == store.example_ids[dense[r].topk(k).indices].tolist()
    si = store.self_influence(method="tracin")

    run = offline_run(tmp_path, monkeypatch)
    out = log_influence_panels(
        run, res, train, queries, self_influence=si, checkpoint_scores=parts, top_k=k
    )
    wb = OfflineRun(finish(run))

    steps = store.steps
    assert steps == [0, 3, 6]
    assert out == {
        "tda/influence": 3 * 2 * k,
        "tda/scores": 3 * 2 * k,
        "tda/self_influence": 20,
        "tda/self_influence_hist": 30,
        "tda/checkpoints": 3 * len(steps),
        "tda/checkpoint_share": len(steps),
    }
    rows = wb.rows("tda/influence")
    check_influence_rows(rows, res, k, train, queries)

    # images: every example and query cell is a PNG of that example's pixels
    art = wb.artifact_rows("tda/influence")
    assert [a["example_id"] for a in art] == [r["example_id"] for r in rows]
    xs = {i: train.dataset[p][0] for p, i in enumerate(train.ids)}
    qx = {i: queries.dataset[p][0] for p, i in enumerate(queries.ids)}
    for a in art:
        for cell, x in ((a["example"], xs[a["example_id"]]), (a["query"], qx[a["query_id"]])):
            assert cell["_type"] == "image-file" and cell["format"] == "png"
            local = Path(wb.files[cell["path"]])
            assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            np.testing.assert_array_equal(np.asarray(Image.open(local)), expected_pixels(x))

    # score histogram over every score in the table
    ref = np.histogram(torch.cat([res.scores, res.opponent_scores], 1).numpy(), bins=64)
    hist = wb.summary["tda/scores"]
    assert hist["_type"] == "histogram"
    np.testing.assert_array_equal(hist["values"], ref[0])
    np.testing.assert_allclose(hist["bins"], ref[1], rtol=1e-6)
    assert sum(wb.summary["tda/self_influence_hist"]["values"]) == 30

    # self-influence ranking = torch.topk of the [N] self-influence, mapped to example ids
    top = torch.topk(si, 20)
    si_rows = wb.rows("tda/self_influence")
    assert [r["example_id"] for r in si_rows] == store.example_ids[top.indices].tolist()
    np.testing.assert_allclose([r["self_influence"] for r in si_rows], top.values, rtol=1e-6)
    ylab = labels_by_id(train)
    assert [r["label"] for r in si_rows] == [ylab[r["example_id"]] for r in si_rows]

    # each checkpoint's contribution: TracIn terms add up to the full dense score
    torch.testing.assert_close(sum(parts.values()), dense, rtol=1e-4, atol=1e-6)
    ck = wb.rows("tda/checkpoints")
    assert len(ck) == 3 * len(steps)
    for row in ck:
        r = res.query_ids.tolist().index(row["query_id"])
        np.testing.assert_allclose(
            row["abs_total"], float(parts[row["step"]][r].abs().sum()), rtol=1e-5
        )
        np.testing.assert_allclose(
            row["total"], float(parts[row["step"]][r].sum()), rtol=1e-4, atol=1e-6
        )
    for qid in res.query_ids.tolist():
        shares = {row["step"]: row["share"] for row in ck if row["query_id"] == qid}
        assert shares[0] == 0.0  # the fit-start checkpoint has no learning-rate weight
        assert sum(shares.values()) == pytest.approx(1.0)
    bar = wb.rows("tda/checkpoint_share_table")
    assert [b["checkpoint"] for b in bar] == [str(s) for s in steps]
    for b in bar:
        mean = np.mean([row["share"] for row in ck if str(row["step"]) == b["checkpoint"]])
        assert b["mean_share"] == pytest.approx(mean)


def test_dense_result_with_text_examples(tmp_path, monkeypatch):
    texts = [f"example {i}" for i in range(6)]
    train = IndexedDataset([(t, i % 2) for i, t in enumerate(texts)], ids=range(100, 106))
    queries = IndexedDataset(["q seven", "q eight"], ids=[7, 8])
    dense = torch.tensor([[0.5, -1.0, 2.0, 0.1, -0.3, 1.5], [-2.0, 0.2, 0.0, 3.0, 1.0, -0.5]])
    ids = torch.arange(100, 106)
    res = AttributionResult("tracin", dense, None, None, None, ids, torch.tensor([7, 8]), [3])
    run = offline_run(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="store"):
        log_influence_panels(None, res, train, self_influence="tracin")  # None: the active run
    with pytest.raises(ValueError, match="6 examples"):
        log_influence_panels(run, res, train, self_influence=torch.zeros(5))
    with pytest.raises(ValueError, match="2 queries"):
        log_influence_panels(run, res, train, IndexedDataset(["a", "b", "c"]))
    out = log_influence_panels(run, res, train, queries, top_k=2)
    wb = OfflineRun(finish(run))
    assert out == {"tda/influence": 8, "tda/scores": 12, "tda/scores_q7": 6, "tda/scores_q8": 6}
    rows = wb.rows("tda/influence")
    assert len(rows) == 8
    for r, qid in enumerate((7, 8)):
        for kind, largest in (("proponent", True), ("opponent", False)):
            top = dense[r].topk(2, largest=largest)
            part = sorted(
                (x for x in rows if x["query_id"] == qid and x["kind"] == kind),
                key=lambda x: x["rank"],
            )
            assert [x["example_id"] for x in part] == (100 + top.indices).tolist()
            assert [x["score"] for x in part] == top.values.tolist()
            assert [x["example"] for x in part] == [texts[i] for i in top.indices.tolist()]
            assert [x["label"] for x in part] == [i % 2 for i in top.indices.tolist()]
            assert all(x["query"] == ("q seven" if qid == 7 else "q eight") for x in part)
    for r, qid in enumerate((7, 8)):
        np.testing.assert_array_equal(
            wb.summary[f"tda/scores_q{qid}"]["values"], np.histogram(dense[r].numpy(), 64)[0]
        )
    np.testing.assert_array_equal(
        wb.summary["tda/scores"]["values"], np.histogram(dense.numpy(), 64)[0]
    )


def test_render_text_tokens_bytes_and_images():
    class Tok:
        def decode(self, ids):
            return "-".join(map(str, ids))

    seq = {
        "input_ids": torch.tensor([5, 6, 7, 1]),
        "attention_mask": torch.tensor([1, 1, 1, 0]),
        "labels": torch.tensor([5, 6, 7, -100]),
    }
    assert render_example(seq, tokenizer=Tok()) == ("5-6-7", None)
    assert render_example(seq) == ("5 6 7", None)
    assert render_example((b"caf\xc3\xa9", torch.tensor(1))) == ("café", 1)
    assert render_example(torch.tensor(list(b"hi!"), dtype=torch.uint8)) == ("hi!", None)
    assert render_example({"text": "a b", "label": 3}) == ("a b", 3)
    digit = torch.arange(64.0)
    assert render_example((digit, 4), render="text")[0].startswith("0 1 2 3")
    img, label = render_example((digit, 4), render="image")  # 64 features -> 8x8 digit
    assert isinstance(img, wandb.Image) and label == 4
    assert isinstance(render_example((digit.reshape(8, 8), 4))[0], wandb.Image)
    assert render_example((digit, 4), render=lambda ex: f"digit {ex[1]}") == ("digit 4", 4)
    custom, _ = render_example((digit, 4), render=lambda ex: ex[0].reshape(8, 8).numpy())
    assert isinstance(custom, wandb.Image)
    with pytest.raises(ValueError, match="render must be"):
        render_example(digit, render="png")


def test_example_lookup_over_datasets_loaders_and_batches():
    data = image_data(5, 0, 40)
    batch = next(iter(loader(data, batch_size=5, shuffle=False)))
    x = torch.stack([data.dataset[p][0] for p in range(5)])
    for source in (data, loader(data), batch, [data[p] for p in range(5)]):
        look = ExampleLookup(source)
        assert len(look) == 5 and look.ids == [40, 41, 42, 43, 44]
        item = look.by_id(43)
        assert torch.equal(item[0], x[3]) and int(item[1]) == int(data.dataset[3][1])
    seqs = IndexedDataset(TokenDataset(4), ids=[9, 8, 7, 6])
    tokens = next(iter(loader(seqs, batch_size=4, shuffle=False)))
    look = ExampleLookup(tokens)  # a dict batch with "example_id"
    assert look.ids == [9, 8, 7, 6]
    assert torch.equal(look.by_id(7)["input_ids"], seqs[2]["input_ids"])
    with pytest.raises(KeyError, match="IndexedDataset that was logged"):
        look.by_id(5)
    plain = ExampleLookup(["a", "b"])  # no ids: by position only
    assert plain.ids is None and plain.at(1) == "b"


def test_callback_logs_through_the_trainers_wandb_logger(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    train, queries = image_data(30, 0, 500), image_data(3, 1, 900)
    grads = GradientLogger(
        tmp_path / "c.h5", attribution_data=train, every_n_epochs=1, rank=4, verbose=False
    )
    panels = InfluencePanels(grads, queries, train, top_k=2, self_influence_top=5)
    wl = WandbLogger(offline=True, save_dir=str(tmp_path), project="tda-test")
    model = fit(tmp_path, [grads, panels], train, logger=wl, log_every_n_steps=1)
    wb = OfflineRun(finish(wl.experiment))

    store = AttributionStore(tmp_path / "c.h5")
    ref = store.attribute(queries, model=model, method="tracin", top_k=2)
    assert panels.logged["tda/influence"] == 3 * 4
    check_influence_rows(wb.rows("tda/influence"), ref, 2, train, queries)
    si = store.self_influence(method="tracin")
    si_rows = wb.rows("tda/self_influence")
    assert [r["example_id"] for r in si_rows] == store.example_ids[si.topk(5).indices].tolist()
    ck = wb.rows("tda/checkpoints")
    assert sorted({r["step"] for r in ck}) == store.steps == [3, 6]
    assert len(ck) == 3 * 2
    assert all(a["example"]["_type"] == "image-file" for a in wb.artifact_rows("tda/influence"))


def test_callback_with_the_standalone_pytorch_lightning_package(tmp_path, monkeypatch):
    import pytorch_lightning as PL
    from pytorch_lightning.loggers import WandbLogger

    class PLImg(PL.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = ImgMLP()

        def per_example_loss(self, batch):
            return self.inner.per_example_loss(batch)

        def training_step(self, batch, i):
            return self.inner.training_step(batch, i)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    train, queries = image_data(20, 0, 500), image_data(2, 1, 900)
    grads = GradientLogger(
        tmp_path / "pl.h5", attribution_data=train, every_n_epochs=1, rank=4, verbose=False
    )
    panels = InfluencePanels(grads, queries, train, top_k=2, self_influence=False)
    wl = WandbLogger(offline=True, save_dir=str(tmp_path), project="tda-test")
    torch.manual_seed(0)
    model = PLImg()
    PL.Trainer(
        max_epochs=1,
        callbacks=[grads, panels],
        logger=wl,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(model, loader(train, batch_size=10))
    wb = OfflineRun(finish(wl.experiment))
    ref = AttributionStore(tmp_path / "pl.h5").attribute(
        queries, model=model, method="tracin", top_k=2
    )
    check_influence_rows(wb.rows("tda/influence"), ref, 2, train, queries)
    assert "tda/self_influence" not in panels.logged


def test_callback_and_panel_errors(tmp_path, monkeypatch):
    train, queries = image_data(20, 0, 500), image_data(2, 1, 900)

    def grads(name, **kw):
        return GradientLogger(tmp_path / name, attribution_data=train, verbose=False, **kw)

    g = grads("a.h5")
    with pytest.raises(MisconfigurationException, match="WandbLogger"):
        fit(tmp_path, [g, InfluencePanels(g, queries, train)], train)
    g = grads("b.h5")
    with pytest.raises(MisconfigurationException, match="after the GradientLogger"):
        fit(
            tmp_path,
            [g, InfluencePanels(tmp_path / "b.h5", queries, train, run=object())][::-1],
            train,
        )
    g = grads("c.h5", at_steps=[999])  # never fires: the store has no complete checkpoint
    with pytest.raises(StoreError, match="no complete checkpoint"):
        fit(tmp_path, [g, InfluencePanels(g, queries, train, run=object())], train)

    res = AttributionResult("tracin", torch.zeros(1, 20), None, None, None, torch.tensor(train.ids))
    with pytest.raises(TypeError, match="WandbLogger"):
        log_influence_panels(object(), res, train)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        log_influence_panels(None, res, train)
    with pytest.raises(ImportError, match="pip install wandb"):
        InfluencePanels(tmp_path / "a.h5", queries, train)
