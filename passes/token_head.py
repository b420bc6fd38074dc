"""Per-token heads: linear -> row-wise ops -> a few values per token, into one `ChunkedLinearRows`.

Post-training losses keep values per token: log-probs of the chosen tokens (GRPO, PPO, DPO),
entropies, token accuracy, `cross_entropy(..., reduction="none")`. Their upstream gradient is per
token, so they are not the LM-head pass's (which needs a scalar loss). This pass takes the head,
every row-wise op on its logits and the per-token values they reduce to, lifts those ops into one
row function (`row_function.py`) and puts a chunked site in their place. What the graph does with
the per-token values (ratios, clipping, masks, sums over each sequence) stays in the graph.

Before (GRPO's per-token log-probs and entropy, model and loss compiled together):

    linear_1 = torch._C._nn.linear(h, w_head, None)
    getitem = linear_1[:, :-1, :]
    logits = getitem / 0.7
    log_softmax = torch.log_softmax(logits.float(), -1)
    logps = log_softmax.gather(-1, ids_shifted).squeeze(-1)
    lse = torch.logsumexp(logits, -1)
    sum_1 = (torch.softmax(logits, -1) * logits).sum(-1)
    ent = lse - sum_1

After:

    getitem = h[:, :-1, :]
    mst_token_head_0 = self.mst_token_head_0(getitem, [w_head, None], [ids_shifted], [])
    logps = mst_token_head_0[0];  lse = mst_token_head_0[1];  sum_1 = mst_token_head_0[2]
    ent = lse - sum_1

The leading row ops (views, slices of tokens) right after the head are replayed on its input, as
the LM-head pass does. A head whose logits reach an op that is not row-wise, or are also returned,
is left alone and reported with that op.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_ops import CrossEntropyForm
from mst_fx.runtime.chunked_token_ops import ChunkedLinearRows
from mst_fx.runtime.site_options import SiteOptions

from .adapters import adapter_form, adapter_weights, inside_adapted_linears, match_any_linear, refuse_random_adapter
from .chunk_count import is_symbolic, plan_site
from .graph_utils import (
    CantChunk,
    Linear,
    erase_unused,
    example_value,
    first_mutation_between,
    grad_enabled_at,
    head_path,
    shape_of,
    size_hint,
)
from .lm_head import is_row_op, replay_row_op
from .piece_loops import fuse_piece_loop
from .report import SiteReport
from .row_function import Frame, Layout, NotRowWise, is_reduction_of_vocab, is_row_wise_op, lift, op_name

KIND = "lm_head per-token"


@dataclasses.dataclass
class TokenHeadSite:
    head: Linear
    row_ops: list[fx.Node]  # head output -> region input, replayed on the head's input
    region: list[fx.Node]  # the row-wise ops, in graph order (region[0] is their input)
    outputs: list[fx.Node]  # per-token values read outside the region
    inputs: list[tuple[fx.Node, Layout]]  # tensors from outside, and the layout of their reader
    frame: Frame
    report: SiteReport
    row_function: fx.GraphModule  # the region as a function of one chunk of rows
    token_inputs: list  # ((node, layout), (lead, trailing shape)) per input read per token
    whole_inputs: list  # ((node, layout), trailing shape) per input read whole


def find_token_head_sites(gm: fx.GraphModule, policy: ChunkPolicy):
    """Sites to rewrite, reports of those left alone, and the nodes of the heads left alone (the
    MLP pass must not report them again)."""
    sites, skipped, left_alone = [], [], set()
    inside_adapters = inside_adapted_linears(gm)
    for node in list(gm.graph.nodes):
        head = None if node in inside_adapters else match_any_linear(node)
        if head is None or not _widens(head) or not _reaches_vocab_reduction(head.out):
            continue
        try:
            site = _match(gm, head, policy)
        except CantChunk as why:
            skipped.append(SiteReport(KIND, head_path(head.weight), False, str(why)))
            left_alone.update(head.nodes)
            continue
        sites.append(site)
    return sites, skipped, left_alone


def _widens(head: Linear) -> bool:
    widths = shape_of(head.input), shape_of(head.out)
    return None not in widths and len(widths[1]) >= 2 and size_hint(widths[1][-1]) >= 2 * size_hint(widths[0][-1])


def _reaches_vocab_reduction(start: fx.Node, max_nodes: int = 64) -> bool:
    """The logits reach log_softmax, logsumexp, gather, ... through ops that keep the vocabulary dim."""
    vocab, todo, seen = shape_of(start)[-1], [start], 0
    while todo and seen < max_nodes:
        node = todo.pop()
        for user in node.users:
            seen += 1
            if is_reduction_of_vocab(user):
                return True
            if (shape_of(user) or (None,))[-1] == vocab and is_row_wise_op(user):
                todo.append(user)
    return False


def _match(gm: fx.GraphModule, head: Linear, policy: ChunkPolicy) -> TokenHeadSite:
    refuse_random_adapter(head)
    vocab = shape_of(head.out)[-1]
    row_ops, start = [], head.out
    while len(start.users) == 1 and is_row_op(next(iter(start.users)), vocab):
        start = next(iter(start.users))
        row_ops.append(start)
    lead = tuple(size_hint(s) for s in shape_of(start)[:-1])
    frame = Frame(lead, math.prod(lead), size_hint(vocab))
    _fuse_piece_loops(gm, start, frame)
    region = _region(gm, start, frame)
    outputs = _outputs(region)
    inputs = _external_inputs(region, frame)
    _check_inputs(inputs)
    _check_no_mutation(head, region)
    report = SiteReport(
        KIND, head_path(head.weight), True, tokens=frame.tokens, in_width=size_hint(shape_of(head.input)[-1]),
        amplified_width=frame.vocab, itemsize=example_value(head.out).element_size(),
        token_outputs=[_describe(o) for o in outputs],
    )  # fmt: skip
    token, whole = _split_inputs(inputs, frame)
    try:
        row_function = lift(region, region[0], [key for key, _ in token + whole], outputs, frame)
    except NotRowWise as why:
        raise CantChunk(str(why)) from None
    site = TokenHeadSite(head, row_ops, region, outputs, inputs, frame, report, row_function, token, whole)
    _move_inputs_up(gm, site)
    _check_placement(gm, site)
    plan_site(report, policy, is_symbolic(shape_of(start)[:-1]), example_value(head.out).device.type)
    return site


def _fuse_piece_loops(gm: fx.GraphModule, start: fx.Node, frame: Frame) -> None:
    """Loops over sequences or row chunks of the logits (TRL's), fused into one op on all of them
    (`piece_loops.py`): the graph computes the same, and the region sees row-wise ops only."""
    fused = True
    while fused:
        fused = False
        for node in _downstream(start):
            if _is_logits(node, frame) and fuse_piece_loop(gm, node):
                fused = True
                break


def _region(gm: fx.GraphModule, start: fx.Node, frame: Frame) -> list[fx.Node]:
    """Every op on the logits (all of them must be row-wise), the per-token values they reduce to,
    and the per-token values computed from those that flow back into the logits (`z - lse`)."""
    downstream = _downstream(start)
    region, todo = {start}, [start]
    while todo:
        node = todo.pop()
        readers = list(node.users) if _is_logits(node, frame) else []
        feeders = [a for a in node.all_input_nodes if a in downstream]
        for other in readers + feeders:
            if other in region:
                continue
            if other.op == "output":
                raise CantChunk("the logits are also returned by this graph (the rewrite would not compute them)")
            if frame.layout(other) is None or not is_row_wise_op(other):
                raise CantChunk(
                    f"'{other.name}' ({op_name(other)}) reads the logits across tokens or in a way the per-token "
                    "rewrite does not know to be row-wise (it takes elementwise ops, softmax/log_softmax, "
                    "reductions and gathers over the last dim, and reshapes of the token dims)"
                )
            region.add(other)
            todo.append(other)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(region, key=order.__getitem__)


def _is_logits(node: fx.Node, frame: Frame) -> bool:
    layout = frame.layout(node)
    return layout is not None and layout.tail == (frame.vocab,)


def _downstream(start: fx.Node) -> set[fx.Node]:
    seen, todo = {start}, [start]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _outputs(region: list[fx.Node]) -> list[fx.Node]:
    inside = set(region)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if not outputs:
        raise CantChunk("nothing outside the head's row-wise ops reads their per-token values")
    return outputs


def _external_inputs(region: list[fx.Node], frame: Frame) -> list[tuple[fx.Node, Layout]]:
    inside, found = set(region), {}
    for node in region[1:]:
        for arg in node.all_input_nodes:
            if arg not in inside:
                found[(arg, frame.layout(node))] = None
    return list(found)


def _check_inputs(inputs: list[tuple[fx.Node, Layout]]) -> None:
    for node, _ in inputs:
        value = example_value(node)
        if value is None:
            raise CantChunk(f"'{node.name}', an input of the ops on the logits, is not a tensor")
        if value.requires_grad:
            raise CantChunk(
                f"'{node.name}', an input of the ops on the logits, needs a gradient; the per-token site "
                "computes gradients for the head's input and weights only"
            )


def _check_no_mutation(head: Linear, region: list[fx.Node]) -> None:
    read = [head.input, head.weight, head.bias, *adapter_weights(head)]
    mutation = first_mutation_between(head.nodes[0], region[-1], read)
    if mutation is not None:
        raise CantChunk(f"'{mutation.name}' updates the head's input or weight in place before its logits are used")


def _check_placement(gm: fx.GraphModule, site: TokenHeadSite) -> None:
    """The site runs where its last input is ready; every reader of its outputs must come later,
    and gradients must be on there if any output needs one."""
    anchor = _anchor(gm, site)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = set(site.region)
    readers = [u for o in site.outputs for u in o.users if u not in inside]
    early = [u for u in readers if order[u] <= order[anchor]]
    if early:
        raise CantChunk(f"'{early[0].name}' reads a per-token value before '{anchor.name}', an input of the site, is ready")
    differentiable = any(getattr(example_value(o), "requires_grad", False) for o in site.outputs)
    if differentiable and not grad_enabled_at(gm, anchor):
        raise CantChunk("the site would run under no_grad but its outputs need gradients")


def _movable_inputs(gm: fx.GraphModule, site: TokenHeadSite) -> list[fx.Node] | None:
    """The computations of the site's inputs that come after its logits (`ids[:, 1:, None]` computed
    where the gather needs it), if they can run before them instead: pure, not made from the
    logits, not under another grad mode. In graph order; None when some can't move."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = order[site.region[0]]
    downstream = _downstream(site.region[0])
    found, todo = set(), [node for node, _ in site.inputs]
    while todo:
        node = todo.pop()
        if order[node] <= first or node in found:
            continue
        if node in downstream or node.op not in ("call_function", "call_method") or not _pure(node):
            return None
        if grad_enabled_at(gm, node) != grad_enabled_at(gm, site.region[0]):
            return None
        found.add(node)
        todo.extend(node.all_input_nodes)
    return sorted(found, key=order.__getitem__)


