"""Optional integrations (transformers + PEFT, Weights & Biases).

Nothing heavy is imported here: import the submodule you need, e.g.
``from lightning_tda.integrations.transformers import CausalLMModule``.
"""
