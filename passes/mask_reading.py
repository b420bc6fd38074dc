"""Reads how a boolean attention mask is built, as a function of (batch, head, query, key) indices.

Hugging Face builds the (B, 1, Nq, Nkv) mask from index tensors (`transformers.masking_utils`):

    q_indices = (arange(Nq) + q_offset)[None, None, :, None]
    kv_indices = (arange(Nkv) + kv_offset)[None, None, None, :]
    mask = (kv_indices <= q_indices) & (kv_indices > q_indices - window)          causal, window
           & (docs[batch_indices, q_indices] == docs[batch_indices, kv_indices])  packed documents
           & padding[batch_indices, kv_indices]                                   padding
    (chunked attention: (kv - left_pad[b]) // c == (q - left_pad[b]) // c)

(transformers 5.x broadcasts the indices like this; 4.5x maps the same functions with `torch.vmap`,
which Dynamo traces as `_add_batch_dim` / `_remove_batch_dim`). `read_mask` evaluates that graph
symbolically: every integer tensor is an expression of the index along each of its dims
(`mst_fx.runtime.mask_expressions`), every boolean one a comparison or logic of those, and a
tensor it can't read (the padding mask, the document ids: anything computed from data) is a leaf,
read at index expressions. The mask is then an exact function of its indices, provided no leaf is
read at both the query and the key position: such a leaf is itself as big as the mask, and the
mask is refused with the op that made it. `MaskForm` names the terms found (causal, window w,
chunks of c, documents, padding) for the report.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from mst_fx.runtime import mask_expressions as mx
from mst_fx.runtime.mask_expressions import BATCH, KEY, QUERY

from .graph_utils import CantChunk, example_value, shape_of


@dataclasses.dataclass(frozen=True)
class Index:
    """An integer tensor: element = `expr` of the indices along its dims, ("d", p), or a vmap
    level's, ("lvl", n), until `_remove_batch_dim` makes it a dim."""

    expr: tuple


@dataclasses.dataclass(frozen=True)
class Bool:
    expr: tuple


@dataclasses.dataclass(frozen=True)
class Leaf:
    node: fx.Node


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """What a mask is: `expr` over the variables 0..3 (batch, head, query, key), reading `leaves`."""

    expr: tuple
    leaves: tuple[fx.Node, ...]
    terms: tuple[str, ...]  # "causal", "window 1024", "chunks of 8192", "documents", "padding", ...
    padding: tuple[int, ...]  # the leaves read as padding: leaf[batch, key + offset]
    causal_otherwise: bool  # with every padding read True, the mask is exactly key <= query
    varies: tuple[bool, bool]  # whether it varies along the batch, and along the heads

    @property
    def is_causal(self) -> bool:
        """Causal and nothing else: SDPA's is_causal computes it with no mask at all."""
        return self.causal_otherwise and not self.padding

    @property
    def description(self) -> str:
        return " & ".join(self.terms) or "no masking"


def read_mask(mask: fx.Node) -> MaskForm:
    """What `mask` provably is; CantChunk saying why when it can't be read as a function of its indices."""
    value = example_value(mask)
    if value is None or value.dtype != torch.bool or value.dim() != 4:
        raise CantChunk("the attention mask is not a 4-D boolean tensor")
    batch, heads, q_len, kv_len = shape_of(mask)
    read = _as_operand(_Reader().value(mask), mask, 4)
    if not isinstance(read, Bool):
        raise CantChunk(f"the attention mask is not built from index comparisons (`{_op_name(mask)}`)")
    unknown = {v for v in mx.variables(read.expr) if v[0] != "d"}
    if unknown:
        raise CantChunk(f"the attention mask depends on indices it does not have: {sorted(unknown)}")
    expr = mx.rebuild(read.expr, lambda v: ("var", v[1]))
    for r in mx.reads(expr):
        used = set().union(*(mx.variables(i) for i in r[2]))
        if {QUERY, KEY} <= used:
            raise CantChunk(
                f"the attention mask is not built from index comparisons alone: it reads `{_op_name(r[1])}` "
                f"({r[1].name}) at both the query and the key position, a tensor as big as the mask"
            )
    leaves = tuple(dict.fromkeys(r[1] for r in mx.reads(expr)))
    used = mx.variables(expr)
    return _form(expr, leaves, batch, q_len == kv_len, (BATCH in used and batch != 1, mx.HEAD in used and heads != 1))


