"""Row-wise ops on an LM head's logits, lifted into a function of one chunk of rows.

Between a head and the per-token values a graph keeps, tensors are logits, (*lead, V), or
per-token values, (*lead,) or (*lead, 1), where `lead` is the logits' leading dims (B, N) or all
tokens flat (B*N,). Within a chunk the same ops run on (c, V), (c,) and (c, 1): the "flat" form.
An op copies into flat form when it acts on trailing dims only: its dims become negative ones and
reshapes of leading dims disappear. An op that reads across tokens (a slice of tokens, a sum over
them, a cumsum along the sequence) has no flat form: `NotRowWise` names it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx

from .graph_utils import example_value, size_hint


class NotRowWise(Exception):
    """An op in the region that is not a function of each token's row alone; the message says which."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A tensor of the region: leading dims `lead` ("model": the logits' own, or "flat": (N,)) and
    trailing dims `tail`: (V,) for logits, () or (1,) for per-token values."""

    lead: str
    tail: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Frame:
    """The shapes that define the region: the logits' leading dims, token count and vocabulary."""

    lead: tuple[int, ...]
    tokens: int
    vocab: int

    def layout(self, node) -> Layout | None:
        """`node`'s layout, or None when its shape is not one row (or one value) per token."""
        value = example_value(node)
        if value is None:
            return None
        shape = tuple(size_hint(s) for s in value.shape)
        for lead, name in ((self.lead, "model"), ((self.tokens,), "flat")):
            if shape[: len(lead)] == lead and shape[len(lead) :] in ((), (1,), (self.vocab,)):
                return Layout(name, shape[len(lead) :])
        return None


# Ops that take a dim, and where it is: (position in the call's args, self first; keyword).
_DIM_OPS = {
    "softmax": 1, "log_softmax": 1, "logsumexp": 1, "sum": 1, "mean": 1, "amax": 1, "amin": 1,
    "argmax": 1, "argmin": 1, "gather": 1, "squeeze": 1, "unsqueeze": 1, "cumsum": 1, "any": 1,
    "all": 1, "prod": 1, "nansum": 1, "count_nonzero": 1, "norm": 2, "take_along_dim": 2,
}  # fmt: skip
_RESHAPES = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as"}
_LOSSES = {"cross_entropy", "nll_loss"}
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "truediv", "pow", "neg", "square", "tanh", "sigmoid", "exp", "log",
    "log1p", "expm1", "erf", "relu", "abs", "clamp", "clamp_min", "clamp_max", "clip", "sqrt",
    "rsqrt", "reciprocal", "sign", "minimum", "maximum", "fmin", "fmax", "where", "masked_fill",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "isfinite",
    "isnan", "isinf", "nan_to_num", "float", "half", "bfloat16", "double", "to", "type", "type_as",
    "detach", "logsigmoid", "log_sigmoid", "softplus", "entr", "xlogy", "exp2", "log2", "floor",
    "ceil", "round", "trunc", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__neg__", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__or__", "__invert__", "__abs__",
}  # fmt: skip


def op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_row_wise_op(node: fx.Node) -> bool:
    """An op this module may copy into flat form (whether it can depends on its dims)."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = op_name(node)
    return name in _DIM_OPS or name in _RESHAPES or name in _LOSSES or name in _ELEMENTWISE or name == "getitem"


def lift(region: list[fx.Node], start: fx.Node, inputs: list[tuple[fx.Node, Layout]], outputs: list[fx.Node], frame: Frame):
    """(the region as a flat row function, its name) with placeholders logits, then `inputs`
    (external tensors, each as a user of a given layout reads it) and the `outputs` in order."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("logits")}
    externals = {}
    for i, (node, layout) in enumerate(inputs):
        externals[(node, layout)] = graph.placeholder(f"input_{i}")
    for node in region:
        if node is start:
            continue
        layouts = {n: frame.layout(n) for n in [node, *node.all_input_nodes]}
        env[node] = _copy(graph, node, env, externals, layouts)
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), graph, "RowFunction")


