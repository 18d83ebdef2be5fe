"""Benchmark tasks trained the way practitioners train: AdamW, warmup, cosine/linear decay, weight
decay and gradient clipping (issue 12). The SGD tasks of :mod:`benchmarks.tasks` stay as secondary rows.

(a) ``clf_adamw``: MLP 64-128-64-10 on scikit-learn digits, AdamW + warmup + cosine, clipping, 20 epochs.
(b) ``gpt_adamw``: byte-level GPT-2 (2 x 64) pre-trained over 8 epochs on 1000 pydoc blocks, AdamW
    (β2 0.95, wd 0.1) + warmup + cosine, clipping.
(c) ``gpt_single_pass``: the same GPT pre-trained in ONE pass over 10,000 64-byte blocks (each example
    seen once: the LLM regime).
(d) ``lora_ft``: LoRA fine-tuning (PEFT, r 8 on ``c_attn`` and ``c_fc``) of a byte-level GPT pre-trained on
    pydoc (the base is trained once, deterministically, and cached) on synthetic prompt/completion
    fact pairs, prompt bytes masked out of the loss.

Every model's ``per_example_loss`` sums over supervised tokens; LM queries are measured by their mean
token loss (lower = better), classifiers by the TRAK margin.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from benchmarks.tasks import BLOCK, Task, byte_gpt2, classification_measure
from lightning_tda import IndexedDataset, causal_lm_loss
from lightning_tda.capture.losses import classification_loss
from lightning_tda.data.digits import load_digits_splits
from lightning_tda.data.text import pydoc_blocks, qa_pairs
from lightning_tda.eval.retrain import BankSpec, RetrainRecipe

CLIP = {"gradient_clip_val": 1.0}


def warmup_cosine(
    opt: torch.optim.Optimizer, total: int, warmup: float = 0.1, final: float = 0.0
) -> dict:
    """Linear warmup over ``warmup`` of the steps, then cosine decay to ``final`` x the peak lr."""
    n_warm = max(1, int(round(warmup * total)))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = min(1.0, (step - n_warm) / max(1, total - n_warm))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"scheduler": sched, "interval": "step"}


# -- (a) classifier ----------------------------------------------------------------------------------


class AdamWMLP(pl.LightningModule):
    """64-128-64-10 MLP with AdamW (wd 0.01), 10% warmup, cosine decay to 0."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x, y) = batch
        return classification_loss(self(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, (x, y) = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return [opt], [warmup_cosine(opt, total, warmup=0.1)]


def clf_factory() -> AdamWMLP:
    return AdamWMLP()


def clf_adamw_task(num_subsets: int = 100, num_seeds: int = 4) -> Task:
    s = load_digits_splits(n_train=1000, n_test=200, seed=0)
    return Task(
        name="clf_adamw",
        train=s.train,
        queries=s.test,
        factory=clf_factory,
        measure=classification_measure,
        measurements={"margin": "goodness", "loss": "loss"},
        primary="margin",
        recipe=RetrainRecipe(max_epochs=20, batch_size=64, trainer_kwargs=dict(CLIP)),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=4,
        describe="MLP 64-128-64-10 on sklearn digits (1000 train / 200 test), AdamW lr 3e-3 wd 0.01, "
        "10% warmup + cosine to 0, grad clip 1.0, 20 epochs, batch 64",
    )


# -- (b, c) GPT pre-training ---------------------------------------------------------------------


class PretrainGPT(pl.LightningModule):
    """Byte-level GPT-2 (2 layers, 4 heads, d=64) trained from scratch; batches ``Indexed(ids, (x,))``.

    AdamW (β = 0.9/0.95, wd 0.1 on matrices, none on biases/LayerNorm/embeddings as nanoGPT does),
    ``warmup`` fraction of linear warmup, cosine decay to 10% of the peak.
    """

    def __init__(
        self, lr: float = 3e-3, weight_decay: float = 0.1, warmup: float = 0.05, final: float = 0.1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lm = byte_gpt2()
        self.kept: torch.Tensor | None = None

    def set_kept(self, mask: torch.Tensor) -> None:
        """In-place retraining (``BankSpec(in_place=True)``): weight example id ``i``'s loss by
        ``mask[i]`` (ids are dataset positions here); the batch mean keeps its full denominator."""
        self.kept = mask

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x,) = batch
        return causal_lm_loss(self.lm(input_ids=x).logits, x)  # summed over the 63 predicted bytes

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch)
        if self.kept is not None:
            loss = loss * self.kept.to(loss.device)[batch[0]]
        return loss.mean() / (BLOCK - 1)

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "wte" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "wte" not in n)]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return [opt], [
            warmup_cosine(opt, total, warmup=self.hparams.warmup, final=self.hparams.final)
        ]


def gpt_factory() -> PretrainGPT:
    return PretrainGPT()


