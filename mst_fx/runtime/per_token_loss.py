"""An LM head's per-token cross-entropy (`reduction="none"`), chunk by chunk, with recompute.

When the loss keeps one value per token, its upstream gradient is one number per token, known only
in backward, so the gradients can't be computed in forward as for a reduced loss
(`chunked_ops.linear_cross_entropy`). It runs as a per-token site (`chunked_token_ops.py`): the
forward computes each chunk's logits and losses and keeps nothing but the rows; the backward
recomputes one chunk at a time (the MLP rewrite's scheme: one more logits matmul per chunk). Only
one chunk's c x V logits exist at a time. Used eagerly, where the logits a compiled model deferred
(`deferred_logits.py`) meet `cross_entropy(..., reduction="none")`.

Those losses come back as `DeferredTokenLosses` first: litgpt's chunked loss asks for them on each
split of the logits, concatenates them and sums. Summed, they are one reduced loss after all, whose
upstream gradient is a scalar: it runs as the LM-head rewrite does (gradients in forward, three head
matmuls instead of four). Any other use computes them here, once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .chunked_ops import CrossEntropyForm, site_group
from .chunked_token_ops import ChunkedLinearRows
from .dropped_logits import READABLE
from .site_options import SiteOptions

log = logging.getLogger(__name__)

def per_token_cross_entropy(
    rows: Tensor, params: list[Tensor | None], target: Tensor, form: CrossEntropyForm, transform: fx.GraphModule,
    options: SiteOptions,
) -> Tensor:  # fmt: skip
    """(tokens,) cross-entropy losses of `rows` (tokens, d) through the head, as F.cross_entropy
    with reduction="none" gives them (0 at ignored targets). `params`: the head's weight and bias,
    then its adapter's A and B (None when it has none), as `chunked_ops.head_logits` reads them."""
    vocab = params[0].shape[1 if form.transposed else 0]
    key = ("per-token cross_entropy", form, transform.code, rows.shape[-1], vocab, options)

    def make() -> ChunkedLinearRows:
        row_function = _cross_entropy_of_rows(transform, form)
        widths = (rows.shape[-1], vocab)
        return ChunkedLinearRows(form, row_function, (True,), (("model", ()),), (), ("model",), widths, options)

    site = site_group(options).made(key, make)  # one site per description and graph, reused every step
    (losses,) = site(rows, list(params), [target], [])
    return losses


def _cross_entropy_of_rows(transform: fx.GraphModule, form: CrossEntropyForm) -> fx.GraphModule:
    """(logits rows, target) -> (cross_entropy(transform(logits), target, reduction="none"),)."""
    graph = fx.Graph()
    logits, target = graph.placeholder("logits"), graph.placeholder("target")
    source = next(n for n in transform.graph.nodes if n.op == "placeholder")
    z = graph.graph_copy(transform.graph, {source: logits})
    options = {"ignore_index": form.ignore_index, "reduction": "none", "label_smoothing": form.label_smoothing}
    graph.output((graph.call_function(F.cross_entropy, (z, target), options),))
    return fx.GraphModule(torch.nn.Module(), graph, "RowFunction")


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
