"""Every recipe runs (smoke size) through `lightning-tda fit --config ...`."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_tda import AttributionStore
from lightning_tda.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochs", "3"]) == 0
    stores = list(tmp_path.glob("runs/*.h5"))
    assert len(stores) == 1
    store = AttributionStore(stores[0])
    assert store.steps == [48] and store.num_examples == 1000
