"""Tiny Hugging Face causal LMs with random weights, built from configs (nothing is downloaded),
and a random batch of token ids for them."""

from __future__ import annotations

import torch


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
