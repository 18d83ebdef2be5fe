"""Run by test_resume.py in a subprocess: a fit that SIGKILLs itself in the middle of a sweep.

usage: python kill_resume_script.py STORE CKPT_DIR (kill N | resume)
"""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl
import torch
from conftest import TinyMLP, loader, make_classification
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tda import GradientLogger


class KillingMLP(TinyMLP):
    """SIGKILLs the process on the n-th sweep batch (per_example_loss runs only in sweeps)."""

    def __init__(self, kill_at: int | None) -> None:
        super().__init__(lr=0.1)
        self.kill_at = kill_at
        self.calls = 0

    def per_example_loss(self, batch):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().per_example_loss(batch)


def main() -> None:
    store, ckpt_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    kill_at = int(sys.argv[4]) if mode == "kill" else None
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = make_classification(64)
    model = KillingMLP(kill_at)
    logger = GradientLogger(
        store, attribution_data=data, every_n_epochs=1, batch_size=16, verbose=False
    )
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[logger, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(
        model,
        loader(data),
        ckpt_path=os.path.join(ckpt_dir, "last.ckpt") if mode == "resume" else None,
    )


if __name__ == "__main__":
    main()