def mask_root(mask: fx.Node) -> fx.Node:
    """The mask before slices that keep all of it (transformers 4.5x cuts `mask[:, :, :, :Nkv]` per layer)."""
    while (
        isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target is operator.getitem
        and isinstance(mask.args[1], tuple) and shape_of(mask) == shape_of(mask.args[0])
        and all(i is Ellipsis or (isinstance(i, slice) and _whole(i, size)) for i, size in zip(mask.args[1], shape_of(mask)))
    ):  # fmt: skip
        mask = mask.args[0]
    return mask


def _op_name(node: fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.name


# ------------------------------------------------------------------------ naming the terms


def _form(expr: tuple, leaves: tuple, batch, square: bool, varies: tuple[bool, bool]) -> MaskForm:
    terms, padding, causal = [], [], 0
    for term in mx.conjuncts(expr):
        if term == ("bool", True):
            continue
        pad = _padding_leaf(term, batch)
        if pad is not None:
            terms.append("padding")
            padding.append(leaves.index(pad))
            continue
        name = _name(term)
        causal += name == "causal"
        terms.append(name)
    others = [t for t in terms if t not in ("causal", "padding")]
    causal_otherwise = square and causal == 1 and not others
    return MaskForm(expr, leaves, tuple(dict.fromkeys(terms)), tuple(dict.fromkeys(padding)), causal_otherwise, varies)


def _padding_leaf(term: tuple, batch) -> fx.Node | None:
    """`leaf[batch, key + offset]` of a boolean (B, >= Nkv) tensor: its leaf."""
    if term[0] != "read" or len(term[2]) != 2:
        return None
    row, column = term[2]
    rows_ok = row == ("var", BATCH) or (batch == 1 and row == ("int", 0))
    return term[1] if rows_ok and _affine(column)[0] == KEY else None


def _affine(expr: tuple) -> tuple:
    """(variable, offset) when `expr` is `var + offset`, `offset` or `var`; (None, None) otherwise."""
    if expr[0] == "int":
        return "const", expr[1]
    if expr[0] == "var":
        return expr[1], 0
    if expr[0] == "add" and expr[1][0] == "var" and expr[2][0] == "int":
        return expr[1][1], expr[2][1]
    return None, None


def _name(term: tuple) -> str:
    if term[0] != "cmp":
        return describe(term)
    _, op, left, right = term
    if KEY in mx.variables(right) and QUERY in mx.variables(left):
        op, left, right = mx.FLIPPED[op], right, left
    (kv, a), (q, b) = _affine(left), _affine(right)
    if kv == KEY and q == QUERY:  # kv op q + (b - a)
        delta = b - a
        bound = {"le": ("upper", delta), "lt": ("upper", delta - 1), "ge": ("lower", delta), "gt": ("lower", delta + 1)}
        side, at = bound.get(op, (None, None))
        if side == "upper" and at == 0:
            return "causal"
        if side == "lower" and at <= 0:
            return f"window {1 - at}"
    if op == "eq" and left[0] == right[0] == "floordiv" and left[2] == right[2]:
        return f"chunks of {left[2]}"
    if left[0] == right[0] == "read" and left[1] is right[1]:
        if op == "eq":
            return "documents"
        if op in ("le", "lt"):
            return "causal by position"
    return describe(term)


def describe(expr: tuple) -> str:
    """`expr` as the one line a reason or report shows."""

    def text(e) -> str:
        kind = e[0]
        if kind == "var":
            return {BATCH: "batch", mx.HEAD: "head", QUERY: "q", KEY: "kv"}.get(e[1], str(e[1]))
        if kind in ("int", "bool"):
            return str(e[1])
        if kind == "add":
            if e[2][0] == "int" and e[2][1] < 0:
                return f"{text(e[1])} - {-e[2][1]}"
            return f"{text(e[1])} + {text(e[2])}"
        if kind == "neg":
            return f"-({text(e[1])})"
        if kind == "floordiv":
            return f"({text(e[1])}) // {e[2]}"
        if kind == "read":
            return f"{e[1].name}[{', '.join(text(i) for i in e[2])}]"
        if kind == "cmp":
            symbol = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">", "eq": "==", "ne": "!="}[e[1]]
            return f"{text(e[2])} {symbol} {text(e[3])}"
        if kind == "not":
            return f"not ({text(e[1])})"
        return f"({text(e[1])} {kind} {text(e[2])})"

    return f"`{text(expr)}`"


