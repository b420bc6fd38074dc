"""Reads how a boolean attention mask is built, to prove what it is: causal, and padding at most.

Hugging Face builds the (B, 1, Nq, Nkv) mask from index tensors (`transformers.masking_utils`):

    q_indices = (arange(Nq) + q_offset)[None, None, :, None]
    kv_indices = (arange(Nkv) + kv_offset)[None, None, None, :]
    mask = ones((), bool) & (kv_indices <= q_indices) & padding[batch_indices, kv_indices]

(transformers 5.x broadcasts the indices like this; 4.5x maps the same functions with `torch.vmap`,
which Dynamo traces as `_add_batch_dim` / `_remove_batch_dim`). `read_mask` evaluates that graph
symbolically: every integer tensor is an affine function `index of a dim + offset`, every boolean
one an expression over those, and a tensor it can't read (the padding mask, say) is an opaque leaf
that may only be indexed. The mask is then a conjunction of terms, and it is causal-with-padding
when exactly one term is `kv <= q` with equal offsets and every other term reads a boolean leaf at
`[batch, kv]`. Any other term (a sliding window, packed sequences, a custom mask function) or any op
it can't read makes it say why, and the pass leaves that mask alone.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from .graph_utils import CantChunk, example_value, shape_of

# An index variable: ("d", p) the index along the tensor's own dim p; ("lvl", n) the index a vmap
# level n stands for, until `_remove_batch_dim` turns it into a dim.
Var = tuple


@dataclasses.dataclass(frozen=True)
class Affine:
    """An integer tensor whose element is `index along var + offset` (var None: a constant)."""

    var: Var | None
    offset: int


# Boolean expressions: ("const", b) | ("cmp", op, Affine, Affine) | ("pad", leaf node, Affine, Affine)
# | ("and", e, e) | ("or", e, e) | ("not", e).
@dataclasses.dataclass(frozen=True)
class Bool:
    expr: tuple


@dataclasses.dataclass(frozen=True)
class Leaf:
    node: fx.Node


@dataclasses.dataclass(frozen=True)
class Padding:
    """`leaf[b, kv + offset]`: a boolean (B, >= Nkv + offset) tensor in the graph."""

    leaf: fx.Node
    kv_offset: int


@dataclasses.dataclass(frozen=True)
class CausalMask:
    """The mask is `kv <= q` (top-left aligned, as SDPA's is_causal) and every padding term."""

    padding: tuple[Padding, ...]


def read_mask(mask: fx.Node) -> CausalMask:
    """What `mask` provably is; CantChunk saying why when it is not causal (with padding) or unreadable."""
    value = example_value(mask)
    if value is None or value.dtype != torch.bool or value.dim() != 4:
        raise CantChunk("the attention mask is not a 4-D boolean tensor")
    batch, _, q_len, kv_len = shape_of(mask)
    if q_len != kv_len:
        raise CantChunk(f"the mask is {q_len} x {kv_len}, not square: SDPA's is_causal would align it differently")
    read = _Reader().value(mask)
    if not isinstance(read, Bool):
        raise CantChunk("the attention mask is not built from index comparisons")
    terms = [t for t in _conjuncts(read.expr) if t != ("const", True)]
    causal = [t for t in terms if _is_causal(t)]
    padding = [_padding(t, batch) for t in terms if not _is_causal(t)]
    if len(causal) != 1:
        raise CantChunk("no `kv <= q` term with equal offsets: the mask is not causal")
    if None in padding:
        other = next(t for t in terms if not _is_causal(t) and _padding(t, batch) is None)
        raise CantChunk(f"the mask has a term other than causal and padding: {_describe(other)}")
    return CausalMask(tuple(padding))


def mask_root(mask: fx.Node) -> fx.Node:
    """The mask before slices that keep all of it (transformers 4.5x cuts `mask[:, :, :, :Nkv]` per layer)."""
    while (
        isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target is operator.getitem
        and isinstance(mask.args[1], tuple) and shape_of(mask) == shape_of(mask.args[0])
        and all(i is Ellipsis or (isinstance(i, slice) and _whole(i, size)) for i, size in zip(mask.args[1], shape_of(mask)))
    ):  # fmt: skip
        mask = mask.args[0]
    return mask


def _conjuncts(expr: tuple) -> list[tuple]:
    if expr[0] == "and":
        return _conjuncts(expr[1]) + _conjuncts(expr[2])
    return [expr]


_Q, _KV = ("d", 2), ("d", 3)


def _is_causal(term: tuple) -> bool:
    if term[0] != "cmp":
        return False
    _, op, left, right = term
    if op in ("ge", "gt"):
        op, left, right = {"ge": "le", "gt": "lt"}[op], right, left
    return op == "le" and left.var == _KV and right.var == _Q and left.offset == right.offset


def _padding(term: tuple, batch) -> Padding | None:
    if term[0] != "pad":
        return None
    _, leaf, row, column = term
    rows_ok = row == Affine(("d", 0), 0) or (batch == 1 and row == Affine(None, 0))
    leaf_value = example_value(leaf)
    if not rows_ok or column.var != _KV or leaf_value is None or leaf_value.dtype != torch.bool:
        return None
    if leaf_value.dim() != 2 or not isinstance(column.offset, int):
        return None
    return Padding(leaf, column.offset)


def _describe(expr: tuple) -> str:
    def affine(a: Affine) -> str:
        name = {None: "", _Q: "q", _KV: "kv", ("d", 0): "batch", ("d", 1): "head"}.get(a.var, str(a.var))
        return f"{name} {'+' if a.offset >= 0 else '-'} {abs(a.offset)}" if a.offset and name else name or str(a.offset)

    kind = expr[0]
    if kind == "cmp":
        symbol = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">", "eq": "==", "ne": "!="}[expr[1]]
        return f"`{affine(expr[2])} {symbol} {affine(expr[3])}`"
    if kind == "pad":
        return f"`{expr[1].name}[{affine(expr[2])}, {affine(expr[3])}]`"
    if kind in ("and", "or"):
        return f"({_describe(expr[1])} {kind} {_describe(expr[2])})"
    if kind == "not":
        return f"not {_describe(expr[1])}"
    return str(expr[1])


