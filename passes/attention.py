"""Attention pass: SDPA under a mask read as a function of its indices runs without the N x N mask.

Under torch.compile, Hugging Face builds a (B, 1, N, N) boolean mask for SDPA whenever it can't
prove at trace time that causal is enough: an `attention_mask` is given (HF Trainer's collators
always give one), documents are packed in one row (`position_ids` restarting), a layer attends in
a sliding window or in chunks. That is N² bytes held through the step, growing quadratically.
`mask_reading.read_mask` reads how the mask is built, as an exact function of (batch, head, query,
key). Each mask is one site (every layer that takes it shares it), rewritten in one of two ways:

Causal only (no `attention_mask` given, nothing else):

    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
  becomes
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)

Anything else read (causal with padding, windows, chunks, documents, their and / or / not):

    attn = mst_fx.runtime.masked_attention.masked_attention(q, k, v, leaves, mask, ...)

which runs blocks of queries over the keys each block can reach, building only that block of the
mask (`mst_fx/runtime/masked_attention.py`); causal with padding takes SDPA's is_causal when the
batch holds no padding. Its backward runs the attention again, so it refuses attention dropout (a
second forward would draw another mask). The mask's own nodes are erased once nothing uses them;
the small tensors it reads (padding, document ids) become the op's operands. SDPA calls inside
activation-checkpoint bodies take the mask as an operand of the checkpoint; they are followed to
where it is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import torch
import torch.nn.functional as F
from torch import fx

from mst_fx.runtime import mask_expressions
from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.masked_attention import masked_attention

from .checkpoint_bodies import CHECKPOINT
from .graph_utils import CantChunk, example_value, qualified_module_path, shape_of, size_hint, without_wrappers
from .mask_reading import MaskForm, mask_root, read_mask
from .report import SiteReport

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)


@dataclasses.dataclass
class AttentionCall:
    graph_module: fx.GraphModule  # where the SDPA call is: the graph, or a checkpoint body
    node: fx.Node
    arguments: dict  # SDPA's arguments by name


@dataclasses.dataclass
class MaskSite:
    mask: fx.Node  # built in the outer graph
    calls: list[AttentionCall]
    form: MaskForm | None
    policy: ChunkPolicy
    report: SiteReport


def find_attention_sites(gm: fx.GraphModule, bodies: list[fx.GraphModule], policy: ChunkPolicy) -> list[MaskSite]:
    """One site per mask that reaches an SDPA call with is_causal=False, read or not (see report)."""
    by_mask: dict[fx.Node, list[AttentionCall]] = {}
    for graph_module in [gm, *bodies]:
        for node in graph_module.graph.nodes:
            call = _attention_call(graph_module, node)
            if call is not None and call.arguments["attn_mask"] is not None and not call.arguments["is_causal"]:
                mask = _in_outer_graph(mask_root(call.arguments["attn_mask"]), gm, bodies)
                by_mask.setdefault(mask_root(mask) if mask is not None else None, []).append(call)
    return [_site(mask, calls, policy) for mask, calls in by_mask.items()]


def _attention_call(graph_module, node) -> AttentionCall | None:
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    try:
        bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return AttentionCall(graph_module, node, dict(bound.arguments))


def _in_outer_graph(value, gm, bodies):
    """The outer graph's node a body's placeholder stands for (the checkpoint's operand); the node
    itself in the outer graph; None when it comes from anywhere else."""
    if not isinstance(value, fx.Node) or value.op != "placeholder" or value.graph is gm.graph:
        return value if isinstance(value, fx.Node) and value.graph is gm.graph else None
    calls = _checkpoint_calls(gm, _owner(value, bodies))
    position = [n for n in value.graph.nodes if n.op == "placeholder"].index(value)
    operands = {call.args[1 + position] for call in calls}
    return operands.pop() if len(operands) == 1 else None


def _checkpoint_calls(gm: fx.GraphModule, body: fx.GraphModule | None) -> list[fx.Node]:
    """The outer graph's checkpoint calls that run `body`."""
    return [n for n in gm.graph.nodes if n.target is CHECKPOINT and getattr(gm, n.args[0].target) is body]


def _owner(node: fx.Node, bodies) -> fx.GraphModule | None:
    return next((b for b in bodies if b.graph is node.graph), None)


def _site(mask: fx.Node | None, calls: list[AttentionCall], policy: ChunkPolicy) -> MaskSite:
    first = calls[0]
    q, k = (example_value(first.arguments[name]) for name in ("query", "key"))
    report = SiteReport(
        "attention", attention_location(first.node), False, calls=len(calls),
        tokens=size_hint(q.shape[0]) * size_hint(q.shape[-2]) if q is not None else None,
        in_width=size_hint(q.shape[-1]) if q is not None else None,
        amplified_width=size_hint(k.shape[-2]) if k is not None else None, itemsize=1,
    )  # fmt: skip
    try:
        if mask is None:
            raise CantChunk("the mask comes from outside this graph")
        form = read_mask(mask)
        report.mask = form.description
        for call in calls:
            _check_call(call, mask, form)
    except CantChunk as why:
        report.reason = str(why)
        return MaskSite(mask, calls, None, policy, report)
    report.rewritten = True
    if not form.is_causal:
        _plan_blocks(report, shape_of(mask), policy)
    return MaskSite(mask, calls, form, policy, report)


def _plan_blocks(report: SiteReport, mask_shape, policy: ChunkPolicy) -> None:
    """The blocks of queries at the traced length (its size hint when symbolic)."""
    q_len, kv_len = (size_hint(s) for s in mask_shape[-2:])
    rows = min(q_len, policy.attention_rows(q_len, kv_len))
    report.chunk_rows, report.chunks = rows, -(-q_len // rows)


def _check_call(call: AttentionCall, mask: fx.Node, form: MaskForm) -> None:
    q, k = (example_value(call.arguments[name]) for name in ("query", "key"))
    if q is None or k is None or (q.shape[-2], k.shape[-2]) != tuple(shape_of(mask)[-2:]):
        raise CantChunk("the query or key length is not the mask's")
    if form.varies[1] and shape_of(mask)[1] != q.shape[1]:
        raise CantChunk("the mask varies along heads, and not along the query's heads")
    if not form.is_causal and call.arguments["dropout_p"] != 0.0:
        raise CantChunk(
            f"attention dropout under a {form.description} mask: its blocks are recomputed in backward, and "
            "a recompute would draw another dropout mask"
        )


def attention_location(node: fx.Node) -> str:
    """The attention module, from Dynamo's record of the modules a node was traced in, named as in
    the module the user compiled."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['args'][0].", "self."):
        path = path.removeprefix(prefix)
    # A module the traced function takes as an argument: named by it, as its parameters are.
    path = re.sub(r"^L\['(\w+)'\]\.", r"\1.", path)
    path = without_wrappers(path.replace("[", ".").replace("]", "").replace("'", ""))
    return qualified_module_path(node.graph, path)


# ------------------------------------------------------------------------ the rewrite


def rewrite_attention_site(gm: fx.GraphModule, site: MaskSite) -> None:
    for call in site.calls:
        if site.form.is_causal:
            _replace_with_causal(call)
        else:
            _replace_with_masked_attention(gm, call, site.form, site.policy)
        _erase_dead_ancestors(call.arguments["attn_mask"])  # the call's own view of the mask (a slice)
        if call.graph_module is not gm:
            _drop_unused_operands(gm, call.graph_module)
    _erase_dead_ancestors(site.mask)  # the mask they share, once none of them reads it


def _sdpa_call(graph: fx.Graph, q, k, v, arguments: dict) -> fx.Node:
    kwargs = {"attn_mask": None, "dropout_p": arguments["dropout_p"], "is_causal": True, "scale": arguments["scale"]}
    if arguments["enable_gqa"]:
        kwargs["enable_gqa"] = True
    return graph.call_function(torch._C._nn.scaled_dot_product_attention, (q, k, v), kwargs)


def _replace_with_causal(call: AttentionCall) -> None:
    a = call.arguments
    with call.node.graph.inserting_before(call.node):
        causal = _sdpa_call(call.node.graph, a["query"], a["key"], a["value"], a)
    causal.meta.update(call.node.meta)
    call.node.replace_all_uses_with(causal)
    call.node.graph.erase_node(call.node)


def _replace_with_masked_attention(gm: fx.GraphModule, call: AttentionCall, form: MaskForm, policy: ChunkPolicy) -> None:
    a, graph = call.arguments, call.node.graph
    leaves = [_leaf_in(call.graph_module, gm, leaf) for leaf in form.leaves]
    mask = mask_expressions.encode(form.expr, list(form.leaves))
    settings = (list(form.padding), form.causal_otherwise, list(form.varies), [policy.rows or 0, policy.count or 0])
    with graph.inserting_before(call.node):
        args = (a["query"], a["key"], a["value"], leaves, mask, *settings, a["scale"], bool(a["enable_gqa"]))
        out = graph.call_function(masked_attention, args)
    out.meta.update(call.node.meta)
    call.node.replace_all_uses_with(out)
    graph.erase_node(call.node)


def _leaf_in(owner: fx.GraphModule, gm: fx.GraphModule, leaf: fx.Node) -> fx.Node:
    """`leaf` (an outer-graph node) as seen in `owner`: itself, or a new operand of the checkpoint
    body `owner`, appended to every checkpoint call of that body."""
    if owner is gm:
        return leaf
    placeholders = [n for n in owner.graph.nodes if n.op == "placeholder"]
    for call in _checkpoint_calls(gm, owner):
        if leaf in call.args[1:]:
            return placeholders[call.args[1:].index(leaf)]
        call.args = (*call.args, leaf)
    with owner.graph.inserting_after(placeholders[-1]):
        return owner.graph.placeholder(f"mst_mask_{leaf.name}")


def _drop_unused_operands(gm: fx.GraphModule, body: fx.GraphModule) -> None:
    """Checkpoint operands the body no longer reads (the mask), so the outer graph stops building them."""
    calls = _checkpoint_calls(gm, body)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    unused = [i for i, p in enumerate(placeholders) if not p.users]
    if not calls or not unused:
        return
    for call in calls:
        call.args = (call.args[0], *(a for i, a in enumerate(call.args[1:]) if i not in unused))
    for i in unused:
        body.graph.erase_node(placeholders[i])
    body.recompile()


def _erase_dead_ancestors(node: fx.Node | None) -> None:
    """Erase `node` and what only it used, while nothing else uses them (impure ops stay)."""
    todo = [node] if node is not None else []
    while todo:
        current = todo.pop()
        if getattr(current, "_erased", False) or current.users or current.op in ("placeholder", "output", "get_attr") or current.is_impure():
            continue
        inputs = current.all_input_nodes
        current.graph.erase_node(current)
        todo.extend(inputs)