def _copy(graph: fx.Graph, node: fx.Node, env, externals, layouts) -> fx.Node:
    here = layouts[node]

    def mapped(arg):
        if arg in env:
            return env[arg]
        return externals[(arg, here)]

    name = op_name(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    if name in _RESHAPES:
        return _reshape(graph, node, mapped(args[0]), layouts[args[0]], here)
    if name in _DIM_OPS:
        _translate_dim(node, args, kwargs, _DIM_OPS[name], layouts[args[0]])
    elif name in _LOSSES:
        _check_loss(node, layouts)
    elif name == "getitem":
        args[1] = _tail_index(node, layouts[args[0]])
    elif name not in _ELEMENTWISE:
        raise NotRowWise(f"'{node.name}' ({name}) is not an op the per-token rewrite knows to act on each row alone")
    new_args, new_kwargs = fx.node.map_arg((tuple(args), kwargs), mapped)
    copy = graph.create_node(node.op, node.target, new_args, new_kwargs)
    value = example_value(node)
    if value is not None and value.is_floating_point() and not value.requires_grad and _any_requires_grad(node):
        copy = graph.call_method("detach", (copy,))  # computed under no_grad, or detached, in the model
    return copy


def _any_requires_grad(node: fx.Node) -> bool:
    return any(getattr(example_value(a), "requires_grad", False) for a in node.all_input_nodes)


def _reshape(graph, node, source: fx.Node, before: Layout, after: Layout) -> fx.Node:
    """A reshape of leading dims is nothing in flat form; one between () and (1,) tails is kept."""
    if math.prod(before.tail) != math.prod(after.tail):
        raise NotRowWise(f"'{node.name}' ({op_name(node)}) mixes the vocabulary with the token dims")
    if before.tail == after.tail:
        return source
    return graph.call_method("reshape", (source, (-1, *after.tail)))


def _translate_dim(node, args: list, kwargs: dict, position: int, layout: Layout) -> None:
    """Rewrite the op's dim (or dims) in place as negative, trailing ones; NotRowWise for a dim of
    the leading (token) dims, or for a reduction over all dims."""
    ndim = len(example_value(node.args[0]).shape)
    if op_name(node) == "unsqueeze":
        ndim += 1
    if "dim" in kwargs:
        dim, put = kwargs["dim"], lambda d: kwargs.__setitem__("dim", d)
    elif len(args) > position:
        dim, put = args[position], lambda d: args.__setitem__(position, d)
    else:
        raise NotRowWise(f"'{node.name}' ({op_name(node)}) reduces over every dim, tokens included")
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or not all(isinstance(d, int) for d in dims):
        raise NotRowWise(f"'{node.name}' ({op_name(node)}) has no constant dim")
    lead = ndim - len(layout.tail) - (1 if op_name(node) == "unsqueeze" else 0)
    translated = []
    for d in dims:
        d = d % ndim
        if d < lead:
            raise NotRowWise(f"'{node.name}' ({op_name(node)}) works along a token dim (dim {d}), across rows")
        translated.append(d - ndim)
    put(type(dim)(translated) if isinstance(dim, (tuple, list)) else translated[0])


def _check_loss(node: fx.Node, layouts) -> None:
    """cross_entropy / nll_loss per token: classes last on 2-D input, nothing reduced."""
    import inspect

    import torch.nn.functional as F

    signature = inspect.signature(F.cross_entropy if op_name(node) == "cross_entropy" else F.nll_loss)
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["reduction"] != "none" or a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None:
        raise NotRowWise(f"'{node.name}' ({op_name(node)}) reduces over tokens (reduction={a['reduction']!r})")
    if len(example_value(a["input"]).shape) != 2:
        raise NotRowWise(f"'{node.name}' ({op_name(node)}) reads classes at dim 1 of 3-D logits")


def _tail_index(node: fx.Node, layout: Layout):
    """`x[..., i]`-style indexing of trailing dims, as an index that starts with an Ellipsis."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, fx.Node) for i in index):
        raise NotRowWise(f"'{node.name}' (getitem) indexes with a tensor")
    lead = len(example_value(node.args[0]).shape) - len(layout.tail)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        before, after = index[:at], index[at + 1 :]
        if all(i == slice(None) for i in before) and sum(i is not None for i in after) <= len(layout.tail):
            return (Ellipsis, *after)
    elif all(i == slice(None) for i in index[:lead]):
        return (Ellipsis, *index[lead:])
    raise NotRowWise(f"'{node.name}' (getitem) selects tokens, not a part of each row")


def is_reduction_of_vocab(node: fx.Node) -> bool:
    """An op that takes a row of logits to a few values (or normalises it): what makes a head's
    logits worth a per-token site."""
    return node.op in ("call_function", "call_method") and op_name(node) in {
        "log_softmax", "softmax", "logsumexp", "gather", "take_along_dim", "argmax", "cross_entropy", "nll_loss",
    }  # fmt: skip

