"""Moves of dims that undo each other, taken out of the graph.

A loss written for classes at dim 1 and called on (B, N, V) logits moves the vocabulary there and
back: x-transformers' `cross_entropy(rearrange(logits, 'b n c -> b c n'), ...)` permutes to
(B, V, N), then `torch_einops_utils.cross_entropy` moves it back with `movedim(z, 1, -1)`. Between
the two the tensor is not one row per token, so a row-wise rewrite would stop there. The chain
computes its input (as a view), so its last node's readers can read the input instead:

    tensor_8 = logits_1.permute([0, 2, 1])          # (1, 512, 128)
    logits_2 = torch.movedim(tensor_8, 1, -1)       # (1, 128, 512): logits_1's layout again
    z_target = logits_2.gather(-1, index)           # reads logits_1 after this pass
"""

from __future__ import annotations

from torch import fx

from .graph_utils import shape_of
from .row_function import op_name

_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}


def fold_identity_moves(start: fx.Node) -> int:
    """Replace every chain of single-reader moves after `start` (or after a node downstream of it
    that keeps its last dim) that composes to the identity by its input; the count of chains folded."""
    width = (shape_of(start) or (None,))[-1]
    folded, todo, seen = 0, [start], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in list(node.users):
            end = _identity_chain_end(node, user)
            if end is not None:
                end.replace_all_uses_with(node)
                _erase_chain(end, node)
                folded += 1
        todo.extend(u for u in node.users if (shape_of(u) or (None,))[-1] == width)  # rows of the head's width
    return folded


def _erase_chain(end: fx.Node, source: fx.Node) -> None:
    while end is not source and not end.users:
        previous = end.args[0]
        end.graph.erase_node(end)
        end = previous


def _identity_chain_end(source: fx.Node, first: fx.Node) -> fx.Node | None:
    """The last node of the chain of moves from `first` on that puts `source`'s dims back in
    their order, or None. Every move but the last must have no reader but the next move."""
    ndim = len(shape_of(source) or ())
    order, node = list(range(ndim)), first
    while ndim and node.args and node.args[0] is not None:
        permutation = move_permutation(node, ndim)
        if permutation is None:
            return None
        order = [order[p] for p in permutation]
        if order == list(range(ndim)):
            return node
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
    return None


def move_permutation(node: fx.Node, ndim: int) -> list[int] | None:
    """`node` as a permutation of its input's `ndim` dims (output dim i is input dim p[i]), for
    permute / transpose / movedim with constant dims; None for anything else."""
    if node.op not in ("call_function", "call_method") or op_name(node) not in _MOVES or node.kwargs:
        return None
    name, dims = op_name(node), node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    flat = [d for part in dims for d in (part if isinstance(part, (tuple, list)) else (part,))]
    if not all(isinstance(d, int) for d in flat):
        return None
    if name == "permute":
        return [d % ndim for d in dims] if sorted(d % ndim for d in dims) == list(range(ndim)) else None
    if name in ("transpose", "swapaxes", "swapdims") and len(dims) == 2:
        a, b = (d % ndim for d in dims)
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
        return order
    if name in ("movedim", "moveaxis") and len(dims) == 2:
        source, destination = ((d,) if isinstance(d, int) else tuple(d) for d in dims)
        return _movedim(tuple(s % ndim for s in source), tuple(d % ndim for d in destination), ndim)
    return None


def _movedim(source: tuple[int, ...], destination: tuple[int, ...], ndim: int) -> list[int] | None:
    if len(source) != len(destination) or len(set(source)) != len(source) or len(set(destination)) != len(destination):
        return None
    order: list[int | None] = [None] * ndim
    for s, d in zip(source, destination):
        order[d] = s
    rest = iter(i for i in range(ndim) if i not in source)
    return [next(rest) if o is None else o for o in order]
