"""Shared tiny models, data and fits for the tests (a plain module: import what you use).

Everything is offline and CPU-sized. ``conftest.py`` holds only fixtures and hooks; it imports from
here, and so do the tests and the subprocess scripts (``ddp_script.py``, ``kill_resume_script.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import cached_property  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from lightning_tda import (  # noqa: E402
    AttributionStore,
    GradientLogger,
    IndexedDataset,
    causal_lm_loss,
    classification_loss,
)

torch.set_num_threads(1)


class TinyMLP(pl.LightningModule):
    """8 -> 16 -> 3 MLP (optionally with dropout), batches ``Indexed(ids, (x, y))``."""

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.1, dropout: float = 0.0, hidden: int = 16
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 3)
        )
        self.optimizer, self.lr = optimizer, lr

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        _, (x, y) = batch
        return classification_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        _, (x, y) = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        if self.optimizer == "sgd_sched":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_classification(n: int = 64, seed: int = 0) -> IndexedDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    return IndexedDataset(TensorDataset(x, y), ids=[1000 + i for i in range(n)])


def trainer(tmp_path, callbacks=(), max_epochs: int = 3, **kw) -> pl.Trainer:
    args = dict(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    args.update(kw)
    return pl.Trainer(**args)


def loader(ds, batch_size: int = 16, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )


def tiny_gpt2_config(vocab: int, n_positions: int = 64, n_embd: int = 16):
    """A config-built 2-layer GPT-2 (Conv1D layers), dropout off, token 0 as bos/eos."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


class TinyGPT(pl.LightningModule):
    """Config-built GPT-2 (Conv1D layers) on right-padded token sequences with -100 labels."""

    def __init__(
        self, vocab: int = 50, n_embd: int = 16, lr: float = 0.05, attn: str = "eager"
    ) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        cfg = tiny_gpt2_config(vocab, n_positions=16, n_embd=n_embd)
        cfg._attn_implementation = attn
        self.lm = GPT2LMHeadModel(cfg)
        self.lr = lr

    def per_example_loss(self, batch):
        logits = self.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return causal_lm_loss(logits, batch["labels"])

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TokenDataset(torch.utils.data.Dataset):
    """Variable-length random token sequences, right-padded to 12 with pad id 1 and labels -100."""

    def __init__(self, n: int = 24, vocab: int = 50, seed: int = 0, max_len: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, max_len + 1, (1,), generator=g))
            ids = torch.full((max_len,), 1, dtype=torch.long)
            ids[:length] = torch.randint(2, vocab, (length,), generator=g)
            mask = torch.zeros(max_len, dtype=torch.long)
            mask[:length] = 1
            labels = ids.clone()
            labels[length:] = -100
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def FastLogger(*args, **kwargs):  # noqa: N802 (stands in for the class)
    """``GradientLogger(..., preset="fast")`` (rank 16, random basis, float16 rows): the capture the
    mechanics tests (byte counts, sweep-batch counts, random-matrix oracles) were written against."""
    kwargs.setdefault("preset", "fast")
    return GradientLogger(*args, **kwargs)


# -- logged fits ----------------------------------------------------------------------------------
@dataclass
class LoggedRun:
    """One logged fit: the store's path and what produced it; ``store`` opens it on first use."""

    path: Path
    model: pl.LightningModule
    data: Dataset
    queries: Dataset | None
    logger: GradientLogger
    trainer: pl.Trainer

    @cached_property
    def store(self) -> AttributionStore:
        return AttributionStore(self.path)


def fit_logged(
    tmp: Path,
    model: pl.LightningModule,
    data: Dataset,
    name: str = "s.h5",
    *,
    queries: Dataset | None = None,
    log_queries: bool = False,
    logger_cls: Callable[..., GradientLogger] = GradientLogger,
    epochs: int = 3,
    train_loader: Callable[..., DataLoader] = loader,
    train_batch_size: int = 16,
    callbacks: Sequence[pl.Callback] = (),
    **logger_kwargs: Any,
) -> LoggedRun:
    """Fit ``model`` on ``train_loader(data, batch_size=train_batch_size)`` for ``epochs`` epochs with
    ``logger_cls(tmp / name, attribution_data=data, [query_data=queries,] **logger_kwargs)`` first
    in the callbacks, then ``callbacks``. The model and the global RNG are the caller's."""
    path = tmp / name
    if log_queries:
        logger_kwargs["query_data"] = queries
    grads = logger_cls(path, attribution_data=data, **logger_kwargs)
    tr = trainer(tmp, [grads, *callbacks], max_epochs=epochs)
    tr.fit(model, train_loader(data, batch_size=train_batch_size))
    return LoggedRun(path, model, data, queries, grads, tr)


