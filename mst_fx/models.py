"""Small built-in models with random weights, for the demo, the benchmarks and the tests.

Nothing is downloaded: the Hugging Face models are built from configs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class SwiGLU(nn.Module):
    def __init__(self, d: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d, intermediate, bias=bias)
        self.up = nn.Linear(d, intermediate, bias=bias)
        self.down = nn.Linear(intermediate, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, d: int, intermediate: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d, intermediate, bias=bias)
        self.proj = nn.Linear(intermediate, d, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class MLPStack(nn.Module):
    """Embedding, residual MLP blocks, LM head, mean cross-entropy: the MLP and head of a
    transformer with nothing else, so that their memory is all there is to see. With
    `checkpointing`, each block runs under `torch.utils.checkpoint`, as user code would write it."""

    def __init__(self, vocab=32000, d=256, intermediate=1024, layers=4, mlp=SwiGLU, bias=False, checkpointing=False):
        super().__init__()
        self.checkpointing = checkpointing
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(mlp(d, intermediate, bias=bias) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=bias)

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x))
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def tiny_llama(hidden=256, intermediate=688, layers=2, vocab=32000, heads=4, **overrides):
    """A Llama-shaped Hugging Face `LlamaForCausalLM` with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
        max_position_embeddings=1 << 17, attn_implementation="sdpa", **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_gpt2(hidden=128, layers=2, vocab=1000, heads=4, **overrides):
    """A GPT-2 (`Conv1D` linears, tied head) with random weights and no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=4096,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def enable_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant (the form Dynamo traces)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def random_batch(vocab: int, batch: int, tokens: int, ignore_every: int = 0, seed: int = 0):
    """(input_ids, labels); with `ignore_every=k`, every k-th label is -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels = ids.clone()
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return ids, labels
