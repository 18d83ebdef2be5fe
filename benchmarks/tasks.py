"""Benchmark tasks: data, model factory, training recipe and measurement, all offline and CPU-sized.

(a) ``digits``: MLP 64-128-10 on scikit-learn digits (1000 train / 200 test), plain SGD, 20 epochs.
(b) ``tinygpt``: a byte-level GPT-2 (2 layers, d=64) trained from scratch on CPython's ``pydoc_data``
    topics, one example = one 64-byte text block (1000 train / 100 held-out blocks), AdamW.
(c) ``mislabel``: the digits MLP trained with 10% of its training labels flipped.
(d) ``digits_short``: the digits MLP deliberately under-trained (2 epochs), checkpoints every 8 steps.
(e) ``digits_two_stage``: the digits MLP trained 10 epochs on half A of the training set, then 10
    epochs on the disjoint half B (one fit, same optimizer; :class:`~lightning_tda.data.StagedDataModule`).
(f) ``gpt10m``: a byte-level GPT-2 of 10.8 M parameters (6 layers, 6 heads, d=384, context 64) on the
    same pydoc blocks (512 train / 100 held-out), AdamW, batch 8, 1 epoch: a perf task whose per-step
    compute is not dominated by the fixed per-step costs of the tiny GPT (no retrain bank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_tda import IndexedDataset, causal_lm_loss
from lightning_tda.data import StagedDataModule
from lightning_tda.data.digits import load_digits_splits
from lightning_tda.demo import DigitsMLP
from lightning_tda.eval.retrain import BankSpec, RetrainRecipe, shared_order


@dataclass
class Task:
    name: str
    train: IndexedDataset
    queries: IndexedDataset
    factory: Callable[[], pl.LightningModule]
    measure: Callable
    measurements: dict[str, str]  # name -> "goodness" | "loss"
    primary: str  # the measurement LDS is reported on
    recipe: RetrainRecipe
    spec: BankSpec
    log_every_n_epochs: int
    describe: str
    flipped: np.ndarray | None = None  # mislabel task: which training rows carry a flipped label
    # log every n optimizer steps instead of every n epochs (None: log_every_n_epochs)
    log_every_n_train_steps: int | None = None
    # multi-stage task: {"boundaries": global steps ending each stage but the last (logged
    # checkpoints of the full run), "members": per stage the trained example ids, "epochs": per
    # stage, "stage_end_steps": global step at the end of every stage}; SOURCE takes
    # Source(boundaries=stages["boundaries"], stage_members=stages["members"])
    stages: dict | None = None

    def logger_schedule(self) -> dict[str, int]:
        """The GradientLogger trigger of the logged run (``every_n_train_steps`` or ``every_n_epochs``)."""
        if self.log_every_n_train_steps is not None:
            return {"every_n_train_steps": self.log_every_n_train_steps}
        return {"every_n_epochs": self.log_every_n_epochs}

    def fit_setup(self, seed: int = 0) -> tuple[dict, dict]:
        """``(trainer_kwargs, fit_kwargs)`` of the logged run on the full training set.

        The same data order as :func:`~lightning_tda.eval.retrain.train_on_subset` on every row with
        ``seed``: ``pl.Trainer(**trainer_kwargs, ...).fit(model, **fit_kwargs)``.
        """
        trainer_kwargs = {"max_epochs": self.recipe.max_epochs, **self.recipe.trainer_kwargs}
        if self.recipe.stages is not None:
            trainer_kwargs["reload_dataloaders_every_n_epochs"] = 1
            dm = StagedDataModule(
                self.train, self.recipe.stages, batch_size=self.recipe.batch_size, seed=seed
            )
            return trainer_kwargs, {"datamodule": dm}
        if self.spec.shared_seeds:  # the bank's order convention: one permutation per seed
            n = len(self.train)
            order = shared_order(np.arange(n), n, self.spec.run_seed(0, seed))
            loader = DataLoader(
                Subset(self.train, order.tolist()), batch_size=self.recipe.batch_size
            )
            return trainer_kwargs, {"train_dataloaders": loader}
        loader = DataLoader(
            self.train,
            batch_size=self.recipe.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return trainer_kwargs, {"train_dataloaders": loader}


# -- (a) digits ------------------------------------------------------------------------------------


def digits_factory() -> DigitsMLP:
    return DigitsMLP(hidden=128, lr=0.1, momentum=0.0)


def classification_measure(model: torch.nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
    """TRAK margin ``logit_y - logsumexp(other logits)`` and cross-entropy of each query."""
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    y = torch.stack([queries[i].data[1] for i in range(len(queries))])
    logits = model(x).double()
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return {
        "margin": (correct - others).numpy(),
        "loss": F.cross_entropy(logits, y, reduction="none").numpy(),
    }


def digits_task(num_subsets: int = 100, num_seeds: int = 4) -> Task:
    s = load_digits_splits(n_train=1000, n_test=200, seed=0)
    return Task(
        name="digits",
        train=s.train,
        queries=s.test,
        factory=digits_factory,
        measure=classification_measure,
        measurements={"margin": "goodness", "loss": "loss"},
        primary="margin",
        recipe=RetrainRecipe(max_epochs=20, batch_size=64),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=4,
        describe="MLP 64-128-10, sklearn digits 1000 train / 200 test, SGD lr 0.1, 20 epochs, batch 64",
    )


# -- (d) digits_short: under-trained ---------------------------------------------------------------


def digits_short_task(num_subsets: int = 100, num_seeds: int = 4) -> Task:
    """The digits MLP stopped after 2 epochs (32 SGD steps), far from converged."""
    task = digits_task(num_subsets, num_seeds)
    task.name = "digits_short"
    task.recipe = RetrainRecipe(max_epochs=2, batch_size=64)
    task.log_every_n_epochs = 1
    task.log_every_n_train_steps = 8  # steps 8, 16 (end of epoch 1), 24, 32 (end of epoch 2)
    task.describe = (
        "digits MLP under-trained: SGD lr 0.1, batch 64, only 2 epochs (32 steps), "
        "checkpoints every 8 steps"
    )
    return task


# -- (e) digits_two_stage: continual training on two disjoint halves ------------------------------


def two_stage_split(train: IndexedDataset, seed: int = 0) -> tuple[list[int], list[int]]:
    """Disjoint halves ``(A, B)`` of the training ids (sorted) from ``default_rng(seed).permutation``."""
    perm = np.random.default_rng(seed).permutation(len(train))
    half = len(train) // 2
    ids = np.asarray(train.ids)
    return sorted(ids[perm[:half]].tolist()), sorted(ids[perm[half:]].tolist())


def digits_two_stage_task(
    num_subsets: int = 100, num_seeds: int = 4, epochs: tuple[int, int] = (10, 10)
) -> Task:
    """Stage 1 trains on half A of the digits (epochs 0..9), stage 2 on half B (epochs 10..19)."""
    task = digits_task(num_subsets, num_seeds)
    a, b = two_stage_split(task.train, seed=0)
    recipe = RetrainRecipe.staged([(epochs[0], a), (epochs[1], b)], batch_size=64)
    ends = StagedDataModule(task.train, recipe.stages, batch_size=64).stage_end_steps()
    task.name = "digits_two_stage"
    task.recipe = recipe
    task.log_every_n_epochs = 2  # epoch 10 ends stage 1 (step 80): a logged checkpoint
    if epochs[0] % task.log_every_n_epochs:
        raise ValueError("stage 1 must end on a logged epoch")
    task.stages = {
        "boundaries": ends[:-1],
        "members": [a, b],
        "epochs": list(epochs),
        "stage_end_steps": ends,
    }
    task.describe = (
        f"digits MLP trained {epochs[0]} epochs on a random half A ({len(a)}) of the 1000 training "
        f"examples, then {epochs[1]} epochs on the other half B ({len(b)}); SGD lr 0.1, batch 64, one "
        f"fit (stage boundary at step {ends[0]})"
    )
    return task


# -- (c) mislabel ----------------------------------------------------------------------------------


def mislabel_task(fraction: float = 0.1, seed: int = 0) -> Task:
    s = load_digits_splits(n_train=1000, n_test=200, seed=0)
    base = s.train.dataset
    x, y = base.tensors
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < fraction
    y_noisy = y.clone()
    shift = torch.from_numpy(rng.integers(1, 10, size=len(y)))
    y_noisy[torch.from_numpy(flipped)] = (
        y[torch.from_numpy(flipped)] + shift[torch.from_numpy(flipped)]
    ) % 10
    train = IndexedDataset(TensorDataset(x, y_noisy), ids=s.train.ids)
    task = digits_task()
    task.name, task.train, task.flipped = "mislabel", train, flipped
    task.describe = (
        f"digits MLP trained with {flipped.mean():.0%} of the 1000 training labels flipped"
    )
    return task


# -- (b) tiny GPT pre-training -------------------------------------------------------------------


BLOCK = 64


def pydoc_blocks(
    num_train: int = 1000, num_queries: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint 64-byte blocks of CPython's pydoc topics text (ASCII), seeded selection."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")
    n_blocks = len(text) // BLOCK
    data = (
        torch.frombuffer(bytearray(text[: n_blocks * BLOCK]), dtype=torch.uint8)
        .long()
        .view(n_blocks, BLOCK)
    )
    perm = np.random.default_rng(seed).permutation(n_blocks)
    return data[perm[:num_train]], data[perm[num_train : num_train + num_queries]]


def byte_gpt2(
    vocab: int = 256, n_embd: int = 64, n_layer: int = 2, n_head: int = 4
) -> torch.nn.Module:
    """A config-built GPT-2 LM (default 2 layers, 4 heads, d=64), context ``BLOCK``, no dropout, eager
    attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=BLOCK,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


