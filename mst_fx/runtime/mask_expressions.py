"""An attention mask as an expression of its indices: built by the attention pass, evaluated here.

The attention pass reads how a model builds its (B, H, Nq, Nkv) boolean mask and writes it down as
a small expression tree of nested tuples, a function of the four index variables:

    integers   ("var", v)              v: 0 batch, 1 head, 2 query, 3 key (the mask's dims)
               ("int", n)
               ("add", a, b) / ("neg", a) / ("floordiv", a, n)
               ("read", leaf, (i0, i1, ...))   a small tensor of the graph read at index expressions
    booleans   ("bool", b)
               ("cmp", op, a, b)        op: "le", "lt", "ge", "gt", "eq", "ne"
               ("read", leaf, (...))    a boolean tensor read the same way (padding)
               ("and", a, b) / ("or", a, b) / ("not", a)

In the pass, `leaf` is the fx node of the tensor; in the string the runtime op receives
(`encode`), it is the position of that tensor in the op's `leaves` list. Every read is of a tensor
indexed by the query or by the key, never both, so no leaf is as big as the mask.

The runtime evaluates the expression over one block of the mask at a time (`evaluate`), and bounds
the keys a block of queries can reach (`key_reach`) without building the block: a window or the
chunk's own documents then cost what they mask in, not N².
"""

from __future__ import annotations

import ast
import functools
import operator

import torch
from torch import Tensor

BATCH, HEAD, QUERY, KEY = 0, 1, 2, 3

COMPARE = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt, "eq": operator.eq, "ne": operator.ne}
FLIPPED = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq", "ne": "ne"}


# ------------------------------------------------------------------------ building, with constants folded


def const(n: int) -> tuple:
    return ("int", n)


def add(a: tuple, b: tuple) -> tuple:
    if a[0] == "int" and b[0] != "int":
        a, b = b, a
    if b == ("int", 0):
        return a
    if a[0] == "int":
        return ("int", a[1] + b[1])
    if b[0] == "int" and a[0] == "add" and a[2][0] == "int":
        return add(a[1], ("int", a[2][1] + b[1]))
    return ("add", a, b)


def neg(a: tuple) -> tuple:
    if a[0] == "int":
        return ("int", -a[1])
    if a[0] == "neg":
        return a[1]
    return ("neg", a)