# ------------------------------------------------------------------------ the symbolic evaluation


_COMPARE = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}  # fmt: skip
_COMPARE_METHODS = {
    **{name: name for name in ("le", "lt", "ge", "gt", "eq", "ne")},
    **{f"__{name}__": name for name in ("le", "lt", "ge", "gt", "eq", "ne")},
}
_LOGIC = {operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
          operator.or_: "or", torch.logical_or: "or", torch.bitwise_or: "or"}  # fmt: skip
_LOGIC_METHODS = {"__and__": "and", "logical_and": "and", "bitwise_and": "and", "__iand__": "and",
                  "__or__": "or", "logical_or": "or", "bitwise_or": "or", "__ior__": "or"}  # fmt: skip
_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "__add__", "__radd__", "__iadd__"}
_COMPARE_OPERATORS = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt,
                      "eq": operator.eq, "ne": operator.ne}  # fmt: skip
_SUB = {operator.sub, operator.isub, torch.sub}
_SUB_METHODS = {"sub", "__sub__", "__isub__"}
_INDEX = {operator.getitem, torch.ops.aten.index, torch.ops.aten.index.Tensor}
_ADD_BATCH_DIM = {"_add_batch_dim"}
_REMOVE_BATCH_DIM = {"_remove_batch_dim"}


