"""An LM head's per-token cross-entropy (`reduction="none"`), chunk by chunk, with recompute.

When the loss keeps one value per token, its upstream gradient is one number per token, known only
in backward, so the gradients can't be computed in forward as for a reduced loss
(`chunked_ops.linear_cross_entropy`). Here the forward computes each chunk's logits and losses under
no_grad and keeps nothing but its inputs; the backward recomputes one chunk at a time and
differentiates it (the MLP rewrite's scheme: one more logits matmul per chunk).

    forward    for c in chunks:  loss[c] = CE(transform(x[c] W^T + b), target[c])      (no graph)
    backward   for c in chunks:  dx[c], dW_c, db_c = grad of the same, weighted by grad_loss[c]
               dW += dW_c (fp32)

Only one chunk's c x V logits exist at a time. Used eagerly, where the logits a compiled model
deferred (`deferred_logits.py`) meet `cross_entropy(..., reduction="none")`.

Those losses come back as `DeferredTokenLosses` first: litgpt's chunked loss asks for them on each
split of the logits, concatenates them and sums. Summed, they are one reduced loss after all, whose
upstream gradient is a scalar: it runs as the LM-head rewrite does (gradients in forward, three head
matmuls instead of four). Any other use computes them here, once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mst_fx.chunk_bodies import plain_linear
from mst_fx.chunked_ops import CrossEntropyForm, head_logits, refuse_double_backward
from mst_fx.dropped_logits import READABLE
from mst_fx.options import MstOptions

log = logging.getLogger(__name__)


def per_token_cross_entropy(
    rows: Tensor, params: list[Tensor | None], target: Tensor, form: CrossEntropyForm, transform: nn.Module,
    options: MstOptions,
) -> Tensor:  # fmt: skip
    """(tokens,) cross-entropy losses of `rows` (tokens, d) through the head, as F.cross_entropy
    with reduction="none" gives them (0 at ignored targets). `params`: the head's weight and bias,
    then its adapter's A and B (None when it has none), as `chunked_ops.head_logits` reads them."""
    vocab = params[0].shape[1 if form.transposed else 0]
    chunks = options.policy.chunks(rows.shape[0], rows.shape[-1], vocab, rows.device.type)

    def losses(x_c, t_c, *params):
        z = transform(head_logits(plain_linear(params), x_c, params, form))
        return F.cross_entropy(z, t_c, ignore_index=form.ignore_index, reduction="none", label_smoothing=form.label_smoothing)

    return _PerTokenFunction.apply(losses, chunks, rows, target, *params)


class _PerTokenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, losses, chunks, rows, target, *params):
        ctx.losses, ctx.chunks = losses, chunks
        ctx.autocast = _autocast_state(rows.device.type)
        ctx.save_for_backward(rows, target, *params)
        parts = [losses(rows.narrow(0, s, n), target.narrow(0, s, n), *params) for s, n in chunks]
        return torch.cat(parts) if parts else rows.new_zeros((0,))

    @staticmethod
    def backward(ctx, grad_losses):
        refuse_double_backward()
        rows, target, *params = ctx.saved_tensors
        needs_rows, needs = ctx.needs_input_grad[2], ctx.needs_input_grad[4:]
        grad_rows = torch.empty_like(rows) if needs_rows else None
        leaves = [None if p is None else p.detach().requires_grad_(need) for p, need in zip(params, needs)]
        sums = [None] * len(params)  # fp32 sums of each param's gradient over chunks
        for s, n in ctx.chunks:
            x_c = rows.narrow(0, s, n).detach().requires_grad_(needs_rows)
            with torch.enable_grad(), torch.autocast(rows.device.type, **ctx.autocast):
                out = ctx.losses(x_c, target.narrow(0, s, n), *leaves)
            wanted = [t for t, need in zip((x_c, *leaves), (needs_rows, *needs)) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_losses.narrow(0, s, n), allow_unused=True))
            if needs_rows:
                grad_rows.narrow(0, s, n).copy_(next(grads))
            for i, need in enumerate(needs):
                if need:
                    g = next(grads).float()
                    sums[i] = g if sums[i] is None else sums[i].add_(g)
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(sums, params)]
        return None, None, grad_rows, None, *grads


def _autocast_state(device_type: str) -> dict:
    """The forward's autocast state, re-entered for the recompute (as torch.utils.checkpoint does)."""
    enabled = torch.is_autocast_enabled(device_type)
    return {"enabled": enabled, "dtype": torch.get_autocast_dtype(device_type)}


class DeferredTokenLosses(Tensor):
    """Per-token losses of (rows, target) pieces through one head's loss, not computed yet.

    `loss` has `reduced(rows, target)` (its form sums) and `per_token(rows, target)`
    (`deferred_logits.HeadLoss`). `torch.cat` of several with the same loss along dim 0 stays
    deferred; `.sum()` is `loss.reduced` over every piece; anything else computes the values."""

    @staticmethod
    def __new__(cls, loss, pieces: list[tuple[Tensor, Tensor]], dtype: torch.dtype):
        count = sum(target.shape[0] for _, target in pieces)
        rows = pieces[0][0]
        self = Tensor._make_wrapper_subclass(cls, (count,), dtype=dtype, device=rows.device, requires_grad=True)
        self.loss, self.pieces, self._values = loss, pieces, None
        return self

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"DeferredTokenLosses(shape={tuple(self.shape)}, pieces={len(self.pieces)})"

    @classmethod
    @torch._dynamo.disable  # runs eagerly: inside a compiled region, Dynamo breaks the graph here
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _handle_losses(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"mst: {func} reached DeferredTokenLosses below autograd; please report this")

    def values(self) -> Tensor:
        if self._values is None:
            log.debug("mst: per-token losses used other than summed; computing them per token")
            self._values = torch.cat([self.loss.per_token(rows, target) for rows, target in self.pieces])
        return self._values


def _handle_losses(func, args, kwargs):
    if func in READABLE:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    if func is torch.cat:
        joined = _joined(*args, **kwargs)
        if joined is not None:
            return joined
    if func in (Tensor.sum, torch.sum) and len(args) == 1 and not kwargs:
        rows = torch.cat([r for r, _ in args[0].pieces])
        target = torch.cat([t for _, t in args[0].pieces])
        return args[0].loss.reduced(rows, target)
    real = torch.utils._pytree.tree_map_only(DeferredTokenLosses, DeferredTokenLosses.values, (args, kwargs))
    return func(*real[0], **real[1])


def _joined(tensors, dim=0):
    """One DeferredTokenLosses for a cat of several of the same loss, else None."""
    if dim not in (0, -1) or not tensors or not all(isinstance(t, DeferredTokenLosses) for t in tensors):
        return None
    first = tensors[0]
    if any(t.loss != first.loss for t in tensors):
        return None
    return DeferredTokenLosses(first.loss, [p for t in tensors for p in t.pieces], first.dtype)