class TinyByteGPT(pl.LightningModule):
    """Byte-level GPT-2 (2 layers, 4 heads, d=64, context 64) from a config; AdamW, lr decayed linearly to 0.

    The decay matters for the ground truth: at a constant lr the final loss of a run depends more on its
    last batches than on its data (runs on the same subset disagreed: split-half reliability < 0).
    """

    def __init__(self, lr: float = 2e-3, **size: int) -> None:
        super().__init__()
        self.lm = byte_gpt2(**size)  # n_embd / n_layer / n_head (default 64 / 2 / 4)
        self.lr = lr

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x,) = batch
        return causal_lm_loss(self.lm(input_ids=x).logits, x)  # summed over the 63 predicted bytes

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean() / (BLOCK - 1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
        return [opt], [{"scheduler": sched, "interval": "step"}]


def tinygpt_factory() -> TinyByteGPT:
    return TinyByteGPT()


def lm_measure(model: torch.nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
    """Mean next-byte loss of each query block."""
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    logits = model.lm(input_ids=x).logits
    return {"loss": (causal_lm_loss(logits, x) / (BLOCK - 1)).double().numpy()}


def tinygpt_task(num_subsets: int = 64, num_seeds: int = 2) -> Task:
    train, test = pydoc_blocks()
    return Task(
        name="tinygpt",
        train=IndexedDataset(TensorDataset(train)),
        queries=IndexedDataset(TensorDataset(test), ids=range(100000, 100000 + len(test))),
        factory=tinygpt_factory,
        measure=lm_measure,
        measurements={"loss": "loss"},
        primary="loss",
        recipe=RetrainRecipe(max_epochs=8, batch_size=32),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=2,
        describe="byte-level GPT-2 2x64 from scratch on pydoc topics, 1000 train / 100 held-out 64-byte "
        "blocks, AdamW lr 2e-3 decayed linearly to 0, 8 epochs, batch 32",
    )


# -- (f) gpt10m: a >= 10 M-parameter GPT-2 for the perf suite -----------------------------------


GPT10M_SIZE = {"n_embd": 384, "n_layer": 6, "n_head": 6}
"""10,770,432 parameters with the byte vocabulary (tied LM head): 6 x 1.77 M per block + embeddings."""


def gpt10m_factory() -> TinyByteGPT:
    """:class:`TinyByteGPT`'s recipe (per-example summed byte loss, AdamW, linear decay) at 6x384."""
    return TinyByteGPT(lr=6e-4, **GPT10M_SIZE)


def gpt10m_task(num_subsets: int = 16, num_seeds: int = 1) -> Task:
    """Perf task: the 10.8 M-parameter byte GPT-2, 512 train / 100 held-out blocks, batch 8, 1 epoch."""
    train, test = pydoc_blocks(num_train=512, num_queries=100)
    return Task(
        name="gpt10m",
        train=IndexedDataset(TensorDataset(train)),
        queries=IndexedDataset(TensorDataset(test), ids=range(100000, 100000 + len(test))),
        factory=gpt10m_factory,
        measure=lm_measure,
        measurements={"loss": "loss"},
        primary="loss",
        recipe=RetrainRecipe(max_epochs=1, batch_size=8),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=1,
        describe="byte-level GPT-2 6x384 (10.8 M parameters) from scratch on pydoc topics, 512 train / "
        "100 held-out 64-byte blocks, AdamW lr 6e-4 decayed linearly to 0, 1 epoch, batch 8",
    )


TASKS: dict[str, Callable[[], Task]] = {
    "digits": digits_task,
    "tinygpt": tinygpt_task,
    "mislabel": mislabel_task,
    "digits_short": digits_short_task,
    "digits_two_stage": digits_two_stage_task,
    "gpt10m": gpt10m_task,
}
