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


class GRPOStep(nn.Module):
    """A GRPO step's loss on a causal LM, as TRL writes it: per-token log-probs of the sampled
    tokens at a temperature, the clipped surrogate with per-sequence advantages over a completion
    mask, and the entropy a trainer logs (no gradient). Returns (loss, mean entropy)."""

    def __init__(self, model: nn.Module, temperature: float = 0.9, epsilon: float = 0.2):
        super().__init__()
        self.model, self.temperature, self.epsilon = model, temperature, epsilon

    def forward(self, input_ids, completion_mask, advantages, old_logps):
        logits = self.model(input_ids, use_cache=False).logits[:, :-1, :] / self.temperature
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        return grpo_objective(logps, completion_mask, advantages, old_logps, self.epsilon), masked_mean(entropy, completion_mask)


def grpo_objective(logps, completion_mask, advantages, old_logps, epsilon: float = 0.2):
    """GRPO's clipped surrogate, each sequence's mean over its completion, then the batch mean."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    return ((per_token * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_batch(vocab: int, sequences: int, tokens: int, seed: int = 0):
    """(input_ids, completion_mask, advantages, old_logps) for `GRPOStep`: random tokens, the last
    tenth of some completions padded, old log-probs near those of a uniform policy."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, tokens + 1), generator=g)
    mask = torch.ones(sequences, tokens)
    mask[::2, tokens - tokens // 10 :] = 0
    advantages = torch.randn(sequences, generator=g)
    old_logps = -torch.log(torch.tensor(float(vocab))) + 0.1 * torch.randn(sequences, tokens, generator=g)
    return ids, mask, advantages, old_logps


def grpo_llama(sequences: int = 8, tokens: int = 1024, **shape):
    """`mst-inspect mst_fx.models:grpo_llama`: a GRPO step on the tiny Llama, per-token head included."""
    step = GRPOStep(tiny_llama(**shape))
    return step, grpo_batch(step.model.config.vocab_size, sequences, tokens)
