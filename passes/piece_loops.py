"""Loops over pieces of the logits, fused back: the same ops on each piece of a tensor along dim 0,
rejoined along dim 0, are those ops on the whole tensor.

RL code loops over the logits by hand to bound its memory: TRL computes
`torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])` one sequence at a time, takes
`zip(logits, index)` row by row in bf16, and `torch.cat([f(c) for c in flat.split(128)])` for the
entropy. Dynamo unrolls each loop:

    lg = logits[0];  lg_1 = logits[1];  ...
    logsumexp = torch.logsumexp(lg, dim=-1);  logsumexp_1 = torch.logsumexp(lg_1, dim=-1);  ...
    stack = torch.stack([logsumexp, logsumexp_1, ...])

`fuse_piece_loop(gm, source)` turns that into `stack = torch.logsumexp(logits, dim=-1)` when every
piece runs the same ops, each other tensor being shared or taken piece by piece in the same way
(`index[i]` beside `logits[i]`). The per-token pass then sees one row-wise op on the logits, and
chunks them its own way. Nothing changes when the pieces differ in any op or argument.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_utils import erase_unused, example_value, grad_enabled_at, is_call, propagate_example_values, size_hint

_SPLITS = {torch.split, torch.chunk}
_SPLIT_METHODS = ("split", "chunk")


def fuse_piece_loop(gm: fx.GraphModule, source: fx.Node) -> bool:
    """Fuse one loop over pieces of `source` along dim 0, if there is one; whether the graph changed."""
    for kind, pieces in _piece_sets(source):
        rejoin = _rejoin(kind, pieces)
        if rejoin is None:
            continue
        mapping = _same_ops_on_every_piece(rejoin, pieces)
        if mapping is not None and _fuse(gm, kind, source, pieces, rejoin, mapping):
            return True
    return False


def _piece_sets(source: fx.Node) -> list[tuple[str, list[fx.Node]]]:
    """("unbind", [source[0], ..., source[B-1]]) and ("split", the getitems of one split along dim 0)."""
    found, value = [], example_value(source)
    if value is None or value.dim() < 2:
        return found
    by_index = {}
    for user in source.users:
        index = _int_index(user)
        if index is not None:
            by_index.setdefault(index, user)
    if sorted(by_index) == list(range(size_hint(value.shape[0]))):
        found.append(("unbind", [by_index[i] for i in sorted(by_index)]))
    for user in source.users:
        if _splits_rows(user):
            pieces = {_int_index(u): u for u in user.users}
            count = len(user.meta.get("example_value", ()))
            if None not in pieces and sorted(pieces) == list(range(count)) and count:
                found.append(("split", [pieces[i] for i in range(count)]))
    return found


def _int_index(node: fx.Node) -> int | None:
    if not is_call(node, {operator.getitem}):
        return None
    index = node.args[1]
    index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _splits_rows(node: fx.Node) -> bool:
    if not is_call(node, _SPLITS, _SPLIT_METHODS):
        return False
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim == 0


def _rejoin(kind: str, pieces: list[fx.Node]) -> fx.Node | None:
    """The stack (unbind) or cat (split) along dim 0 whose i-th input comes from the i-th piece."""
    join = torch.stack if kind == "unbind" else torch.cat
    for node in _downstream(pieces[0]):
        if not is_call(node, {join}) or not isinstance(node.args[0], (list, tuple)):
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim == 0 and len(node.args[0]) == len(pieces):
            return node
    return None


def _downstream(start: fx.Node, limit: int = 256) -> list[fx.Node]:
    seen, todo = [], [start]
    while todo and len(seen) < limit:
        for user in todo.pop(0).users:
            if user not in seen:
                seen.append(user)
                todo.append(user)
    return seen


def _same_ops_on_every_piece(rejoin: fx.Node, pieces: list[fx.Node]):
    """(per piece, the map from piece 0's nodes to that piece's; each of piece 0's nodes' role:
    "op", "shared" or "parallel"), when the ops match one for one; else None."""
    outputs, roles = rejoin.args[0], {}
    mappings = {}
    # Piece 1 against piece 0 tells which nodes are per piece (they differ) and which are shared.
    for i in [*range(1, len(pieces)), 0]:
        mapping = {pieces[0]: pieces[i]}
        if not _match(outputs[0], outputs[i], mapping, roles, pieces[0], i):
            return None
        ops = {mapping[a] for a, role in roles.items() if role == "op"}
        if any(u not in ops and u is not rejoin for b in ops for u in b.users):
            return None  # a piece's intermediate is used elsewhere: it must stay
        mappings[i] = mapping
    return [mappings[i] for i in range(len(pieces))], roles


def _match(a, b, mapping: dict, roles: dict, piece0: fx.Node, i: int) -> bool:
    def same(x, y):
        return _match(x, y, mapping, roles, piece0, i)

    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if not isinstance(a, fx.Node):
        return not isinstance(b, fx.Node) and type(a) is type(b) and a == b
    if a in mapping:
        return mapping[a] is b
    if not isinstance(b, fx.Node):
        return False
    mapping[a] = b
    role = roles.setdefault(a, _role(a, b, piece0, i))
    if role == "parallel":  # index[0] beside logits[0]: index[i] beside logits[i]
        return _is_parallel_piece(a, b, i)
    if role == "shared":
        return a is b
    return (a.op, a.target) == (b.op, b.target) and same(a.args, b.args) and same(a.kwargs, b.kwargs)


def _role(a: fx.Node, b: fx.Node, piece0: fx.Node, i: int) -> str:
    """"parallel", "shared" or "op", read off piece i (> 0) against piece 0; with one piece only,
    what depends on it is an op."""
    if i == 0:
        return "op" if piece0 in _ancestors(a) else "shared"
    if _is_parallel_piece(a, b, i):
        return "parallel"
    return "shared" if a is b else "op"


def _is_parallel_piece(a: fx.Node, b: fx.Node, i: int) -> bool:
    """`a` is piece 0 of another tensor, `b` piece i of the same tensor, the same way."""
    return _int_index(a) == 0 and _int_index(b) == i and a.args[0] is b.args[0]


def _ancestors(node: fx.Node, limit: int = 256) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen | {node}


def _fuse(gm: fx.GraphModule, kind: str, source: fx.Node, pieces, rejoin: fx.Node, matched) -> bool:
    """Insert piece 0's ops on the whole of `source` before `rejoin`; use them for it if they give its
    shape (checked on fake tensors), and erase every piece's ops."""
    mappings, roles = matched
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    ops = sorted((a for a, role in roles.items() if role == "op"), key=order.__getitem__)
    if kind == "unbind" and any(_has_nonnegative_dim(n) for n in ops):
        return False  # a dim counted from the front moves by one when the pieces' dim comes back
    grad_enabled = grad_enabled_at(gm, rejoin)
    if any(grad_enabled_at(gm, mapping[a]) != grad_enabled for mapping in mappings for a in ops):
        return False  # the ops move to the rejoin, which runs under another grad mode
    whole = {pieces[0]: source}
    for a in (a for a, role in roles.items() if role == "parallel"):
        tensor = _whole_of(kind, a, pieces[0])
        if tensor is None:
            return False
        whole[a] = tensor
    made = []
    with gm.graph.inserting_before(rejoin):
        for node in ops:
            whole[node] = gm.graph.node_copy(node, lambda n: whole.get(n, n))
            made.append(whole[node])
    fused = whole[rejoin.args[0][0]]
    if not propagate_example_values(made, grad_enabled) or _shape(fused) != _shape(rejoin):
        for node in reversed(made):
            gm.graph.erase_node(node)
        return False
    rejoin.replace_all_uses_with(fused)
    parallel = [m[a] for m in mappings for a, role in roles.items() if role == "parallel"]
    per_piece = [m[a] for m in mappings for a, role in roles.items() if role == "op"]
    splits = [p.args[0] for p in [*pieces, *parallel]] if kind == "split" else []
    erase_unused(list(dict.fromkeys([rejoin, *per_piece, *parallel, *pieces, *splits])))
    return True


def _whole_of(kind: str, piece: fx.Node, source_piece: fx.Node) -> fx.Node | None:
    """The tensor `piece` is piece 0 of, if it was cut like the source (so pieces line up)."""
    container = piece.args[0]
    if kind == "unbind":
        value, source = example_value(container), example_value(source_piece.args[0])
        same_count = value is not None and value.dim() >= 1 and value.shape[0] == source.shape[0]
        return container if same_count else None
    cut, source_cut = container, source_piece.args[0]
    if cut.target != source_cut.target or cut.args[1:] != source_cut.args[1:] or cut.kwargs != source_cut.kwargs:
        return None
    return cut.args[0]


def _shared(mapping: dict) -> set[fx.Node]:
    return {a for a, b in mapping.items() if a is b}


def _has_nonnegative_dim(node: fx.Node) -> bool:
    dims = [node.kwargs.get("dim")] + ([node.args[1]] if len(node.args) > 1 else [])
    return any(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims if d is not None)


def _shape(node: fx.Node):
    value = example_value(node)
    return None if value is None else tuple(value.shape)


