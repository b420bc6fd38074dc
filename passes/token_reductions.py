"""A cross-entropy that reduces over the tokens itself, written as its per-token terms and their sum.

`F.cross_entropy(z, y)` (reduction "mean") is a sum over tokens inside one op. Next to another
use of the same logits (a z-loss, `1e-4 * logsumexp(z).pow(2).mean()`) the LM-head pass can't take
it, and the per-token pass can't either: the op reads across rows. Written out, it is row-wise up
to the sum, as PyTorch defines it:

    loss = F.cross_entropy(z, y, ignore_index=-100)                  # before
    terms = F.cross_entropy(z, y, ignore_index=-100, reduction="none")
    loss = terms.sum() / (y != -100).sum()                           # after ("sum": no division)

The same holds with label smoothing (the mean still divides by the targets not ignored) and for
`nll_loss`. Class weights change the denominator, so a call with them is left as it is.
"""

from __future__ import annotations

import inspect
import operator

import torch.nn.functional as F
from torch import fx

from .graph_utils import erase_unused, example_value, grad_enabled_at, is_call, propagate_example_values

_SIGNATURES = {F.cross_entropy: inspect.signature(F.cross_entropy), F.nll_loss: inspect.signature(F.nll_loss)}


def split_token_reductions(nodes) -> int:
    """Write every cross_entropy / nll_loss call among `nodes` that reduces 2-D input over its
    rows as its per-token terms and their sum (or mean); the count of calls written out."""
    split = 0
    for node in list(nodes):
        arguments = _reduced_over_rows(node)
        if arguments is not None and _write_out(node, arguments):
            split += 1
    return split


def _reduced_over_rows(node: fx.Node) -> dict | None:
    if not is_call(node, set(_SIGNATURES)):
        return None
    bound = _SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["reduction"] not in ("mean", "sum") or a["weight"] is not None:
        return None
    if a["size_average"] is not None or a["reduce"] is not None or not isinstance(a["ignore_index"], int):
        return None
    value = example_value(a["input"])
    return a if value is not None and value.dim() == 2 else None


def _write_out(node: fx.Node, a: dict) -> bool:
    """Whether `node` was written out (not when the new nodes' values can't be computed)."""
    graph = node.graph
    kwargs = {k: v for k, v in a.items() if k not in ("input", "target", "size_average", "reduce")}
    with graph.inserting_before(node):
        terms = graph.call_function(node.target, (a["input"], a["target"]), {**kwargs, "reduction": "none"})
        total = graph.call_method("sum", (terms,))
        result = total
        if a["reduction"] == "mean":
            counted = graph.call_method("sum", (graph.call_function(operator.ne, (a["target"], a["ignore_index"])),))
            result = graph.call_function(operator.truediv, (total, counted))
    made = [terms, total] if result is total else [terms, total, result.args[1].args[0], result.args[1], result]
    if not propagate_example_values(made, grad_enabled_at(graph.owning_module, node)):
        erase_unused(made)
        return False
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True
