"""Attention under any mask the attention pass could read, without the N x N mask.

What the attention pass (`passes/attention.py`) puts in place of an SDPA call whose mask it read as
an expression of its indices (`mask_expressions.py`): causal, sliding windows, chunks, documents
packed in one row, padding, and any and / or / not of those.

    for each block of `rows` queries:
        keys  = the range of keys the block can reach (bounded without building anything N x N)
        mask  = the mask's block, queries x keys, built from the expression
        out[block] = SDPA(q[block], k[keys], v[keys], attn_mask=mask)      (None where all True)

A sliding window then costs O(N·w) in memory and time, a packed row O(N · document length), and
the largest mask alive is one block's. Keys a block cannot reach are left out, which is exact
(they would add exp(-inf) = 0); a block that reaches no key at all gets zeros, as SDPA gives a
fully masked row.

Causal with padding at most (`causal_otherwise`): when every padding tensor is all True the call is
one SDPA with `is_causal=True` and no mask at all, as before; a padded batch takes the blocks.

One opaque custom op (`torch.ops.mst.masked_attention`), so it goes wherever an op can go,
activation-checkpoint bodies included. It saves only its inputs; its backward runs each block's
attention again under autograd (one more attention forward per call) and sums the keys' and
values' gradients over blocks (in fp32 for 16-bit inputs). Attention dropout is refused by the pass
for that reason: a second forward would draw another dropout mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunk_bodies import ORDINARY_DISPATCH
from .chunk_plan import ChunkPolicy
from .mask_expressions import block, decode, key_reach


def masked_attention(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], mask: str, padding: list[int],
                     causal_otherwise: bool, sizes: list[bool], policy: list[int], scale: float | None,
                     enable_gqa: bool) -> Tensor:  # fmt: skip
    """SDPA under the mask `mask` (an encoded expression reading `leaves`) in blocks of queries.

    padding: the leaves read as padding; causal_otherwise: with each of them all True the mask is
    exactly `key <= query`. sizes: whether the mask varies along (batch, heads). policy: the chunk
    policy's (rows, count), 0 for unset."""
    settings = (mask, list(padding), causal_otherwise, list(sizes), list(policy), scale, enable_gqa)
    return _MaskedAttentionFunction.apply(*_as_autocast_would(q, k, v), settings, *leaves)


def _as_autocast_would(*tensors: Tensor) -> list[Tensor]:
    """SDPA runs in autocast's lower precision; the op, opaque to autocast, gets its inputs cast as
    SDPA's would be (a model's rotated q and k are often fp32 while v is already bf16)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def _blocks(q: Tensor, k: Tensor, leaves, mask, sizes, policy):
    """(queries, keys, mask block or None) per block of queries; keys None: the block sees nothing."""
    expr, (n_q, n_k) = decode(mask), (q.shape[-2], k.shape[-2])
    mask_sizes = (q.shape[0] if sizes[0] else 1, q.shape[1] if sizes[1] else 1)
    rows = ChunkPolicy(policy[0] or None, policy[1] or None).attention_rows(n_q, n_k)
    for start in range(0, n_q, rows):
        queries = range(start, min(n_q, start + rows))
        reach = key_reach(expr, leaves, mask_sizes, queries, n_k, q.device)
        keys = _span(reach) if reach is not None else range(n_k)
        if not keys:
            yield queries, None, None
            continue
        part = block(expr, leaves, mask_sizes, queries, keys, q.device)
        seen = _span(part.flatten(0, 2).any(0))  # the keys the block really reaches
        if not seen:
            yield queries, None, None
            continue
        part = part[..., seen.start : seen.stop]
        yield queries, range(keys.start + seen.start, keys.start + seen.stop), None if bool(part.all()) else part


def _span(flags: Tensor) -> range:
    """From the first True to the last, as a range (empty when none is True)."""
    where = flags.nonzero()
    return range(int(where[0]), int(where[-1]) + 1) if len(where) else range(0)


IS_CAUSAL = "is_causal"  # a whole-tensor "block" whose mask SDPA's is_causal computes


def _plan(q, k, leaves, mask, padding, causal_otherwise, sizes, policy):
    """(queries, keys, mask block, None or IS_CAUSAL) to run: one is_causal call over everything when
    the mask is causal but for padding and no padding tensor holds a False (one host sync per
    padding tensor, as Hugging Face's own check has); the blocks otherwise."""
    if causal_otherwise and q.shape[-2] == k.shape[-2] and all(bool(leaves[i].all()) for i in padding):
        return [(range(q.shape[-2]), range(k.shape[-2]), IS_CAUSAL)]
    return _blocks(q, k, leaves, mask, sizes, policy)


def _sdpa(q, k, v, part, scale, enable_gqa) -> Tensor:
    causal = part is IS_CAUSAL
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else part, is_causal=causal, scale=scale, enable_gqa=enable_gqa
    )