def floordiv(a: tuple, n: int) -> tuple:
    return ("int", a[1] // n) if a[0] == "int" else ("floordiv", a, n)


def compare(op: str, a: tuple, b: tuple) -> tuple:
    if a[0] == "int" and b[0] == "int":
        return ("bool", COMPARE[op](a[1], b[1]))
    return ("cmp", op, a, b)


def logic(op: str, a: tuple, b: tuple) -> tuple:
    """and / or, with True and False folded away."""
    absorbing, neutral = ("bool", op == "or"), ("bool", op == "and")
    if absorbing in (a, b):
        return absorbing
    if a == neutral:
        return b
    return a if b == neutral else (op, a, b)


def negate(a: tuple) -> tuple:
    return ("bool", not a[1]) if a[0] == "bool" else a[1] if a[0] == "not" else ("not", a)


def rebuild(expr: tuple, var, leaf=lambda node: node) -> tuple:
    """`expr` with every ("var", v) replaced by `var(v)` (an expression) and every leaf by
    `leaf(leaf)`, folded again."""
    kind = expr[0]
    if kind == "var":
        return var(expr[1])
    if kind in ("int", "bool"):
        return expr
    if kind == "read":
        return ("read", leaf(expr[1]), tuple(rebuild(i, var, leaf) for i in expr[2]))
    if kind == "add":
        return add(rebuild(expr[1], var, leaf), rebuild(expr[2], var, leaf))
    if kind == "neg":
        return neg(rebuild(expr[1], var, leaf))
    if kind == "floordiv":
        return floordiv(rebuild(expr[1], var, leaf), expr[2])
    if kind == "cmp":
        return compare(expr[1], rebuild(expr[2], var, leaf), rebuild(expr[3], var, leaf))
    if kind == "not":
        return negate(rebuild(expr[1], var, leaf))
    return logic(kind, rebuild(expr[1], var, leaf), rebuild(expr[2], var, leaf))


def variables(expr: tuple) -> set:
    """The index variables `expr` depends on."""
    found = set()
    rebuild(expr, lambda v: found.add(v) or ("var", v))
    return found


def reads(expr: tuple) -> list[tuple]:
    """Every ("read", leaf, indices) in `expr`, outermost first."""
    if expr[0] == "read":
        return [expr] + [r for i in expr[2] for r in reads(i)]
    return [r for part in expr[1:] if isinstance(part, tuple) and part and isinstance(part[0], str) for r in reads(part)]


def conjuncts(expr: tuple) -> list[tuple]:
    return conjuncts(expr[1]) + conjuncts(expr[2]) if expr[0] == "and" else [expr]


def encode(expr: tuple, leaves: list) -> str:
    """The string the runtime op takes: leaves by their position in `leaves`."""
    return repr(rebuild(expr, lambda v: ("var", v), leaves.index))


@functools.lru_cache(maxsize=256)
def decode(text: str) -> tuple:
    return ast.literal_eval(text)


# ------------------------------------------------------------------------ evaluating


def evaluate(expr: tuple, leaves: list[Tensor], index: dict[int, Tensor]) -> Tensor | int | bool:
    """The expression's value, with each variable v bound to `index[v]` (tensors that broadcast
    against each other: the batch, head, query and key positions of the block wanted)."""
    kind = expr[0]
    if kind == "var":
        return index[expr[1]]
    if kind in ("int", "bool"):
        return expr[1]
    if kind == "read":
        return leaves[expr[1]][tuple(evaluate(i, leaves, index) for i in expr[2])]
    if kind == "add":
        return evaluate(expr[1], leaves, index) + evaluate(expr[2], leaves, index)
    if kind == "neg":
        return -evaluate(expr[1], leaves, index)
    if kind == "floordiv":
        return evaluate(expr[1], leaves, index) // expr[2]
    if kind == "cmp":
        return COMPARE[expr[1]](evaluate(expr[2], leaves, index), evaluate(expr[3], leaves, index))
    if kind == "not":
        value = evaluate(expr[1], leaves, index)
        return ~value if isinstance(value, Tensor) else not value
    left, right = evaluate(expr[1], leaves, index), evaluate(expr[2], leaves, index)
    return left & right if kind == "and" else left | right


def block_indices(sizes: tuple[int, int], queries: range, keys: range, device) -> dict[int, Tensor]:
    """Index tensors for a (B, H, len(queries), len(keys)) block, each along its own dim."""
    batch, heads = sizes
    shapes = {BATCH: (-1, 1, 1, 1), HEAD: (1, -1, 1, 1), QUERY: (1, 1, -1, 1), KEY: (1, 1, 1, -1)}
    spans = {BATCH: range(batch), HEAD: range(heads), QUERY: queries, KEY: keys}
    return {v: torch.arange(s.start, s.stop, device=device).view(shapes[v]) for v, s in spans.items()}


def block(expr: tuple, leaves: list[Tensor], sizes: tuple[int, int], queries: range, keys: range, device) -> Tensor:
    """The mask's (B, H, len(queries), len(keys)) block (broadcast where it does not vary)."""
    value = evaluate(expr, leaves, block_indices(sizes, queries, keys, device))
    shape = (*sizes, len(queries), len(keys))
    if not isinstance(value, Tensor):
        return torch.full(shape, bool(value), device=device)
    return value.broadcast_to(torch.broadcast_shapes(value.shape, shape))


# ------------------------------------------------------------------------ which keys a block of queries reaches


def key_reach(expr: tuple, leaves: list[Tensor], sizes: tuple[int, int], queries: range, keys: int, device) -> Tensor | None:
    """A (keys,) boolean vector that is True wherever some query of `queries` may see that key (True
    in more places is allowed, never in fewer); None when every key may be seen. Costs O(len(queries)
    + keys) per term, never their product."""
    index = block_indices(sizes, queries, range(keys), device)
    reach = _reach(expr, leaves, index)
    if reach is None:
        return None
    return reach.broadcast_to(torch.broadcast_shapes(reach.shape, (1, 1, 1, keys))).reshape(-1, keys).any(0)


def _reach(expr: tuple, leaves, index) -> Tensor | None:
    """(…, keys) or scalar: where a key may be seen; None: anywhere."""
    used = variables(expr)
    if not {QUERY, KEY} <= used:  # a function of the query or of the key alone: evaluate it exactly
        value = evaluate(expr, leaves, index)
        if not isinstance(value, Tensor):
            return torch.tensor(bool(value))
        return value.any(dim=QUERY, keepdim=True) if value.dim() == 4 else value
    if expr[0] in ("and", "or"):
        left, right = _reach(expr[1], leaves, index), _reach(expr[2], leaves, index)
        if expr[0] == "and":
            return right if left is None else left if right is None else left & right
        return None if left is None or right is None else left | right
    if expr[0] == "cmp":
        return _compare_reach(expr, leaves, index)
    return None


def _compare_reach(expr: tuple, leaves, index) -> Tensor | None:
    """`f(key) op g(query)`: the keys whose f compares with some query's g."""
    _, op, left, right = expr
    if KEY in variables(right):
        op, left, right = FLIPPED[op], right, left
    if QUERY in variables(left) or KEY in variables(right):
        return None  # one side mixes query and key
    keyed, queried = evaluate(left, leaves, index), evaluate(right, leaves, index)
    if not isinstance(keyed, Tensor) or not isinstance(queried, Tensor) or op == "ne":
        return None
    keyed = keyed.broadcast_to(torch.broadcast_shapes(keyed.shape, (1, 1, 1, 1)))
    queried = queried.broadcast_to(torch.broadcast_shapes(queried.shape, (1, 1, 1, 1)))
    if op == "eq":
        return _isin_per_batch(keyed, queried)
    # The query's most permissive value, per batch and head.
    extreme = queried.amax(dim=(1, 2), keepdim=True) if op in ("le", "lt") else queried.amin(dim=(1, 2), keepdim=True)
    return COMPARE[op](keyed, extreme)


def _isin_per_batch(keyed: Tensor, queried: Tensor) -> Tensor | None:
    """keyed (B?, H?, 1, N) in the set of queried (B?, H?, c, 1) values of the same batch row; None
    (no bound) when either varies along heads."""
    if keyed.shape[1] != 1 or queried.shape[1] != 1:
        return None
    batch = max(keyed.shape[0], queried.shape[0])
    rows = [torch.isin(keyed[min(b, keyed.shape[0] - 1)].reshape(-1), queried[min(b, queried.shape[0] - 1)].reshape(-1))
            for b in range(batch)]  # fmt: skip
    return torch.stack(rows).view(batch, 1, 1, -1)
