"""Small built-in models with random weights, for the demo, `mst-inspect`, the benchmarks and the tests.

    mlp_stack.py     `MLPStack`: embedding, MLP blocks, head and loss, nothing else
    causal_lms.py    tiny Hugging Face causal LMs (`tiny_llama`, `tiny_gpt2`) and `random_batch`
    grpo.py          a GRPO step as TRL writes it (`mst-inspect mst_fx.models:grpo_llama`), TRL's loops
    moe_layers.py    mixture-of-experts blocks as model code writes them: a loop over expert modules,
                     a capacity-limited and an expert-choice one (not row-wise), and `MoEStack`
    tiny_configs.py  a tiny config for any Hugging Face causal-LM family (`mst-inspect mistral`)

Nothing is downloaded. These import torch and transformers only, nothing else of mst_fx: the
models are what the library is tested on, not part of it.
"""

from .causal_lms import enable_checkpointing, random_batch, tiny_gpt2, tiny_llama
from .grpo import (
    GRPOStep, grpo_batch, grpo_llama, grpo_objective, masked_mean, trl_entropy_from_logits,
    trl_selective_log_softmax,
)  # fmt: skip
from .mlp_stack import GeluMLP, MLPStack, SwiGLU

__all__ = [
    "GRPOStep", "GeluMLP", "MLPStack", "SwiGLU", "enable_checkpointing", "grpo_batch", "grpo_llama", "grpo_objective",
    "masked_mean", "random_batch", "tiny_gpt2", "tiny_llama", "trl_entropy_from_logits", "trl_selective_log_softmax",
]  # fmt: skip
