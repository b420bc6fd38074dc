"""Attention written out as matmuls and a softmax: reported, never rewritten.

Not every model calls `F.scaled_dot_product_attention`. x-transformers' default `Attend` (without
`attn_flash=True`), and older or research code, compute the scores themselves:

    sim = einsum('b h i d, b h j d -> b h i j', q, k) * scale
    attn = sim.masked_fill(causal_mask, -max).softmax(dim=-1)
    out = einsum('b h i j, b h j d -> b h i d', attn, v)

Its B·H x Nq x Nkv scores and probabilities are held for backward: at long lengths the largest
tensors of the step, and nothing mst does removes them (the attention pass rewrites SDPA calls
only). Silence would hide that, so each such softmax (one per layer) is reported at its module,
with how many bytes one of those tensors takes and what would remove it.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .attention import attention_location
from .graph_utils import example_value, is_inactive_dropout, shape_of, size_hint
from .report import SiteReport
from .row_function import op_name

_SCORE_PRODUCTS = {"matmul", "bmm", "einsum", "__matmul__", "baddbmm"}
_ON_SCORES = {"mul", "truediv", "div", "add", "sub", "masked_fill", "masked_fill_", "float", "to", "type",
              "__mul__", "__truediv__", "__add__", "__sub__", "where", "tanh", "clamp"}  # fmt: skip
_ON_PROBABILITIES = {"float", "to", "type", "type_as", "half", "bfloat16", "dropout"}

REASON = (
    "attention written out (scores = q·kᵀ, softmax, then · v), not F.scaled_dot_product_attention: its "
    "{heads} x {queries} x {keys} scores and probabilities ({mib:.1f} MiB each) are kept whole for backward; "
    "the attention pass rewrites SDPA calls only (a model option that calls SDPA, such as x-transformers' "
    "attn_flash=True, removes them)"
)


def is_written_attention(site: SiteReport) -> bool:
    """A report of this module's (attention written out), not of an attention mask."""
    return site.kind == "attention" and not site.rewritten and (site.reason or "").startswith(REASON.split(" (")[0])


def find_written_attention(gm: fx.GraphModule) -> list[SiteReport]:
    """A report for each softmax over the keys of scores made by a product of two tensors, whose
    probabilities are multiplied into values."""
    reports = []
    for node in gm.graph.nodes:
        if op_name(node) == "softmax" and _over_last_dim(node) and _made_by_product(node) and _multiplies_values(node):
            reports.append(_report(node))
    return reports


def _over_last_dim(node: fx.Node) -> bool:
    shape = shape_of(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return shape is not None and len(shape) >= 3 and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def _made_by_product(softmax: fx.Node, max_nodes: int = 8) -> bool:
    node = softmax.args[0]
    for _ in range(max_nodes):
        if not isinstance(node, fx.Node):
            return False
        name = op_name(node)
        if name in _SCORE_PRODUCTS:
            return len([a for a in node.all_input_nodes if example_value(a) is not None]) >= 2
        if name not in _ON_SCORES or not node.args:
            return False
        node = node.args[0]
    return False


def _multiplies_values(softmax: fx.Node, max_nodes: int = 8) -> bool:
    todo, seen = [softmax], 0
    while todo and seen < max_nodes:
        for user in todo.pop().users:
            seen += 1
            if op_name(user) in _SCORE_PRODUCTS:
                return True
            if op_name(user) in _ON_PROBABILITIES or is_inactive_dropout(user):
                todo.append(user)
    return False


def _report(softmax: fx.Node) -> SiteReport:
    shape = [size_hint(s) for s in shape_of(softmax)]
    value = example_value(softmax)
    itemsize = value.element_size() if isinstance(value, torch.Tensor) else 4
    heads, queries, keys = math.prod(shape[:-2]), shape[-2], shape[-1]
    mib = heads * queries * keys * itemsize / 2**20
    reason = REASON.format(heads=heads, queries=queries, keys=keys, mib=mib)
    return SiteReport("attention", attention_location(softmax), False, reason)
