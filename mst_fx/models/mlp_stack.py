"""`MLPStack`: embedding, residual MLP blocks (`SwiGLU` or `GeluMLP`), LM head and loss, nothing else."""

from __future__ import annotations

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
