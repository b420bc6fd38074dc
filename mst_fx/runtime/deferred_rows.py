"""Row-wise ops and per-token reductions on `DeferredLogits`: post-training code outside the graph.

RL and preference trainers take the logits out of the model and compute, eagerly, per-token
log-probs (`log_softmax(z).gather(-1, y)`, `z.gather(-1, y) - logsumexp(z)`) and entropies
(`-(exp(log_softmax(z)) * log_softmax(z)).sum(-1)`), often in a loop over rows or chunks. On
deferred logits those run without the N x V logits:

* a row-wise op (softmax, log_softmax, exp, log, ... over the last dim, with numbers) is one more
  op of the head's transform, and so is an elementwise op between two deferred logits of the same
  rows (`exp(logps) * logps`): the result stays deferred;
* a reduction of each row (sum, mean, logsumexp, amax, argmax over the last dim; gather along it)
  runs chunked now, as a per-token site (`chunked_token_ops.ChunkedLinearRows`): its forward keeps
  only the rows, its backward recomputes each chunk's logits.

Each reduction is its own pass over the chunks (one more head matmul, forward and backward); in one
compiled graph several share one pass (`passes/token_head.py`).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .chunk_bodies import autocast
from .chunked_ops import site_group
from .chunked_token_ops import ChunkedLinearRows

_NORMALIZERS = {torch.softmax, torch.log_softmax, Tensor.softmax, Tensor.log_softmax, F.softmax, F.log_softmax}
_UNARY = {
    torch.exp, Tensor.exp, torch.log, Tensor.log, torch.neg, Tensor.neg, Tensor.__neg__, torch.sigmoid,
    Tensor.sigmoid, torch.clamp, Tensor.clamp, Tensor.clamp_min, Tensor.__sub__, Tensor.__rsub__,
    Tensor.__add__, Tensor.__radd__, Tensor.sub, Tensor.add, torch.sub, torch.add, Tensor.__pow__, Tensor.pow,
    Tensor.square, torch.square, Tensor.__rtruediv__,
}  # fmt: skip
_BINARY = {
    Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul, Tensor.__add__, Tensor.add, torch.add,
    Tensor.__sub__, Tensor.sub, torch.sub, Tensor.__truediv__, Tensor.div, torch.div,
}  # fmt: skip
# reductions of each row: op -> position of its dim argument, counting the tensor
_REDUCTIONS = {
    torch.sum: 1, Tensor.sum: 1, torch.mean: 1, Tensor.mean: 1, torch.logsumexp: 1, Tensor.logsumexp: 1,
    torch.amax: 1, Tensor.amax: 1, torch.argmax: 1, Tensor.argmax: 1, torch.gather: 1, Tensor.gather: 1,
}  # fmt: skip


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim % ndim == ndim - 1


def _numbers_only(values) -> bool:
    return all(isinstance(v, (numbers.Real, torch.dtype)) or v is None for v in values)


def row_wise(func, deferred, rest, kwargs):
    """softmax/log_softmax over the last dim, or an elementwise op with numbers: (func, args) for
    the head's transform, or NotImplemented."""
    if deferred.class_dim != -1:
        return NotImplemented
    if func in _NORMALIZERS:
        dim = kwargs.get("dim", rest[0] if rest else None)
        if not _last_dim(dim, deferred.dim()) or not _numbers_only([*rest[1:], *(v for k, v in kwargs.items() if k != "dim")]):
            return NotImplemented
        return func, (-1, *rest[1:]), {k: v for k, v in kwargs.items() if k != "dim"}
    if func in _UNARY and _numbers_only([*rest, *kwargs.values()]):
        return func, tuple(rest), dict(kwargs)
    return NotImplemented


def combined(func, deferred, rest, kwargs):
    """`a * b` (+, -, /) of two deferred logits of the same rows and head: one transform computing both."""
    if func not in _BINARY or kwargs or len(rest) != 1 or deferred.class_dim != -1:
        return NotImplemented
    other = rest[0]
    same = getattr(other, "rows", None) is deferred.rows and getattr(other, "class_dim", None) == -1
    if not same or len(other.head.params) != len(deferred.head.params):
        return NotImplemented
    if any(a is not b for a, b in zip(other.head.params, deferred.head.params)):
        return NotImplemented
    graph = fx.Graph()
    logits = graph.placeholder("logits")
    left = graph.graph_copy(deferred.head.transform.graph, {_placeholder(deferred.head.transform): logits})
    right = graph.graph_copy(other.head.transform.graph, {_placeholder(other.head.transform): logits})
    graph.output(graph.call_function(func, (left, right)))
    return fx.GraphModule(torch.nn.Module(), graph, "LogitTransform")


def _placeholder(module: fx.GraphModule) -> fx.Node:
    return next(n for n in module.graph.nodes if n.op == "placeholder")


def per_token(func, deferred, rest, kwargs):
    """A reduction of each row of the logits, computed now, chunked: the per-token tensor, or NotImplemented."""
    if func not in _REDUCTIONS or deferred.class_dim != -1:
        return NotImplemented
    args = [deferred, *rest]
    position = _REDUCTIONS[func]
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if not _last_dim(dim, deferred.dim()):
        return NotImplemented
    index = None
    if func in (torch.gather, Tensor.gather):
        index = kwargs.get("index", args[2] if len(args) > 2 else None)
        if not isinstance(index, Tensor) or index.shape != (*deferred.shape[:-1], 1) or type(index) is not Tensor:
            return NotImplemented
        options = {}
    else:
        options = {k: v for k, v in kwargs.items() if k != "dim"}
        extra = args[position + 1 :]
        if not _numbers_only([*extra, *options.values()]):
            return NotImplemented
        options.update(zip(_EXTRA_NAMES.get(_name(func), ()), extra))
    return _reduce(deferred, func, index, options)


_EXTRA_NAMES = {"sum": ("keepdim", "dtype"), "mean": ("keepdim", "dtype"), "logsumexp": ("keepdim",),
                "amax": ("keepdim",), "argmax": ("keepdim",)}  # fmt: skip


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _reduce(deferred, func, index: Tensor | None, options: dict) -> Tensor:
    head = deferred.head
    row_function = _row_function(head.transform, _name(func), index is not None, options)
    differentiable = _name(func) != "argmax"
    token_specs = (("model", (1,)),) if index is not None else ()
    width = deferred.rows.shape[-1]
    key = ("rows", row_function.code, differentiable, token_specs, head.transposed, head.adapter, head.options, width, head.vocab)
    make = lambda: ChunkedLinearRows(  # noqa: E731
        head.form("none", -100, 0.0), row_function, (differentiable,), token_specs, (), ("model",), (width, head.vocab),
        head.options,
    )  # fmt: skip
    site = site_group(head.options).made(key, make)
    params = list(head.params)
    with autocast(deferred.rows.device.type, head.autocast_dtype):
        (out,) = site(deferred.rows, params, [] if index is None else [index], [])
    return out


def _row_function(transform: fx.GraphModule, name: str, gathers: bool, options: dict) -> fx.GraphModule:
    """(logits rows, [index]) -> (the reduction of each transformed row,)."""
    graph = fx.Graph()
    logits = graph.placeholder("logits")
    index = graph.placeholder("index") if gathers else None
    z = graph.graph_copy(transform.graph, {_placeholder(transform): logits})
    if gathers:
        out = graph.call_method("gather", (z, -1, index))
    else:
        out = graph.call_method(name, (z, -1), options)
    graph.output((out,))
    return fx.GraphModule(torch.nn.Module(), graph, "RowFunction")
