"""Causal attention that builds its padding mask only when the batch is padded.

What the attention pass (`passes/attention.py`) puts in place of an SDPA call whose mask it proved
to be `kv <= q` and `padding[b, kv + offset]`:

    if every padding tensor is all True:   SDPA(q, k, v, is_causal=True)        no mask, flash kernels
    else:                                  SDPA(q, k, v, attn_mask=the same mask rebuilt)

A padded batch computes exactly what the model's own call computed, paying for its mask; an
unpadded one never builds it. The choice is made at run time, inside one opaque custom op
(`torch.ops.mst.causal_attention`), so it works wherever an op can go, activation-checkpoint
bodies included (torch.cond can't run in those). The op saves only its inputs: its backward runs
the attention forward again, under autograd, and differentiates it (one more attention forward per
call, as a torch.cond would). Attention dropout is refused by the pass for that reason: a second
forward would draw another dropout mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunk_bodies import ORDINARY_DISPATCH


def causal_attention(q: Tensor, k: Tensor, v: Tensor, paddings: list[Tensor], offsets: list[int],
                     scale: float | None, enable_gqa: bool) -> Tensor:  # fmt: skip
    """SDPA, causal, masked by `paddings[i][:, offsets[i] : offsets[i] + Nkv]` only where one is False."""
    return _CausalAttentionFunction.apply(q, k, v, scale, enable_gqa, offsets, *paddings)


def _attention(q, k, v, paddings, offsets, scale, enable_gqa) -> Tensor:
    mask = None
    if not all(bool(p.all()) for p in paddings):  # one host sync per call, as HF's own check has
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        for padding, offset in zip(paddings, offsets):
            mask = mask & padding[:, None, None, offset : offset + k.shape[-2]]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa
    )


@torch.library.custom_op("mst::causal_attention", mutates_args=())
def causal_attention_op(q: Tensor, k: Tensor, v: Tensor, paddings: list[Tensor], offsets: list[int],
                        scale: float | None, enable_gqa: bool) -> Tensor:  # fmt: skip
    # Contiguous: SDPA's kernels lay their output out differently, and an op's layout must be the
    # one its fake declares.
    return _attention(q, k, v, paddings, offsets, scale, enable_gqa).contiguous()


@causal_attention_op.register_fake
def _(q, k, v, paddings, offsets, scale, enable_gqa):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("mst::causal_attention_backward", mutates_args=())
def causal_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, paddings: list[Tensor],
                              offsets: list[int], scale: float | None, enable_gqa: bool) -> list[Tensor]:  # fmt: skip
    # A custom op runs with autograd's dispatch keys excluded; differentiating needs them back.
    with torch._C._ForceDispatchKeyGuard(*ORDINARY_DISPATCH), torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attention(*inputs, paddings, offsets, scale, enable_gqa)
        return [g.contiguous() for g in torch.autograd.grad(out, inputs, grad_out)]


@causal_attention_backward.register_fake
def _(grad_out, q, k, v, paddings, offsets, scale, enable_gqa):
    return [t.new_empty(t.shape) for t in (q, k, v)]


class _CausalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, enable_gqa, offsets, *paddings):
        ctx.save_for_backward(q, k, v, *paddings)
        ctx.settings = (list(offsets), scale, enable_gqa)
        return torch.ops.mst.causal_attention(q, k, v, list(paddings), list(offsets), scale, enable_gqa)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("mst: causal attention does not support double backward (create_graph=True)")
        q, k, v, *paddings = ctx.saved_tensors
        offsets, scale, enable_gqa = ctx.settings
        dq, dk, dv = torch.ops.mst.causal_attention_backward(grad_out, q, k, v, paddings, offsets, scale, enable_gqa)
        return dq, dk, dv, None, None, None, *(None for _ in paddings)