# ------------------------------------------------------------------------ the symbolic evaluation


_COMPARE = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}  # fmt: skip
_COMPARE_METHODS = {
    **{name: name for name in ("le", "lt", "ge", "gt", "eq", "ne")},
    **{f"__{name}__": name for name in ("le", "lt", "ge", "gt", "eq", "ne")},
}
_LOGIC = {operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and", operator.iand: "and",
          operator.or_: "or", torch.logical_or: "or", torch.bitwise_or: "or", operator.ior: "or"}  # fmt: skip
_LOGIC_METHODS = {"__and__": "and", "logical_and": "and", "bitwise_and": "and", "__iand__": "and",
                  "__or__": "or", "logical_or": "or", "bitwise_or": "or", "__ior__": "or"}  # fmt: skip
_NOT = {operator.invert, operator.not_, torch.logical_not, torch.bitwise_not}
_NOT_METHODS = {"__invert__", "logical_not", "bitwise_not"}
_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "__add__", "__radd__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub}
_SUB_METHODS = {"sub", "__sub__", "__isub__"}
_FLOORDIV = {operator.floordiv, torch.floor_divide}
_FLOORDIV_METHODS = {"__floordiv__", "floor_divide"}
_INDEX = {operator.getitem, torch.ops.aten.index, torch.ops.aten.index.Tensor}


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
        rank = len(shape_of(node) or ())
        if target is torch.arange:
            return _arange(node)
        if target in _ADD or name in _ADD_METHODS:
            return _arithmetic(node, args, rank, mx.add)
        if target in _SUB or name in _SUB_METHODS:
            return _arithmetic(node, args, rank, lambda a, b: mx.add(a, mx.neg(b)))
        if target in _FLOORDIV or name in _FLOORDIV_METHODS or _is_floor_div(node, name):
            return _floordiv(node, args, rank)
        if target in _INDEX:
            return self._index(node, args, rank)
        if target in _COMPARE or name in _COMPARE_METHODS:
            return _compare(_COMPARE.get(target) or _COMPARE_METHODS[name], node, args, rank)
        if target in _LOGIC or name in _LOGIC_METHODS:
            return _logic(_LOGIC.get(target) or _LOGIC_METHODS[name], node, args, rank)
        if target in _NOT or name in _NOT_METHODS:
            value = _as_operand(args[0], node.args[0], rank)
            return Bool(mx.negate(value.expr)) if isinstance(value, Bool) else Leaf(node)
        if name in ("new_ones", "new_zeros") and node.kwargs.get("dtype") is torch.bool and shape_of(node) == ():
            return Bool(("bool", name == "new_ones"))
        if name == "to" and isinstance(args[0], (Index, Bool)) and _keeps_kind(node, args[0]):
            return args[0]
        if name in ("expand", "expand_as") and isinstance(args[0], (Index, Bool)):
            return _to_rank(args[0], node.args[0], rank)
        if name == "unsqueeze" and isinstance(args[0], (Index, Bool)) and isinstance(args[1], int):
            dim = args[1] + rank if args[1] < 0 else args[1]
            return _rename(args[0], {("d", p): ("var", ("d", p + 1 if p >= dim else p)) for p in range(rank)})
        if target is torch.diff:
            return _difference(node, self) or Leaf(node)
        if name == "cumsum" and args[0] == Bool(("bool", False)):
            return Index(("int", 0))  # a running count of no True at all
        if name == "_add_batch_dim" and isinstance(args[0], (Index, Bool)) and isinstance(args[1], int):
            return _add_batch_dim(args[0], args[1], args[2], len(shape_of(node.args[0]) or ()))
        if name == "_remove_batch_dim" and isinstance(args[0], (Index, Bool)):
            return _remove_batch_dim(args[0], args[1], args[3], example_value(node.args[0]))
        return Leaf(node)

    def _index(self, node, args, rank):
        base, index = args[0], node.args[1]
        indices = tuple(index) if isinstance(index, (tuple, list)) else (index,)
        if not any(isinstance(i, fx.Node) for i in indices):
            base = _as_operand(base, node.args[0], len(shape_of(node.args[0]) or ()))
            read = _basic_index(base, indices, shape_of(node.args[0])) if isinstance(base, (Index, Bool)) else None
            return read or Leaf(node)
        source = shape_of(node.args[0])
        values = [_as_operand(self.value(i), i, rank) for i in indices]
        if source is None or len(indices) != len(source) or not all(isinstance(v, Index) for v in values):
            return Leaf(node)
        at = {("d", p): v.expr for p, v in enumerate(values)}
        if isinstance(base, Leaf):  # a tensor of the graph read at index tensors
            kind = _leaf_kind(base.node)
            return kind(("read", base.node, tuple(at.values()))) if kind else Leaf(node)
        if isinstance(base, (Index, Bool)):  # an index tensor read at index tensors: compose them
            return type(base)(mx.rebuild(base.expr, lambda v: at.get(v, ("var", v))))
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
    return Index(mx.add(("var", ("d", 0)), ("int", start)))