def fit_logged_mlp(
    tmp: Path,
    name: str = "s.h5",
    *,
    n: int = 64,
    n_queries: int | None = None,
    mlp: dict[str, Any] | None = None,
    **kw: Any,
) -> LoggedRun:
    """``torch.manual_seed(0)``, ``make_classification(n)`` (queries: ``make_classification(n_queries,
    seed=1)``), ``TinyMLP(**mlp)``, then :func:`fit_logged` with ``kw``."""
    torch.manual_seed(0)
    data = make_classification(n)
    queries = None if n_queries is None else make_classification(n_queries, seed=1)
    model = TinyMLP(**(mlp or {}))
    return fit_logged(tmp, model, data, name, queries=queries, **kw)


def fit_logged_gpt(
    tmp: Path,
    name: str = "s.h5",
    *,
    n: int = 24,
    gpt: dict[str, Any] | None = None,
    **kw: Any,
) -> LoggedRun:
    """``torch.manual_seed(0)``, ``IndexedDataset(TokenDataset(n))``, ``TinyGPT(**gpt)``, then
    :func:`fit_logged` with ``kw``."""
    torch.manual_seed(0)
    data = IndexedDataset(TokenDataset(n))
    model = TinyGPT(**(gpt or {}))
    return fit_logged(tmp, model, data, name, **kw)


def dense_fc_metadata(d_out: int, d_in: int) -> dict[str, str]:
    """Run metadata of a dense sweep store of one exact ``fc`` Linear (with bias), for stores written
    by :class:`~lightning_tda.store.writer.StoreWriter` directly."""
    import json

    from lightning_tda.capture.layers import LayerSpec
    from lightning_tda.capture.projection import ProjectionConfig

    layer = LayerSpec("fc", "linear", d_out, d_in, True, d_out, d_in, 0, ("fc.weight", "fc.bias"))
    return {
        "logging_mode": "sweep",
        "storage": "dense",
        "layers": json.dumps([layer.to_dict()]),
        "projection": json.dumps(ProjectionConfig(kind="exact").to_dict()),
        "layer_groups": json.dumps({"fc": 0}),
        "other_params": json.dumps([]),
    }


def spy_first_batch_checks(monkeypatch) -> list[list[int]]:
    """The example ids of every first-batch check a fit runs, in order (the check still runs)."""
    from lightning_tda.callbacks import context

    seen: list[list[int]] = []
    real = context.check_first_batch

    def spy(model, layers, config, loss_fn, batch, ids, device, **kw):
        seen.append(ids.tolist())
        return real(model, layers, config, loss_fn, batch, ids, device, **kw)

    monkeypatch.setattr(context, "check_first_batch", spy)
    return seen


def launch_script(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python script *args`` as a fresh multi-process launcher: a free local master port,
    ``tests/`` on ``PYTHONPATH``, offline hubs and no inherited rank variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = str(Path(__file__).parent)
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def h5_datasets(group: Any) -> dict[str, Any]:
    """Every dataset under an open h5py group or file, by path: ``{name: numpy array}``."""
    import h5py

    out: dict[str, Any] = {}
    group.visititems(
        lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
    )
    return out


def assert_same_datasets(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same dataset names; floats equal to fp32 rounding (relative to each dataset's largest
    value), the rest exactly; packed state bytes compared as the float32 values they hold."""
    import numpy as np

    assert sorted(got) == sorted(want)
    for k in want:
        x, y = got[k], want[k]
        if k.endswith("state_packed"):
            x, y = x.view(np.float32), y.view(np.float32)
        assert x.shape == y.shape, k
        if x.dtype.kind == "f":
            tol = 1e-5 * max(1.0, float(np.abs(y).max()))
            np.testing.assert_allclose(x, y, rtol=0, atol=tol, err_msg=k)
        else:
            np.testing.assert_array_equal(x, y, err_msg=k)