class _Reader:
    def __init__(self):
        self.memo: dict[fx.Node, object] = {}

    def value(self, node):
        if not isinstance(node, fx.Node):
            return node
        if node not in self.memo:
            self.memo[node] = self._read(node)
        return self.memo[node]

    def _read(self, node: fx.Node):
        if node.op not in ("call_function", "call_method"):
            return Leaf(node)
        target, name = node.target, node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        args = [self.value(a) for a in node.args]
        if target is torch.arange:
            return _arange(node)
        if target in _ADD or name in _ADD_METHODS:
            return _add(args, node)
        if (target in _SUB or name in _SUB_METHODS) and len(args) == 2 and isinstance(args[1], int):
            return _add([args[0], -args[1]], node)
        if target in _INDEX:
            return self._index(node, args)
        if target in _COMPARE or name in _COMPARE_METHODS:
            op = _COMPARE.get(target) or _COMPARE_METHODS[name]
            return self._compare(op, args, node)
        if target in _LOGIC or name in _LOGIC_METHODS:
            return self._logic(_LOGIC.get(target) or _LOGIC_METHODS[name], args, node)
        if name in ("new_ones", "new_zeros") and node.kwargs.get("dtype") is torch.bool:
            return _constant(name == "new_ones", node)
        if name == "to" and isinstance(args[0], (Affine, Bool)) and _keeps_kind(node, args[0]):
            return args[0]
        if name in ("expand", "expand_as") and isinstance(args[0], (Affine, Bool)):
            return _broadcast(args[0], node.args[0], node)
        if name == "unsqueeze" and isinstance(args[0], (Affine, Bool)) and isinstance(args[1], int):
            return _unsqueeze(args[0], args[1], len(shape_of(node) or ()))
        if target is torch.diff:
            return _difference(node, self) or Leaf(node)
        if name == "cumsum" and args[0] == Bool(("const", False)):
            return Affine(None, 0)  # a running count of no True at all
        if name in _ADD_BATCH_DIM and isinstance(args[0], Affine) and args[1] == 0:
            return _rename(args[0], {("d", 0): ("lvl", args[2])})
        if name in _REMOVE_BATCH_DIM and isinstance(args[0], (Affine, Bool)):
            return _remove_batch_dim(args[0], args[1], args[3], example_value(node.args[0]))
        return Leaf(node)

    def _index(self, node, args):
        base, index = args[0], node.args[1]
        indices = index if isinstance(index, (tuple, list)) else (index,)
        if not any(isinstance(i, fx.Node) for i in indices):
            read = _basic_index(base, indices, shape_of(node.args[0])) if isinstance(base, (Affine, Bool)) else None
            return read or Leaf(node)
        values = [self.value(i) for i in indices]
        if len(indices) != 2 or not all(isinstance(v, Affine) for v in values):
            return Leaf(node)
        rank = len(shape_of(node) or ())
        row, column = (_to_rank(v, i, rank) for v, i in zip(values, indices))
        if isinstance(base, Leaf):  # a tensor read at [row, column]: a padding mask, if boolean
            return Bool(("pad", base.node, row, column))
        if isinstance(base, Affine):  # an index tensor read at index tensors: compose the affines
            picked = {None: Affine(None, 0), ("d", 0): row, ("d", 1): column}.get(base.var)
            return Leaf(node) if picked is None else Affine(picked.var, picked.offset + base.offset)
        return Leaf(node)

    def _compare(self, op, args, node):
        left, right = args[0], args[1]
        if isinstance(left, Affine) and left.var is None and isinstance(right, (Affine, int)):
            other = right.offset if isinstance(right, Affine) and right.var is None else right
            if isinstance(other, int) and isinstance(left.offset, int):
                return Bool(("const", _COMPARE_OPERATORS[op](left.offset, other)))
        if isinstance(left, Affine) and isinstance(right, (Affine, int)):
            rank = len(shape_of(node) or ())
            left = _to_rank(left, node.args[0], rank)
            right = _to_rank(right, node.args[1], rank) if isinstance(right, Affine) else Affine(None, right)
            return Bool(("cmp", op, left, right))
        return Leaf(node)

    def _logic(self, op, args, node):
        left, right = args[0], args[1]
        if isinstance(left, Bool) and isinstance(right, Bool):
            rank = len(shape_of(node) or ())
            left, right = _to_rank(left, node.args[0], rank), _to_rank(right, node.args[1], rank)
            return Bool((op, left.expr, right.expr))
        return Leaf(node)


def _arange(node: fx.Node):
    bounds = [a for a in node.args if not isinstance(a, torch.dtype)]
    if len(bounds) == 1:
        start = 0
    elif len(bounds) == 2 and isinstance(bounds[0], int):
        start = bounds[0]
    else:
        return Leaf(node)
    if node.kwargs.get("dtype", torch.int64) not in (torch.int64, torch.int32):
        return Leaf(node)
    return Affine(("d", 0), start)


def _add(args, node):
    a, b = args[0], args[1] if len(args) > 1 else node.kwargs.get("other")
    if isinstance(b, Affine) and isinstance(a, int):
        a, b = b, a
    if isinstance(a, Affine) and isinstance(b, int) and not isinstance(b, bool) and "alpha" not in node.kwargs:
        return Affine(a.var, a.offset + b)
    return Leaf(node)


def _difference(node: fx.Node, reader: _Reader) -> Affine | None:
    """`torch.diff(x, prepend=x[:, :1] - 1, dim=-1)` of an index tensor along its own last dim: 1s.
    (transformers' packed-sequence detection, on position ids that are an arange: not packed.)"""
    x = reader.value(node.args[0])
    prepend = reader.value(node.kwargs.get("prepend"))
    rank = len(shape_of(node.args[0]) or ())
    if set(node.kwargs) - {"prepend", "dim"} or len(node.args) != 1 or node.kwargs.get("dim", -1) not in (-1, rank - 1):
        return None
    if not (isinstance(x, Affine) and x.var == ("d", rank - 1) and isinstance(prepend, Affine)):
        return None
    return Affine(None, 1) if prepend.var is None and prepend.offset == x.offset - 1 else None