def _arithmetic(node, args, rank, combine):
    if node.kwargs or len(args) != 2:  # alpha, out=: not index arithmetic
        return Leaf(node)
    a, b = (_as_operand(v, n, rank) for v, n in zip(args, node.args))
    return Index(combine(a.expr, b.expr)) if isinstance(a, Index) and isinstance(b, Index) else Leaf(node)


def _is_floor_div(node, name) -> bool:
    return (node.target is torch.div or name == "div") and node.kwargs.get("rounding_mode") == "floor"


def _floordiv(node, args, rank):
    a = _as_operand(args[0], node.args[0], rank)
    divisor = args[1] if len(args) > 1 else None
    if isinstance(a, Index) and isinstance(divisor, int) and not isinstance(divisor, bool) and divisor > 0:
        return Index(mx.floordiv(a.expr, divisor))
    return Leaf(node)


def _compare(op, node, args, rank):
    a, b = (_as_operand(v, n, rank) for v, n in zip(args[:2], node.args[:2]))
    return Bool(mx.compare(op, a.expr, b.expr)) if isinstance(a, Index) and isinstance(b, Index) else Leaf(node)


def _logic(op, node, args, rank):
    a, b = (_as_operand(v, n, rank) for v, n in zip(args[:2], node.args[:2]))
    return Bool(mx.logic(op, a.expr, b.expr)) if isinstance(a, Bool) and isinstance(b, Bool) else Leaf(node)


def _as_operand(value, node, rank: int):
    """`value` (an operand of an op whose result has `rank` dims) broadcast to that rank: a Python
    int or bool as a constant, a leaf as itself read at its own indices. None when unreadable."""
    if isinstance(value, bool):
        return Bool(("bool", value))
    if isinstance(value, int):
        return Index(("int", value))
    if isinstance(value, Leaf):
        kind = _leaf_kind(value.node)
        shape = shape_of(value.node)
        if kind is None or shape is None:
            return None
        value = kind(("read", value.node, tuple(("int", 0) if _is_one(s) else ("var", ("d", p)) for p, s in enumerate(shape))))
    if isinstance(value, (Index, Bool)):
        return _to_rank(value, node, rank)
    return None


