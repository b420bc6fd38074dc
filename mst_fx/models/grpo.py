"""A GRPO step as TRL writes it, on a tiny Llama: the per-token LM head of post-training; and
TRL's own log-prob and entropy loops, which post-training code runs on the logits a model returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .causal_lms import tiny_llama


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


def trl_selective_log_softmax(logits, index):
    """TRL's `selective_log_softmax`, fp32 branch: gather, then a logsumexp per sequence."""
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def trl_entropy_from_logits(logits, chunk_size: int = 128):
    """TRL's `entropy_from_logits`: flattened rows, in chunks, -(exp(logps) * logps).sum(-1)."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])
