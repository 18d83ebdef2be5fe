"""The README's surfaces: the example script, `lightning-tda demo` and `lightning-tda inspect`."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import h5py
import torch

from lightning_tda import AttributionStore
from lightning_tda.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_add_to_trainer_example_runs(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "add_to_trainer.py"))
    store = mod["main"](str(tmp_path / "tda.h5"))
    out = capsys.readouterr().out
    assert "test example 1000: proponents" in out
    assert store.steps == [32, 64, 96]  # 16 steps per epoch, every 2 epochs
    assert store.num_examples == 1000 and torch.equal(store.example_ids, torch.arange(1000))


def test_demo_and_inspect_cli(tmp_path, capsys):
    out = tmp_path / "demo.h5"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--queries", "2", "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("query: test digit id") == 2
    assert "highest self-influence" in text and "checkpoints (1 complete)" in text
    store = AttributionStore(out)
    assert store.steps == [48]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train [1000, 1344] float32" in text and "net.0 128x65->32x32" in text


def test_inspect_reports_errors_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "something-else"
    assert main(["inspect", str(bad)]) == 2
    assert "not a lightning_tda store" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2


def test_console_script_is_installed():
    r = subprocess.run(
        [sys.executable, "-m", "lightning_tda.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "demo" in r.stdout and "inspect" in r.stdout