def _attention(q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa) -> Tensor:
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    for queries, keys, part in _plan(q, k, leaves, mask, padding, causal_otherwise, sizes, policy):
        if keys is not None:
            rows, cols = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
            out[:, :, rows] = _sdpa(q[:, :, rows], k[:, :, cols], v[:, :, cols], part, scale, enable_gqa)
    return out


def _attention_backward(grad_out, q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa):
    wide = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k, dtype=wide), torch.zeros_like(v, dtype=wide)
    for queries, keys, part in _plan(q, k, leaves, mask, padding, causal_otherwise, sizes, policy):
        if keys is None:
            continue
        rows, cols = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
        inputs = [t.detach().requires_grad_() for t in (q[:, :, rows], k[:, :, cols], v[:, :, cols])]
        grads = torch.autograd.grad(_sdpa(*inputs, part, scale, enable_gqa), inputs, grad_out[:, :, rows])
        dq[:, :, rows] = grads[0]
        dk[:, :, cols] += grads[1]
        dv[:, :, cols] += grads[2]
    return [dq, dk.to(k.dtype), dv.to(v.dtype)]


@torch.library.custom_op("mst::masked_attention", mutates_args=())
def masked_attention_op(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], mask: str, padding: list[int],
                        causal_otherwise: bool, sizes: list[bool], policy: list[int], scale: float | None,
                        enable_gqa: bool) -> Tensor:  # fmt: skip
    # Contiguous: SDPA's kernels lay their output out differently, and an op's layout must be the
    # one its fake declares.
    with torch.no_grad():
        out = _attention(q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa)
    return out.contiguous()


@masked_attention_op.register_fake
def _(q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("mst::masked_attention_backward", mutates_args=())
def masked_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], mask: str,
                              padding: list[int], causal_otherwise: bool, sizes: list[bool], policy: list[int],
                              scale: float | None, enable_gqa: bool) -> list[Tensor]:  # fmt: skip
    # A custom op runs with autograd's dispatch keys excluded; differentiating needs them back.
    with torch._C._ForceDispatchKeyGuard(*ORDINARY_DISPATCH), torch.enable_grad():
        grads = _attention_backward(
            grad_out, q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa
        )
    return [g.contiguous() for g in grads]


@masked_attention_backward.register_fake
def _(grad_out, q, k, v, leaves, mask, padding, causal_otherwise, sizes, policy, scale, enable_gqa):
    return [t.new_empty(t.shape) for t in (q, k, v)]


class _MaskedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, settings, *leaves):
        ctx.save_for_backward(q, k, v, *leaves)
        ctx.settings = settings
        return torch.ops.mst.masked_attention(q, k, v, list(leaves), *settings)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("mst: masked attention does not support double backward (create_graph=True)")
        q, k, v, *leaves = ctx.saved_tensors
        dq, dk, dv = torch.ops.mst.masked_attention_backward(grad_out, q, k, v, leaves, *ctx.settings)
        return dq, dk, dv, None, *(None for _ in leaves)
