"""The ways a graph writes a cross-entropy over logits, each read as one `LossMatch`.

    cross_entropy(z, y)                               z (N, V), y (N,): the plain form
    cross_entropy(z.transpose(1, 2), y)               z (B, N, V), y (B, N): classes at dim 1 (also
                                                      permute(0, 2, 1), movedim(-1, 1), einops)
    nll_loss(log_softmax(z, -1), y)                   the same loss in two ops
    cat([cross_entropy(z_i, y_i, reduction="none") for z_i, y_i in zip(z.split(k), y.split(k))]).sum()
    cross_entropy(z_0, y_0, reduction="sum") + ... over z.split(k) / z.chunk(m)
                                                      row splits, as litgpt's and torchtune's chunked
                                                      losses write them: one loss over all of z
    -(log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1) * mask).sum() / mask.sum()
    (logsumexp(z, -1) - z.gather(-1, y[..., None]).squeeze(-1)).mean()
                                                      per-token forms, times masks or numbers,
                                                      negated, summed or averaged

`LossMatch.loss` is the node the chunked site replaces; everything from `logits` to it (`inside`)
is read by the site and erased. What follows the loss (a division by the count of valid labels)
stays in the graph. Other forms are not matched here: `lm_head.py` reports cross-entropy calls it
leaves alone, with the reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

from .graph_utils import CantChunk, example_value, is_call, shape_of

_CE_SIGNATURE = inspect.signature(F.cross_entropy)
_NLL_SIGNATURE = inspect.signature(F.nll_loss)
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax}
_SPLITS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = ("split", "chunk", "tensor_split")
_MOVES = {torch.transpose, torch.permute, torch.movedim, torch.swapaxes}
_MOVE_METHODS = ("transpose", "permute", "movedim", "swapaxes")


@dataclasses.dataclass
class LossMatch:
    loss: fx.Node  # the node whose value the site computes
    logits: fx.Node  # (N, V), or (B, N, V) when `classes_at_1`
    target: fx.Node
    reduction: str  # "mean" or "sum"
    ignore_index: int
    label_smoothing: float
    classes_at_1: bool = False  # cross_entropy read z moved to (B, V, N)
    inside: list[fx.Node] = dataclasses.field(default_factory=list)  # logits -> loss, loss included
    casts: list[fx.Node] = dataclasses.field(default_factory=list)  # on the logits after the move or split
    # A loss written per token (`-log_softmax(z).gather(-1, y)`, ...): the site computes the sum of
    # the per-token NLL times each of `weights` (masks), and the graph multiplies it by `scale`,
    # and divides it by the token count when the graph took a mean.
    weights: list[fx.Node] = dataclasses.field(default_factory=list)
    scale: float = 1.0
    mean: bool = False
    per_token: bool = False  # the target is the gather's (..., 1) index


CASTS = ("float", "half", "bfloat16", "to", "type")


def _through_casts(node) -> tuple[fx.Node, list[fx.Node]]:
    """(what `node` casts, the single-use casts in between, in the order they run)."""
    casts = []
    while is_call(node, (), CASTS) and len(node.args) >= 1 and len(node.users) == 1:
        casts.insert(0, node)
        node = node.args[0]
    return node, casts


def cross_entropy_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_call(n, {F.cross_entropy, F.nll_loss})]


def match_split_losses(gm: fx.GraphModule) -> list[LossMatch]:
    """Cross-entropy over row splits of one logits tensor, summed into one loss."""
    found = []
    for node in gm.graph.nodes:
        summed = _summed_pieces(node)
        match = _split_loss(node, *summed) if summed else None
        if match is not None:
            found.append(match)
    return found


def match_token_losses(gm: fx.GraphModule) -> list[LossMatch]:
    """Losses written per token and reduced to a scalar: `-log_softmax(z).gather(-1, y)` or
    `logsumexp(z) - z.gather(-1, y)`, times masks or numbers, negated, summed or averaged."""
    found = []
    for node in gm.graph.nodes:
        if is_call(node, {torch.gather}, ("gather",)):
            match = _token_loss(node)
            if match is not None:
                found.append(match)
    return found


def _token_loss(gather: fx.Node) -> LossMatch | None:
    args = dict(zip(("input", "dim", "index"), gather.args)) | dict(gather.kwargs)
    source, index = args.get("input"), args.get("index")
    shape = shape_of(source)
    if shape is None or args.get("dim") not in (-1, len(shape) - 1) or shape_of(index) != (*shape[:-1], 1):
        return None
    picked, inside = gather, [gather]
    if len(gather.users) == 1 and is_call(next(iter(gather.users)), {torch.squeeze}, ("squeeze",)):
        picked = next(iter(gather.users))
        inside.append(picked)
    if is_call(source, _LOG_SOFTMAX, ("log_softmax",)) and len(source.users) == 1:
        ls = dict(zip(("input", "dim"), source.args)) | dict(source.kwargs)
        if ls.get("dim") not in (-1, len(shape) - 1) or ls.get("dtype") is not None:
            return None
        logits, sign, per_token = ls["input"], -1.0, picked  # the gathered log-prob is -NLL
        inside.insert(0, source)
    else:
        logits, per_token = source, _minus_logsumexp(source, picked)
        if per_token is None:
            return None
        lse, sign = per_token[1], per_token[2]
        per_token = per_token[0]
        inside += [lse, per_token]
    return _reduced_token_loss(logits, index, per_token, sign, inside)


def _minus_logsumexp(logits: fx.Node, picked: fx.Node):
    """(node, its logsumexp, sign) for `logsumexp(z, -1) - picked` (+1) or `picked - logsumexp` (-1)."""
    if len(picked.users) != 1:
        return None
    (sub,) = picked.users
    if not is_call(sub, {operator.sub, torch.sub}, ("sub", "__sub__")) or len(sub.args) != 2:
        return None
    other = sub.args[0] if sub.args[1] is picked else sub.args[1]
    if not is_call(other, {torch.logsumexp}, ("logsumexp",)) or len(other.users) != 1 or other.args[0] is not logits:
        return None
    if (dict(zip(("input", "dim"), other.args)) | dict(other.kwargs)).get("dim") not in (-1, (-1,)):
        return None
    return sub, other, (1.0 if sub.args[0] is other else -1.0)


def _reduced_token_loss(logits, index, per_token, sign, inside) -> LossMatch | None:
    """Follow the per-token value to a full sum or mean through negation, numbers and masks."""
    node, scale, weights, shape = per_token, sign, [], shape_of(per_token)
    while len(node.users) == 1:
        (user,) = node.users
        others = [a for a in user.args if a is not node]
        if is_call(user, {operator.neg, torch.neg}, ("neg", "__neg__")):
            scale = -scale
        elif is_call(user, {operator.mul, torch.mul}, ("mul", "__mul__", "__rmul__")) and len(others) == 1:
            if isinstance(others[0], (int, float)) and not isinstance(others[0], bool):
                scale *= others[0]
            elif _is_mask(others[0], shape, logits):
                weights.append(others[0])
            else:
                return None
        elif is_call(user, {operator.truediv}) and user.args[0] is node and isinstance(user.args[1], (int, float)):
            scale /= user.args[1]
        elif is_call(user, {torch.sum, torch.mean}, ("sum", "mean")) and len(user.args) == 1 and not user.kwargs:
            mean = (user.target if isinstance(user.target, str) else user.target.__name__) == "mean"
            target = index  # (..., 1): squeezed where the site reads it
            return LossMatch(user, logits, target, "sum", -100, 0.0, False, [*inside, user], [], weights, scale, mean, True)
        else:
            return None
        inside.append(user)
        node = user
    return None


def _is_mask(node, shape, logits: fx.Node, max_nodes: int = 64) -> bool:
    """A tensor of the per-token shape (or broadcast to it) that is not computed from the logits and
    needs no gradient (the site computes none for it)."""
    value = example_value(node)
    if value is None or shape is None or value.requires_grad:
        return False
    if torch.broadcast_shapes(value.shape, shape) != torch.Size(shape):
        return False
    todo, seen = [node], set()
    while todo and len(seen) < max_nodes:
        current = todo.pop()
        if current is logits:
            return False
        seen.add(current)
        todo.extend(a for a in current.all_input_nodes if a not in seen)
    return not todo


def match_loss(node: fx.Node) -> LossMatch:
    """The loss computed by a cross_entropy or nll_loss call; CantChunk when its form is not one
    the chunked site computes."""
    if is_call(node, {F.nll_loss}):
        return _nll_of_log_softmax(node)
    a = _bound(_CE_SIGNATURE, node)
    reduction, ignore_index, smoothing = _check_arguments(a, "cross_entropy")
    logits, target = a["input"], a["target"]
    before_casts, casts = _through_casts(logits)
    moved = _moved_classes(before_casts)
    if moved is not None:
        _check_target(target, dims=2)
        return LossMatch(node, moved, target, reduction, ignore_index, smoothing, True, [before_casts, *casts, node], casts)
    _check_target(target, dims=1)
    if len(shape_of(logits) or ()) != 2:
        raise CantChunk("cross_entropy input is not 2-D (tokens x vocabulary) nor classes moved to dim 1")
    return LossMatch(node, logits, target, reduction, ignore_index, smoothing, False, [node])


def logits_of(call: fx.Node) -> fx.Node:
    """The logits a cross_entropy or nll_loss call reads (nll_loss: through its log_softmax)."""
    if is_call(call, {F.nll_loss}):
        log_probs = _bound(_NLL_SIGNATURE, call)["input"]
        return log_probs.args[0] if is_call(log_probs, _LOG_SOFTMAX, ("log_softmax",)) else log_probs
    return _bound(_CE_SIGNATURE, call)["input"]


def _bound(signature, node: fx.Node) -> dict:
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments


def _check_arguments(a: dict, name: str, reductions=("mean", "sum")) -> tuple[str, int, float]:
    if a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None:
        raise CantChunk(f"{name} with class weights or legacy size_average/reduce")
    if a["reduction"] not in reductions:
        raise CantChunk(f"{name} reduction={a['reduction']!r} (only {' and '.join(map(repr, reductions))})")
    smoothing = a.get("label_smoothing", 0.0)
    if not isinstance(a["ignore_index"], int) or not isinstance(smoothing, (int, float)):
        raise CantChunk(f"{name} ignore_index / label_smoothing are not constants")
    return a["reduction"], a["ignore_index"], float(smoothing)


def _check_target(target, dims: int) -> None:
    value = example_value(target)
    if value is None or value.dim() != dims or value.dtype.is_floating_point:
        raise CantChunk(f"cross_entropy target is not a {dims}-D tensor of class indices")


def _moved_classes(node) -> fx.Node | None:
    """z for a node that is z (B, N, V) with its last dim moved to dim 1, else None."""
    if not is_call(node, _MOVES, _MOVE_METHODS) or node.kwargs or len(node.users) != 1:
        return None
    source, rest = node.args[0], node.args[1:]
    if len(shape_of(source) or ()) != 3:
        return None
    dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = tuple(d % 3 for d in dims)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    moves_last_to_1 = {
        "permute": dims == (0, 2, 1), "transpose": set(dims) == {1, 2}, "swapaxes": set(dims) == {1, 2},
        "movedim": dims == (2, 1),
    }.get(name, False)  # fmt: skip
    return source if moves_last_to_1 else None


def _nll_of_log_softmax(node: fx.Node) -> LossMatch:
    a = _bound(_NLL_SIGNATURE, node)
    reduction, ignore_index, _ = _check_arguments(a, "nll_loss")
    log_probs = a["input"]
    if not is_call(log_probs, _LOG_SOFTMAX, ("log_softmax",)) or len(log_probs.users) != 1:
        raise CantChunk("nll_loss of something other than log_softmax of the logits")
    args = dict(zip(("input", "dim", "_stacklevel", "dtype"), log_probs.args)) | dict(log_probs.kwargs)
    logits = args["input"]
    if len(shape_of(logits) or ()) != 2 or args.get("dim") not in (-1, 1) or args.get("dtype") is not None:
        raise CantChunk("nll_loss of a log_softmax that is not over the last dim of 2-D logits")
    _check_target(a["target"], dims=1)
    return LossMatch(node, logits, a["target"], reduction, ignore_index, 0.0, False, [log_probs, node])


# ---------------------------------------------------------------- row splits


def _summed_pieces(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """("cat", terms and the cat) for `cat([...]).sum()`, ("add", terms and the adds) for a chain
    of `+` starting from nothing or 0 (torchtune's `total = 0.0; total += ...`), or None."""
    if is_call(node, {torch.sum}, ("sum",)) and len(node.args) == 1 and not node.kwargs:
        cat = node.args[0]
        if is_call(cat, {torch.cat}) and len(cat.users) == 1 and cat.kwargs.get("dim", 0) == 0 and len(cat.args) == 1:
            return "cat", [*cat.args[0], cat]
    if not is_call(node, {operator.add, operator.iadd}) or _is_add_term(node):
        return None
    terms, todo = [], [node]
    while todo:
        current = todo.pop()
        terms.append(current)
        if is_call(current, {operator.add, operator.iadd}) and (current is node or len(current.users) == 1):
            if any(not isinstance(a, fx.Node) and a != 0 for a in current.args):
                return None  # a constant term other than 0 is not part of the loss
            todo.extend(a for a in reversed(current.args) if isinstance(a, fx.Node))
    return "add", terms


def _is_add_term(node: fx.Node) -> bool:
    """`node` is itself a term of a bigger sum (the outermost `+` is matched, not each partial)."""
    return len(node.users) == 1 and is_call(next(iter(node.users)), {operator.add, operator.iadd})


def _split_loss(total: fx.Node, kind: str, terms: list[fx.Node]) -> LossMatch | None:
    losses = [t for t in terms if is_call(t, {F.cross_entropy})]
    glue = [t for t in terms if t not in losses]
    if len(losses) < 2 or any(len(ce.users) != 1 for ce in losses):
        return None
    try:
        pieces = [_piece(ce, "none" if kind == "cat" else "sum") for ce in losses]
    except CantChunk:
        return None
    logits_split, target_split, ignore_index, smoothing = pieces[0][:4]
    if any(p[:5] != pieces[0][:5] for p in pieces):
        return None  # the same loss, and the same casts, on every piece
    if sorted(p[5] for p in pieces) != list(range(len(_getitems(logits_split)))):
        return None  # every piece, each once: the loss covers all of the logits
    logits, target = logits_split.args[0], target_split.args[0]
    if len(shape_of(logits) or ()) != 2 or not _same_split(logits_split, target_split):
        return None
    casts = [c for p in pieces for c in p[6]]
    inside = [logits_split, *_getitems(logits_split), *casts, *losses, *glue, total]
    return LossMatch(total, logits, target, "sum", ignore_index, smoothing, False, list(dict.fromkeys(inside)), pieces[0][6])


def _piece(ce: fx.Node, reduction: str):
    """(logits split, target split, ignore_index, label_smoothing, piece index) of one term."""
    a = _bound(_CE_SIGNATURE, ce)
    _check_arguments(a, "cross_entropy", (reduction,))
    (z, casts), y = _through_casts(a["input"]), a["target"]
    if not all(is_call(p, {operator.getitem}) and is_call(p.args[0], _SPLITS, _SPLIT_METHODS) for p in (z, y)):
        raise CantChunk("not a piece of a row split")
    if z.args[1] != y.args[1]:
        raise CantChunk("logits and targets of different pieces")
    cast_calls = tuple((c.target, c.args[1:], tuple(c.kwargs.items())) for c in casts)
    return z.args[0], y.args[0], a["ignore_index"], a["label_smoothing"], cast_calls, z.args[1], casts


def _getitems(split: fx.Node) -> list[fx.Node]:
    return [u for u in split.users if is_call(u, {operator.getitem})]


def _same_split(logits_split: fx.Node, target_split: fx.Node) -> bool:
    """Both split along dim 0 into the same pieces, and each logits piece used by its loss alone."""
    if logits_split.target != target_split.target or logits_split.args[1:] != target_split.args[1:]:
        return False
    if logits_split.kwargs != target_split.kwargs or logits_split.kwargs.get("dim", 0) != 0:
        return False
    if len(logits_split.args) > 2 and logits_split.args[2] != 0:
        return False
    pieces = _getitems(logits_split)
    return len(pieces) == len(logits_split.users) and all(len(p.users) == 1 for p in pieces)
