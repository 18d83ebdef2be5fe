"""``lightning-tda demo``: train a small classifier with the logger attached, then attribute."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_tda.attribution import AttributionStore
from lightning_tda.callbacks import GradientLogger
from lightning_tda.capture.losses import classification_loss
from lightning_tda.data.digits import load_digits_splits


class DigitsMLP(pl.LightningModule):
    """64 -> hidden -> 10 MLP trained with plain SGD; batches are ``Indexed(ids, (x, y))``."""

    def __init__(self, hidden: int = 128, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x, y) = batch
        return classification_loss(self(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, (x, y) = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, (x, y) = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


def _digit_ascii(img: np.ndarray) -> list[str]:
    shades = " .:oO@"
    return ["".join(shades[min(5, int(v) * 6 // 17)] for v in row) for row in img]


def _train(out: Path, data, epochs: int, n_train: int) -> DigitsMLP:
    """Fit the MLP with a :class:`GradientLogger` writing ``out``; prints the test accuracy."""
    model = DigitsMLP()
    logger = GradientLogger(
        out,
        attribution_data=data.train,
        # capture at its defaults: the "accurate" preset (rank 32, PCA, float32); a run shorter than
        # three epochs still logs its last epoch
        every_n_epochs=min(3, epochs),
        batch_size=250,
        overwrite=True,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[logger],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
        deterministic=True,
    )
    train_loader = DataLoader(data.train, batch_size=64, shuffle=True)
    print(
        f"Training a 64-128-10 MLP on {n_train} scikit-learn digits for {epochs} epochs, logging to {out} ..."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_loader, DataLoader(data.test, batch_size=200))
    acc = trainer.callback_metrics.get("val_acc")
    if acc is not None:
        print(f"test accuracy after training: {float(acc):.3f}")
    return model


def _print_query(data, res, qi: int, ti: int, label: int, pred: int, loss: float) -> None:
    """Query ``qi`` (test row ``ti``) next to its proponents and opponents, as ASCII digits."""
    qid = int(data.test.ids[ti])
    print(f"query: test digit id {qid}, label {label}, predicted {pred}, loss {loss:.2f}")
    cols = [("query", qid, None)]
    cols += [
        ("proponent", int(i), float(s))
        for i, s in zip(res.indices[qi], res.scores[qi], strict=True)
    ]
    cols += [
        ("opponent", int(i), float(s))
        for i, s in zip(res.opponents[qi], res.opponent_scores[qi], strict=True)
    ]
    heads = [f"{kind[:5]} #{i}".ljust(13) for kind, i, _ in cols]
    subs = [
        (f"y={data.labels[i]}" + ("" if s is None else f" {s:+.3f}")).ljust(13) for _, i, s in cols
    ]
    print("  " + " ".join(heads))
    print("  " + " ".join(subs))
    arts = [_digit_ascii(data.images[i]) for _, i, _ in cols]
    for r in range(8):
        print("  " + " ".join(a[r].ljust(13) for a in arts))
    print()


def run_demo(
    out: str | os.PathLike | None = None,
    epochs: int = 12,
    n_train: int = 1000,
    n_queries: int = 3,
    top_k: int = 3,
    seed: int = 0,
) -> Path:
    """Train the digits MLP with a :class:`GradientLogger`, attribute a few test digits, print them.

    Returns the path of the store.
    """
    t0 = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = (
        Path(out)
        if out is not None
        else Path(tempfile.mkdtemp(prefix="lightning_tda_demo_")) / "tda.h5"
    )
    pl.seed_everything(seed, verbose=False)
    data = load_digits_splits(n_train=n_train, n_test=200, seed=seed)
    model = _train(out, data, epochs, n_train)
    store = AttributionStore(out)
    # the test digits the trained model finds hardest: the interesting ones to explain
    x = torch.stack([data.test[i].data[0] for i in range(len(data.test))])
    y = torch.stack([data.test[i].data[1] for i in range(len(data.test))])
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
        preds = model(x).argmax(1)
    order = torch.argsort(losses, descending=True)[:n_queries].tolist()
    queries = torch.utils.data.Subset(data.test, order)
    res = store.attribute(queries, model=model, top_k=top_k)  # method="auto"
    print(
        f"\n{res.method} (chosen by method='auto': {res.settings['reason']}; steps {res.checkpoints}); "
        "score > 0: including the example lowers the query's loss.\n"
    )
    for qi, ti in enumerate(order):
        _print_query(data, res, qi, ti, int(y[ti]), int(preds[ti]), float(losses[ti]))
    self_inf = store.self_influence(method="tracin")
    top = torch.argsort(self_inf, descending=True)[:5]
    ids = store.example_ids[top].tolist()
    print(
        "highest self-influence (mislabel / hard-example candidates): "
        + ", ".join(f"#{i} (y={data.labels[i]})" for i in ids)
    )
    print()
    print(store.summary())
    print(
        f"\ndemo finished in {time.perf_counter() - t0:.1f}s. Open the store with "
        f"lightning_tda.AttributionStore({str(out)!r}) or run: lightning-tda inspect {out}"
    )
    return out