def _leaf_kind(node: fx.Node):
    """Bool or Index for a boolean or integer tensor, None for anything else (floats are data)."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    if value.dtype == torch.bool:
        return Bool
    return None if value.dtype.is_floating_point or value.dtype.is_complex else Index


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _difference(node: fx.Node, reader: _Reader) -> Index | None:
    """`torch.diff(x, prepend=x[:, :1] - 1, dim=-1)` of an index tensor along its own last dim: 1s.
    (transformers' packed-sequence detection, on position ids that are an arange: not packed.)"""
    rank = len(shape_of(node.args[0]) or ())
    if set(node.kwargs) - {"prepend", "dim"} or len(node.args) != 1 or node.kwargs.get("dim", -1) not in (-1, rank - 1):
        return None
    x, prepend = reader.value(node.args[0]), reader.value(node.kwargs.get("prepend"))
    if not (isinstance(x, Index) and isinstance(prepend, Index)):
        return None
    (var, offset), (none, first) = _affine(x.expr), _affine(prepend.expr)
    return Index(("int", 1)) if var == ("d", rank - 1) and none == "const" and first == offset - 1 else None


def _keeps_kind(node: fx.Node, value) -> bool:
    """`.to(device)`, or a dtype cast that keeps integers integers and booleans booleans."""
    dtypes = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    out = example_value(node)
    if out is None or not dtypes:
        return out is not None
    return (out.dtype == torch.bool) == isinstance(value, Bool) and (out.dtype.is_floating_point is False)


# ------------------------------------------------------------------------ moving index variables


def _rename(value, mapping: dict):
    """`value` with each variable in `mapping` replaced by its expression there."""
    return type(value)(mx.rebuild(value.expr, lambda v: mapping.get(v, ("var", v))))


def _to_rank(value, node, rank: int):
    """`value`, a tensor of `node`'s shape, broadcast to `rank` dims (aligned on the right). A dim of
    size 1 has index 0 whatever the broadcast makes of it."""
    if not isinstance(node, fx.Node):
        return value
    shape = shape_of(node) or ()
    shift = rank - len(shape)
    return _rename(value, {("d", p): ("int", 0) if _is_one(s) else ("var", ("d", p + shift)) for p, s in enumerate(shape)})


def _basic_index(value, index: tuple, shape):
    """`x[None, :, 3:, 0]`: None, slices of step 1 and ints, which move and shift indices without
    reading values (element i of `x[a:]` is element i + a of x)."""
    if shape is None or index.count(Ellipsis) > 1:
        return None
    if not all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in index):
        return None
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - consumed) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
    mapping, old, new = {}, 0, 0
    for item in index:
        if item is None:
            new += 1
            continue
        if isinstance(item, int):
            if item < 0:
                return None
            mapping[("d", old)] = ("int", item)
        elif _whole(item, shape[old]):
            mapping[("d", old)] = ("int", 0) if _is_one(shape[old]) else ("var", ("d", new))
            new += 1
        elif isinstance(item.start or 0, int) and (item.start or 0) >= 0 and item.step in (None, 1):
            kept = len(range(shape[old])[item]) if isinstance(shape[old], int) else None
            at = ("int", 0) if kept == 1 else ("var", ("d", new))
            mapping[("d", old)] = mx.add(at, ("int", item.start or 0))
            new += 1
        else:
            return None
        old += 1
    return _rename(value, mapping)


def _whole(item: slice, size) -> bool:
    """A slice that keeps every element of a dim of `size` (`[:16]` on 16 elements, say)."""
    stop_ok = item.stop is None or (isinstance(item.stop, int) and isinstance(size, int) and item.stop >= size)
    return item.start in (None, 0) and item.step in (None, 1) and stop_ok


def _add_batch_dim(value, in_dim: int, level: int, rank: int):
    """vmap's input: dim `in_dim` becomes the level's index; the dims after it move down."""
    mapping = {("d", p): ("var", ("d", p - 1)) for p in range(in_dim + 1, rank)}
    mapping[("d", in_dim)] = ("var", ("lvl", level))
    return _rename(value, mapping)


def _remove_batch_dim(value, level: int, out_dim: int, logical):
    """vmap's output: the level's index becomes dim `out_dim` of the result."""
    rank = 0 if logical is None else logical.dim()  # the logical (per-sample) rank
    mapping = {("d", p): ("var", ("d", p + 1 if p >= out_dim else p)) for p in range(rank)}
    mapping[("lvl", level)] = ("var", ("d", out_dim))
    return _rename(value, mapping)
