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

A row-wise loss, whatever its ops: when every per-token value reaches one sum (or mean) over all
tokens through row-wise ops on per-token values only (a softplus, a `where` on the valid labels, a
focal weight, masks that need no gradient), those ops join the row function and the sum is the
site's: `ChunkedLinearRowLoss`, reported as an LM head, computes its gradients in forward (its
upstream gradient is a scalar), with no recompute. What the graph does with the sum (divide by a
count, add another term) stays in the graph. Three rewrites make more losses row-wise first: moves
of the vocabulary dim that undo each other are folded (`identity_moves.py`), a cross-entropy that
reduces over tokens itself is written as its per-token terms and their sum (`token_reductions.py`),
and a logits-shaped tensor made from no logits (a one-hot mask, `arange(V) == y[..., None]`) is
made per chunk inside the site. Before (x-transformers' stable cross-entropy):

    is_target = arange_1 == target[..., None]
    z_target = logits.gather(-1, target[..., None])
    lse = torch.logsumexp(torch.where(is_target, -inf, logits - z_target), dim=-1)
    loss = torch.where(valid, F.softplus(lse), 0.0)
    total = loss.sum() / valid.sum()

After:

    mst_row_loss_0 = self.mst_row_loss_0(h, [w_head, None], [target, valid], [arange_1])
    total = mst_row_loss_0 / valid.sum()
"""

from __future__ import annotations

import dataclasses
import math
import operator

from torch import fx

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_ops import CrossEntropyForm
from mst_fx.runtime.chunked_token_ops import ChunkedLinearRowLoss, ChunkedLinearRows
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
from .identity_moves import fold_identity_moves
from .lm_head import is_row_op, refuse_if_estimated_to_cost, replay_row_op
from .piece_loops import fuse_piece_loop
from .report import SiteReport
from .row_function import Frame, Layout, NotRowWise, is_reduction_of_vocab, is_row_wise_op, lift, op_name
from .token_reductions import split_token_reductions

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
    total: fx.Node | None = None  # a row-wise loss: the sum (or mean) over tokens the site computes


def find_token_head_sites(gm: fx.GraphModule, policy: ChunkPolicy):
    """Sites to rewrite, reports of those left alone, and the nodes of the heads left alone (the
    MLP pass must not report them again)."""
    sites, skipped, left_alone = [], [], set()
    inside_adapters = inside_adapted_linears(gm)
    for node in list(gm.graph.nodes):
        head = None if node in inside_adapters else match_any_linear(node)
        if head is None or not _widens(head):
            continue
        fold_identity_moves(head.out)  # a loss for classes at dim 1 moves them there and back
        if not _reaches_vocab_reduction(head.out):
            continue
        try:
            site = _match(gm, head, policy)
        except CantChunk as why:  # reported as what it was matched as: a loss, or values per token
            skipped.append(SiteReport(getattr(why, "kind", KIND), head_path(head.weight), False, str(why)))
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
    split_token_reductions(n for n in _downstream(start) if any(_is_logits(a, frame) for a in n.all_input_nodes))
    region = _region(gm, start, frame)
    total, tail = _token_sum(region, frame) or (None, [])
    region = _sorted(gm, [*region, *tail], first=start)
    outputs = [total.args[0]] if total is not None else _outputs(region)
    inputs = _external_inputs(region, frame)
    _check_inputs(inputs)
    _check_no_mutation(head, region)
    report = SiteReport(
        "lm_head" if total is not None else KIND, head_path(head.weight), True, tokens=frame.tokens,
        in_width=size_hint(shape_of(head.input)[-1]), amplified_width=frame.vocab,
        itemsize=example_value(head.out).element_size(),
        **({"logits_returned": False} if total is not None else {"token_outputs": [_describe(o) for o in outputs]}),
    )  # fmt: skip
    token, whole = _split_inputs(inputs, frame)
    try:
        row_function = lift(region, start, [key for key, _ in token + whole], outputs, frame)
    except NotRowWise as why:
        raise CantChunk(str(why)) from None
    site = TokenHeadSite(head, row_ops, region, outputs, inputs, frame, report, row_function, token, whole, total)
    _move_inputs_up(gm, site)
    _check_placement(gm, site)
    symbolic = is_symbolic(shape_of(start)[:-1])
    try:
        plan_site(report, policy, symbolic, example_value(head.out).device.type)
        if total is not None and policy == ChunkPolicy() and not symbolic:
            refuse_if_estimated_to_cost(report)  # gradients in forward, as the LM-head pass's sites
    except CantChunk as why:
        why.kind = report.kind
        raise
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
    the per-token values computed from those that flow back into the logits (`z - lse`), and the
    logits-shaped tensors they read that do not come from the logits (a one-hot mask made by
    comparing an `arange` over the classes with the labels): made in the region, one chunk at a
    time, instead of whole. `start` first, then the rest in graph order."""
    downstream = _downstream(start)
    region, todo = {start}, [start]
    while todo:
        node = todo.pop()
        readers = list(node.users) if _is_logits(node, frame) else []
        feeders = [a for a in node.all_input_nodes if a in downstream or _made_per_row(a, frame, downstream)]
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
    return _sorted(gm, region, first=start)


def _made_per_row(node: fx.Node, frame: Frame, downstream: set[fx.Node]) -> bool:
    """A logits-shaped tensor not made from the logits, by a row-wise op with no other reader and
    no gradient: the region makes it per chunk (its inputs are then read per token or whole)."""
    value = example_value(node)
    return (
        node not in downstream and _is_logits(node, frame) and is_row_wise_op(node) and _pure(node)
        and len(node.users) == 1 and value is not None and not value.requires_grad
    )  # fmt: skip


def _sorted(gm: fx.GraphModule, nodes, first: fx.Node) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [first, *sorted(set(nodes) - {first}, key=order.__getitem__)]


_TOKEN_SUMS = {"sum", "mean"}


def _token_sum(region: list[fx.Node], frame: Frame) -> tuple[fx.Node, set[fx.Node]] | None:
    """(the one sum or mean over every token that all the region's per-token values reach, the
    row-wise ops on per-token values on the way: a softplus, a `where` on the valid labels, a focal
    weight): then the head is a scalar loss. None when a value is read any other way."""
    inside, todo, totals = set(region), [n for n in region if not _is_logits(n, frame)], set()
    while todo:
        for user in todo.pop().users:
            if user in inside or user in totals:
                continue
            if _is_token_sum(user):
                totals.add(user)
                continue
            layout = frame.layout(user)
            if layout is None or layout.tail == (frame.vocab,) or not is_row_wise_op(user):
                return None
            inside.add(user)
            todo.append(user)
    if len(totals) != 1 or not _reads_per_token_only(inside - {region[0]}, region[0]):
        return None
    (total,) = totals
    value = example_value(total.args[0])
    return (total, inside - set(region)) if value is not None and value.requires_grad else None


def _reads_per_token_only(ops: set[fx.Node], start: fx.Node) -> bool:
    """No op after `start` reads a value made from the logits across tokens (the loss's own sum,
    say), nor weights with a gradient of their own (kept per token, they are weighted in the graph)."""
    downstream = _downstream(start)
    others = {a for node in ops for a in node.all_input_nodes if a not in ops and a is not start}
    return not any(a in downstream or getattr(example_value(a), "requires_grad", False) for a in others)


def _is_token_sum(node: fx.Node) -> bool:
    """`x.sum()`, `x.mean()`, `torch.sum(x)`: over every dim, in x's dtype."""
    return (
        node.op in ("call_function", "call_method") and op_name(node) in _TOKEN_SUMS
        and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)
    )  # fmt: skip


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
    token, whole = site.token_inputs, site.whole_inputs
    form = CrossEntropyForm("none", -100, 0.0, head.transposed, adapter_form(head))
    widths = (site.report.in_width, frame.vocab)
    token_specs, whole_specs = tuple(spec for _, spec in token), tuple(spec for _, spec in whole)
    if site.total is not None:
        mean = op_name(site.total) == "mean"
        module, name = ChunkedLinearRowLoss(form, site.row_function, token_specs, whole_specs, mean, widths, options), f"mst_row_loss_{index}"
    else:
        differentiable = tuple(bool(getattr(example_value(o), "requires_grad", False)) for o in site.outputs)
        leads = tuple(frame.layout(o).lead for o in site.outputs)
        module = ChunkedLinearRows(form, site.row_function, differentiable, token_specs, whole_specs, leads, widths, options)
        name = f"mst_token_head_{index}"
    gm.add_submodule(name, module)
    graph = gm.graph
    with graph.inserting_before(_anchor(gm, site).next):
        rows = head.input
        for op in site.row_ops:
            rows = replay_row_op(graph, op, rows, site.report.in_width)
        params = [head.weight, head.bias, *adapter_weights(head)]
        call = graph.call_module(name, (rows, params, [key[0] for key, _ in token], [key[0] for key, _ in whole]))
        if site.total is not None:
            call.meta.update(site.total.meta)
            site.total.replace_all_uses_with(call)
        for i, output in enumerate(site.outputs if site.total is None else []):
            value = graph.call_function(operator.getitem, (call, i))
            value.meta.update(output.meta)
            output.replace_all_uses_with(value, delete_user_cb=lambda user: user not in set(site.region))
    erase_unused([*([site.total] if site.total is not None else []), *site.region, *site.row_ops, *head.nodes])


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