def gpt_single_pass_factory() -> PretrainGPT:
    """Cosine to 0: a single pass ends on tiny steps, so the last batches do not decide the loss."""
    return PretrainGPT(lr=1e-3, final=0.0)


def lm_block_measure(model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
    """Mean next-byte loss of each query block."""
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    out = []
    for chunk in x.split(256):
        out.append(causal_lm_loss(model.lm(input_ids=chunk).logits, chunk) / (BLOCK - 1))
    return {"loss": torch.cat(out).double().numpy()}


def stdlib_docstrings() -> str:
    """Every docstring of >= 64 characters in CPython's standard library sources (whitespace collapsed;
    tests, idlelib, lib2to3, tkinter, turtledemo and site-packages skipped), read with ``ast``, never
    imported: about 1.3 MB of English on CPython 3.11."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    docs = []
    for f in sorted(root.rglob("*.py")):
        if skip & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(tree):
            if isinstance(node, kinds) and (d := ast.get_docstring(node)) and len(d) >= 64:
                docs.append(" ".join(d.split()))
    return "\n".join(docs)


def corpus_blocks() -> torch.Tensor:
    """``[n, 64]`` bytes: the pydoc topics' blocks, then the stdlib docstrings' (about 28,000 in all)."""
    text = stdlib_docstrings().encode("ascii", "replace")
    n = len(text) // BLOCK
    doc = torch.frombuffer(bytearray(text[: n * BLOCK]), dtype=torch.uint8).long().view(n, BLOCK)
    return torch.cat([pydoc_blocks(BLOCK), doc])


def _blocks(
    num_train: int, num_queries: int, seed: int, large: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    data = corpus_blocks() if large else pydoc_blocks(BLOCK)
    perm = np.random.default_rng(seed).permutation(len(data))
    return data[perm[:num_train]], data[perm[num_train : num_train + num_queries]]


def gpt_adamw_task(num_subsets: int = 100, num_seeds: int = 3) -> Task:
    train, test = _blocks(1000, 200, seed=1)
    return Task(
        name="gpt_adamw",
        train=IndexedDataset(TensorDataset(train)),
        queries=IndexedDataset(TensorDataset(test), ids=range(100000, 100000 + len(test))),
        factory=gpt_factory,
        measure=lm_block_measure,
        measurements={"loss": "loss"},
        primary="loss",
        recipe=RetrainRecipe(max_epochs=8, batch_size=32, trainer_kwargs=dict(CLIP)),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=2,
        describe="byte-level GPT-2 2x64 pre-trained from scratch, 1000 pydoc 64-byte blocks / 200 held-out, "
        "8 epochs, batch 32, AdamW lr 3e-3 β2 0.95 wd 0.1, 5% warmup + cosine to 10%, grad clip 1.0",
    )


def gpt_single_pass_task(num_subsets: int = 50, num_seeds: int = 3) -> Task:
    train, test = _blocks(10000, 200, seed=2, large=True)
    return Task(
        name="gpt_single_pass",
        train=IndexedDataset(TensorDataset(train)),
        queries=IndexedDataset(TensorDataset(test), ids=range(100000, 100000 + len(test))),
        factory=gpt_single_pass_factory,
        measure=lm_block_measure,
        measurements={"loss": "loss"},
        primary="loss",
        recipe=RetrainRecipe(max_epochs=1, batch_size=32, trainer_kwargs=dict(CLIP)),
        # the fixed-seed, in-place convention: with per-run seeds the bank's split-half reliability was
        # -0.18, with shared seeds alone about 0 (initialisation, order and batching noise swamp a
        # half subset's effect in one pass); removed examples keep their place with loss weight 0
        spec=BankSpec(
            num_subsets=num_subsets,
            alpha=0.5,
            num_seeds=num_seeds,
            base_seed=0,
            shared_seeds=True,
            in_place=True,
        ),
        log_every_n_epochs=1,
        log_every_n_train_steps=78,  # checkpoints at steps 78, 156, 234, 312 of the 313-step pass
        describe="byte-level GPT-2 2x64 pre-trained in ONE pass over 10,000 64-byte blocks of pydoc topics + "
        "stdlib docstrings "
        "(each seen once) / 200 held-out, batch 32, AdamW lr 1e-3 β2 0.95 wd 0.1, 5% warmup + cosine "
        "to 0, grad clip 1.0; bank with shared seeds, in place (same init and data order per seed, "
        "removed examples weighted 0 where they stand)",
    )


# -- (d) LoRA fine-tuning ----------------------------------------------------------------------------

BASE_PATH = Path(__file__).parent / "banks" / "lora_ft" / "base.pt"
PROMPT_LEN = 40  # bytes: prompts are left-padded to this many, completions right-padded
SEQ_LEN = 64


def pretrained_base_state(path: Path = BASE_PATH) -> dict[str, torch.Tensor]:
    """The LoRA base: the pre-training GPT trained 4 epochs on 4000 pydoc blocks, seed 0 (cached)."""
    if path.exists():
        return torch.load(path, weights_only=True)
    from torch.utils.data import DataLoader

    pl.seed_everything(0, verbose=False)
    model = PretrainGPT()
    train, _ = _blocks(4000, 0, seed=3)
    loader = DataLoader(
        IndexedDataset(TensorDataset(train)),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    pl.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        gradient_clip_val=1.0,
    ).fit(model, loader)
    state = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


class LoraFactGPT(pl.LightningModule):
    """LoRA (r 8, α 16, PEFT) on ``c_attn`` and ``c_fc`` of the pre-trained byte GPT; batches
    ``Indexed(ids, (tokens, labels))`` with ``labels = -100`` on prompt and padding bytes.

    AdamW lr 3e-3, wd 0.01, 10% warmup + linear decay to 0, as PEFT fine-tuning recipes do.
    """

    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.save_hyperparameters()
        base = byte_gpt2()
        base.load_state_dict(pretrained_base_state())
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
        self.lm = get_peft_model(base, cfg)

    def per_example_loss(self, batch) -> torch.Tensor:
        _, (x, labels) = batch
        return causal_lm_loss(self.lm(input_ids=x).logits, labels)

    def training_step(self, batch, batch_idx):
        _, (x, labels) = batch
        return self.per_example_loss(batch).sum() / (labels[:, 1:] != -100).sum()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        n_warm = max(1, total // 10)

        def factor(step: int) -> float:
            if step < n_warm:
                return (step + 1) / n_warm
            return max(0.0, (total - step) / max(1, total - n_warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def lora_factory() -> LoraFactGPT:
    return LoraFactGPT()


def encode_pairs(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of ``prompt + completion``: prompt left-padded to ``PROMPT_LEN`` (pad 0), completion right-padded
    to ``SEQ_LEN``; labels are the tokens on completion bytes and -100 elsewhere (unshifted, HF style)."""
    x = torch.zeros(len(pairs), SEQ_LEN, dtype=torch.long)
    labels = torch.full_like(x, -100)
    for i, (p, c) in enumerate(pairs):
        pb, cb = p.encode("ascii")[-PROMPT_LEN:], c.encode("ascii")[: SEQ_LEN - PROMPT_LEN]
        x[i, PROMPT_LEN - len(pb) : PROMPT_LEN] = torch.tensor(list(pb))
        x[i, PROMPT_LEN : PROMPT_LEN + len(cb)] = torch.tensor(list(cb))
        labels[i, PROMPT_LEN : PROMPT_LEN + len(cb)] = torch.tensor(list(cb))
    return x, labels


def lora_measure(model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
    """Mean loss per completion byte of each query pair."""
    x = torch.stack([queries[i].data[0] for i in range(len(queries))])
    labels = torch.stack([queries[i].data[1] for i in range(len(queries))])
    loss = causal_lm_loss(model.lm(input_ids=x).logits, labels)
    n = (labels[:, 1:] != -100).sum(1).clamp_min(1)
    return {"loss": (loss / n).double().numpy()}


def lora_ft_task(num_subsets: int = 48, num_seeds: int = 3) -> Task:
    pairs = qa_pairs("facts", n=600)
    perm = np.random.default_rng(4).permutation(len(pairs))
    x, labels = encode_pairs(pairs)
    tr, te = perm[:500], perm[500:]
    return Task(
        name="lora_ft",
        train=IndexedDataset(TensorDataset(x[tr], labels[tr])),
        queries=IndexedDataset(
            TensorDataset(x[te], labels[te]), ids=range(100000, 100000 + len(te))
        ),
        factory=lora_factory,
        measure=lora_measure,
        measurements={"loss": "loss"},
        primary="loss",
        recipe=RetrainRecipe(max_epochs=4, batch_size=16, trainer_kwargs=dict(CLIP)),
        spec=BankSpec(num_subsets=num_subsets, alpha=0.5, num_seeds=num_seeds, base_seed=0),
        log_every_n_epochs=1,
        describe="LoRA fine-tuning (PEFT r 8 α 16 on c_attn + c_fc) of a byte GPT-2 2x64 pre-trained on "
        "pydoc, on 500 synthetic prompt/completion facts ('Q: What does Ada like? A:' -> ' red kites in "
        "Oslo.'), prompt masked; 100 held-out pairs; AdamW lr 3e-3 wd 0.01, 10% warmup + linear decay, "
        "grad clip 1.0, 4 epochs, batch 16",
    )


REALISTIC = {
    "clf_adamw": clf_adamw_task,
    "gpt_adamw": gpt_adamw_task,
    "gpt_single_pass": gpt_single_pass_task,
    "lora_ft": lora_ft_task,
}
