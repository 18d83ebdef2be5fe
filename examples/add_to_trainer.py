"""Add training-data attribution to a Lightning fit you already have.

Run: python examples/add_to_trainer.py [--out runs/tda.h5]
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import AttributionStore, GradientLogger, IndexedDataset


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def per_example_loss(self, batch) -> torch.Tensor:  # Tensor[B]: one loss per example
        _, (x, y) = batch  # IndexedDataset batches are (example_ids, data)
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: str = "runs/tda.h5") -> AttributionStore:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = IndexedDataset(TensorDataset(x[:1000], y[:1000]))  # every item carries its example id
    test = IndexedDataset(TensorDataset(x[1000:1010], y[1000:1010]), ids=range(1000, 1010))

    L.seed_everything(0)
    model = Classifier()
    logger = GradientLogger(out, attribution_data=train, every_n_epochs=2, rank=16, overwrite=True)
    trainer = L.Trainer(max_epochs=6, callbacks=[logger], logger=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))

    store = AttributionStore(out)
    res = store.attribute(test, model=model, method="tracin", top_k=5)
    for q in range(3):
        print(
            f"test example {1000 + q}: proponents {res.indices[q].tolist()}, opponents {res.opponents[q].tolist()}"
        )
    self_inf = store.self_influence(method="tracin")
    print(
        "highest self-influence:", store.example_ids[self_inf.argsort(descending=True)[:5]].tolist()
    )
    return store


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/tda.h5")
    main(parser.parse_args().out)