def _pure(node: fx.Node) -> bool:
    name = op_name(node)
    return not node.is_impure() and "out" not in node.kwargs and not (name.endswith("_") and not name.endswith("__"))


def _move_inputs_up(gm: fx.GraphModule, site: TokenHeadSite) -> None:
    for node in _movable_inputs(gm, site) or []:
        site.region[0].prepend(node)


def _anchor(gm: fx.GraphModule, site: TokenHeadSite) -> fx.Node:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    candidates = [site.region[0], *(node for node, _ in site.inputs)]
    return max(candidates, key=order.__getitem__)


def _describe(output: fx.Node) -> str:
    """`lse (logsumexp)`: the graph's name of the value and the op that reduced the logits to it."""
    node = output
    while op_name(node) in ("squeeze", "unsqueeze", "float", "to", "neg", "__neg__") and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return f"{output.name} ({op_name(node)})"


def rewrite_token_head_site(gm: fx.GraphModule, site: TokenHeadSite, index: int, options: SiteOptions) -> None:
    head, frame = site.head, site.frame
    differentiable = tuple(bool(getattr(example_value(o), "requires_grad", False)) for o in site.outputs)
    token, whole, row_function = site.token_inputs, site.whole_inputs, site.row_function
    form = CrossEntropyForm("none", -100, 0.0, head.transposed, adapter_form(head))
    module = ChunkedLinearRows(
        form, row_function, differentiable, tuple(spec for _, spec in token), tuple(spec for _, spec in whole),
        tuple(frame.layout(o).lead for o in site.outputs), (site.report.in_width, frame.vocab), options,
    )  # fmt: skip
    name = f"mst_token_head_{index}"
    gm.add_submodule(name, module)
    graph = gm.graph
    with graph.inserting_before(_anchor(gm, site).next):
        rows = head.input
        for op in site.row_ops:
            rows = replay_row_op(graph, op, rows, site.report.in_width)
        params = [head.weight, head.bias, *adapter_weights(head)]
        call = graph.call_module(name, (rows, params, [key[0] for key, _ in token], [key[0] for key, _ in whole]))
        for i, output in enumerate(site.outputs):
            value = graph.call_function(operator.getitem, (call, i))
            value.meta.update(output.meta)
            output.replace_all_uses_with(value, delete_user_cb=lambda user: user not in set(site.region))
    erase_unused([*site.region, *site.row_ops, *head.nodes])


def _split_inputs(inputs: list[tuple[fx.Node, Layout]], frame: Frame):
    """Inputs read per token (chunked with the rows) and inputs read whole (a temperature tensor, a
    vocabulary mask), each with how the site brings it to flat form: (lead, trailing shape)."""
    token, whole = [], []
    for node, layout in inputs:
        key, shape = (node, layout), tuple(size_hint(s) for s in shape_of(node))
        ndim = len(layout.tail) + (len(frame.lead) if layout.lead == "model" else 1)
        padded = (1,) * (ndim - len(shape)) + shape
        lead, tail = padded[: ndim - len(layout.tail)], padded[ndim - len(layout.tail) :]
        if all(s == 1 for s in lead):
            whole.append((key, tail))
        else:
            token.append((key, (layout.lead, tail)))
    return token, whole
