"""Mixture-of-experts layers written the ways model code writes them, for tests and benchmarks.

    LoopMoE         Mixtral's original block (transformers <= 4.4x): a ModuleList of SwiGLU
                    experts, `torch.where(expert_mask[e])` per expert, `index_add_` back.
    CapacityMoE     the same experts behind a capacity limit (GShard/Switch): a token's place in
                    its expert is a cumsum over the tokens, and tokens past the capacity are dropped.
                    Not row-wise: mst must leave it alone and say why.
    ExpertChoiceMoE each expert picks its top tokens (a top-k over the tokens). Not row-wise either.
    MoEStack        embedding, residual blocks of one of the above (RMS-normed), LM head, mean CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp_stack import SwiGLU


class LoopMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, intermediate) for _ in range(experts))

    def route(self, h):
        router_logits = self.gate(h)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), selected

    def forward(self, x):
        batch, length, hidden = x.shape
        h = x.view(-1, hidden)
        weights, selected = self.route(h)
        final = torch.zeros((batch * length, hidden), dtype=h.dtype, device=h.device)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current = h[None, top_x].reshape(-1, hidden)
            out = self.experts[e](current) * weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(h.dtype))
        return final.reshape(batch, length, hidden)


class CapacityMoE(LoopMoE):
    """Each expert takes at most `capacity_factor * T * k / E` slots, first come first served."""

    capacity_factor = 1.0

    def forward(self, x):
        batch, length, hidden = x.shape
        h = x.view(-1, hidden)
        weights, selected = self.route(h)
        mask = F.one_hot(selected.reshape(-1), num_classes=self.num_experts)  # (T*k, E)
        position = torch.cumsum(mask, dim=0) * mask  # 1-based place in the expert's queue
        capacity = int(self.capacity_factor * h.shape[0] * self.top_k / self.num_experts)
        kept = ((position > 0) & (position <= capacity)).any(dim=-1).view(-1, self.top_k)
        weights = weights * kept
        return self._combine(h, weights, selected).reshape(batch, length, hidden)

    def _combine(self, h, weights, selected):
        final = torch.zeros_like(h)
        slots = selected.reshape(-1)
        tokens = torch.arange(h.shape[0], device=h.device).repeat_interleave(self.top_k)
        for e in range(self.num_experts):
            out = self.experts[e](h[tokens]) * (weights.reshape(-1) * (slots == e))[:, None]
            final.index_add_(0, tokens, out)
        return final



class ExpertChoiceMoE(LoopMoE):
    """Each expert takes its `T * k / E` highest-scoring tokens."""

    def forward(self, x):
        batch, length, hidden = x.shape
        h = x.view(-1, hidden)
        scores = F.softmax(self.gate(h), dim=-1)  # (T, E)
        per_expert = max(1, h.shape[0] * self.top_k // self.num_experts)
        weights, tokens = torch.topk(scores.t(), per_expert, dim=-1)  # (E, C): tokens per expert
        final = torch.zeros_like(h)
        for e in range(self.num_experts):
            out = self.experts[e](h[tokens[e]]) * weights[e, :, None]
            final.index_add_(0, tokens[e], out)
        return final.reshape(batch, length, hidden)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class MoEStack(nn.Module):
    def __init__(self, layer: type[LoopMoE] = LoopMoE, vocab=512, hidden=64, intermediate=32, experts=4, top_k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(layer(hidden, intermediate, experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return F.cross_entropy(self.head(x).view(-1, self.head.out_features), labels.view(-1))