def _unsqueeze(value, dim: int, rank: int):
    dim = dim + rank if dim < 0 else dim
    return _rename(value, {("d", p): ("d", p + 1 if p >= dim else p) for p in range(rank)})


def _constant(value: bool, node):
    return Bool(("const", value)) if shape_of(node) == () else Leaf(node)


def _keeps_kind(node: fx.Node, value) -> bool:
    """`.to(device)`, or a dtype cast that keeps integers integers and booleans booleans."""
    dtypes = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    out = example_value(node)
    if out is None or not dtypes:
        return out is not None
    return (out.dtype == torch.bool) == isinstance(value, Bool) and (out.dtype.is_floating_point is False)


# ------------------------------------------------------------------------ moving index variables


def _rename(value, mapping: dict):
    """`value` with its index variables renamed (to another Var, or to a constant 0)."""
    if isinstance(value, Affine):
        if value.var in mapping:
            new = mapping[value.var]
            return Affine(None, value.offset) if new == 0 else Affine(new, value.offset)
        return value
    if isinstance(value, Bool):
        return Bool(_rename_expr(value.expr, mapping))
    return value


def _rename_expr(expr: tuple, mapping: dict) -> tuple:
    kind = expr[0]
    if kind == "cmp":
        return ("cmp", expr[1], _rename(expr[2], mapping), _rename(expr[3], mapping))
    if kind == "pad":
        return ("pad", expr[1], _rename(expr[2], mapping), _rename(expr[3], mapping))
    if kind in ("and", "or"):
        return (kind, _rename_expr(expr[1], mapping), _rename_expr(expr[2], mapping))
    if kind == "not":
        return ("not", _rename_expr(expr[1], mapping))
    return expr


def _to_rank(value, node, rank: int):
    """`value`, a tensor of `node`'s shape, broadcast to `rank` dims (aligned on the right). A dim of
    size 1 has index 0 whatever the broadcast makes of it."""
    if isinstance(value, int) or not isinstance(node, fx.Node):
        return value
    shape = shape_of(node) or ()
    shift = rank - len(shape)
    mapping = {("d", p): (0 if size == 1 else ("d", p + shift)) for p, size in enumerate(shape)}
    return _rename(value, mapping)


def _broadcast(value, source: fx.Node, node: fx.Node):
    return _to_rank(value, source, len(shape_of(node) or ()))


def _basic_index(value, index: tuple, shape):
    """`x[None, :, ...]`: only None, full slices and Ellipsis, which move dims without reading values."""
    if shape is None or index.count(Ellipsis) > 1:
        return None
    if not all(i is None or i is Ellipsis or isinstance(i, slice) for i in index):
        return None
    index = tuple(index)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - consumed) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
    mapping, old, shift = {}, 0, 0
    for new, item in enumerate(index):
        if item is not None:
            if not _whole(item, shape[old]):
                # A part of a dim: only an index tensor's own dim, from a known start (its values shift).
                if not (isinstance(value, Affine) and value.var == ("d", old) and _plain(item)):
                    return None
                shift = item.start or 0
            kept = len(range(shape[old])[item]) if isinstance(shape[old], int) else shape[old]
            mapping[("d", old)] = 0 if kept == 1 else ("d", new)
            old += 1
    read = _rename(value, mapping)
    return Affine(read.var, read.offset + shift) if shift else read


def _plain(item: slice) -> bool:
    return isinstance(item.start or 0, int) and item.step in (None, 1)


def _whole(item: slice, size) -> bool:
    """A slice that keeps every element of a dim of `size` (`[:16]` on 16 elements, say)."""
    stop_ok = item.stop is None or (isinstance(item.stop, int) and isinstance(size, int) and item.stop >= size)
    return item.start in (None, 0) and item.step in (None, 1) and stop_ok


def _remove_batch_dim(value, level: int, out_dim: int, logical):
    """vmap's output: the level's index becomes dim `out_dim` of the result."""
    rank = 0 if logical is None else logical.dim()  # the logical (per-sample) rank
    mapping = {("d", p): ("d", p + 1 if p >= out_dim else p) for p in range(rank)}
    mapping[("lvl", level)] = ("d", out_dim)
    return _rename(value, mapping)
