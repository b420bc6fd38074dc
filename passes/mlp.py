"""MLP pass: linear -> elementwise activation -> linear, rewritten into a `ChunkedMLP`.

Matched forms (any elementwise activation; biases or not; GPT-2's Conv1D counts as a linear, and
so does a linear with a LoRA adapter added, `passes/adapters.py`):

    gated   out = down(act(gate(x)) * up(x))          (either operand order; the product may be
                                                      scaled by numbers or per-channel parameters:
                                                      `up * act(gate) * s`)
    fused   g, u = gate_up(x).chunk(2, -1); out = down(act(g) * u)
    plain   out = down(act(fc(x)))

Before (Llama's MLP in the Dynamo graph):

    linear_4 = torch._C._nn.linear(x, w_gate, None)
    silu = torch.nn.functional.silu(linear_4)
    linear_5 = torch._C._nn.linear(x, w_up, None)
    mul_11 = silu * linear_5
    down_proj = torch._C._nn.linear(mul_11, w_down, None)

After:

    mst_mlp_0 = self.mst_mlp_0(x, w_gate, None, w_up, None, w_down, None)

`self.mst_mlp_0` runs the same computation over M token chunks and recomputes each chunk's
intermediates in backward (`mst_fx.runtime.chunked_ops.ChunkedMLP`); the activation is lifted verbatim into
its own small graph.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_ops import ChunkedMLP, MLPForm
from mst_fx.runtime.site_options import SiteOptions

from .adapters import AdaptedLinear, adapter_form, inside_adapted_linears, match_any_linear, refuse_random_adapter
from .chunk_count import is_symbolic, plan_site
from .graph_utils import (
    CantChunk,
    Linear,
    elementwise_chain,
    erase_unused,
    example_value,
    first_mutation_between,
    head_path,
    is_call,
    is_elementwise_of,
    is_inactive_dropout,
    lift_chain,
    match_linear,
    module_path,
    numel_hint,
    only_used_by,
    shape_of,
    size_hint,
)
from .report import SiteReport

_MUL = {operator.mul, torch.mul}


@dataclasses.dataclass
class MLPSite:
    x: fx.Node
    gate: Linear
    up: Linear | None
    down: Linear
    form: MLPForm
    activation: fx.GraphModule
    nodes: list[fx.Node]  # everything the rewrite replaces
    report: SiteReport
    scales: list[fx.Node] = dataclasses.field(default_factory=list)  # per-channel scales of the product


def find_mlp_sites(gm: fx.GraphModule, policy: ChunkPolicy, training: bool = False, reported=frozenset()):
    """Sites to rewrite, and reports of the MLP-like sites left alone (with reasons). `training`:
    the graph computes gradients, so a widening linear whose output leaves it is worth a report.
    `reported`: nodes another pass has reported already (an LM head whose logits are returned)."""
    sites, skipped, claimed = [], [], set()
    covered = set(reported)  # nodes of every site found, rewritten or not: reported either way
    inside_adapted = inside_adapted_linears(gm)
    for node in gm.graph.nodes:
        down = None if node in inside_adapted else match_any_linear(node)
        if down is None:
            continue
        try:
            site = _match_mlp(down)
        except GuardOnDataDependentSymNode:  # sizes from nonzero: a loop over experts (the experts pass reports it)
            continue
        except CantChunk as why:
            skipped.append(SiteReport("mlp", module_path(down.weight), False, str(why)))
            covered.update(down.nodes)
            continue
        if site is None:
            continue
        covered.update(site.nodes)
        if claimed.intersection(site.nodes):
            # A chain of linears (Zaya's router: fc1 -> gelu -> fc2 -> gelu -> out) matches twice,
            # overlapping on fc2; the first match keeps it.
            skipped.append(
                dataclasses.replace(site.report, rewritten=False, reason="overlaps an MLP matched before it")
            )
            continue
        try:
            x = example_value(site.x)
            plan_site(site.report, policy, is_symbolic(x.shape[:-1]), x.device.type)
        except CantChunk as why:
            site.report.rewritten, site.report.reason = False, str(why)
            skipped.append(site.report)
            continue
        sites.append(site)
        claimed.update(site.nodes)
    cut = _cut_across_graphs(gm, covered) if training else []
    return sites, skipped + _unmatched_mlp_shapes(gm, covered) + cut + _unread_losses(gm, covered)


def _unmatched_mlp_shapes(gm: fx.GraphModule, covered: set[fx.Node]) -> list[SiteReport]:
    """Reports for MLP-shaped pairs no matcher took: a widening linear (out >= 2 x in) whose output
    reaches a narrowing linear through elementwise ops joining other tensors, such as hidden units
    scaled by a per-channel parameter, or a DoRA adapter. Rewriting those is a matcher's job; this
    only makes sure such a site is never missed in silence."""
    reports, seen = [], set()
    for first in _unclaimed_widening_linears(gm, covered):
        found = _narrowing_linear_after(first)
        if found is None:
            continue
        second, joint = found
        if second.out in covered or second.out in seen:
            continue
        seen.add(second.out)
        reason = (
            f"MLP-shaped (a widening linear, then '{joint.name}' ({_describe_op(joint)}), then a narrowing one), "
            "in a form the MLP pass does not match: the linears' outputs are combined with other tensors"
        )
        reports.append(SiteReport("mlp", module_path(first.weight, second.weight), False, reason))
    return reports


def _cut_across_graphs(gm: fx.GraphModule, covered: set[fx.Node]) -> list[SiteReport]:
    """Reports for widening linears whose output leaves the graph through elementwise ops only:
    the first half of an MLP (or an LM head) whose other half is in another graph, after a graph
    break or where DDP's optimizer splits the graph at a gradient-bucket boundary."""
    return [
        SiteReport("mlp", module_path(first.weight), False, CUT_REASON)
        for first in _unclaimed_widening_linears(gm, covered)
        if _leaves_graph(first.out)
    ]


_VOCAB_REDUCTIONS = {"log_softmax", "softmax", "logsumexp", "gather", "take_along_dim", "argmax", "max"}


def _unread_losses(gm: fx.GraphModule, covered: set[fx.Node]) -> list[SiteReport]:
    """Reports for widening linears whose output reaches an op that reduces over its last dim
    (softmax, logsumexp, gather, ...) but no loss form the LM-head pass reads: an entropy, say. Rewriting those needs a per-token rewrite; this only
    makes sure such a head is never missed in silence."""
    reports = []
    for first in _unclaimed_widening_linears(gm, covered):
        reducer = _first_reduction_after(first.out)
        if reducer is not None:
            reason = (
                f"a widening linear (an LM head?) whose output reaches '{reducer.name}' ({_target_name(reducer)}), "
                "a use of the logits the LM-head pass does not read (it reads cross_entropy, nll_loss(log_softmax), "
                "row splits of them and the per-token NLL written with gather, times masks, summed or averaged; "
                "other per-token uses, such as an entropy or per-token log-probs kept unreduced, need a per-token "
                "rewrite)"
            )
            reports.append(SiteReport("lm_head", head_path(first.weight), False, reason))
    return reports


def _first_reduction_after(start: fx.Node, max_nodes: int = 8) -> fx.Node | None:
    """The first op reducing over the last dim that `start`'s value reaches (breadth first), along
    ops that keep that dim whole and last: rows of logits. A projection whose output is split into
    heads (attention's q and k, reduced by the softmax over keys) reaches none."""
    width, todo, seen = (shape_of(start) or (None,))[-1], [start], 0
    while todo and seen < max_nodes:
        node = todo.pop(0)
        for user in node.users:
            seen += 1
            if _target_name(user) in _VOCAB_REDUCTIONS and _reduces_last_dim(user, node):
                return user
            if user.op in ("call_function", "call_method") and (shape_of(user) or (None,))[-1] == width:
                todo.append(user)
    return None


def _reduces_last_dim(reducer: fx.Node, rows: fx.Node) -> bool:
    """`reducer` reads `rows` (whose last dim is the linear's width) over that last dim."""
    if not reducer.args or reducer.args[0] is not rows:
        return False
    position = 2 if _target_name(reducer) == "take_along_dim" else 1
    dim = reducer.kwargs.get("dim", reducer.args[position] if len(reducer.args) > position else None)
    ndim = len(shape_of(rows) or ())
    return isinstance(dim, int) and ndim > 0 and dim % ndim == ndim - 1


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


CUT_REASON = (
    "a widening linear whose output leaves this graph through elementwise ops only: an MLP (or an LM "
    "head) cut across two graphs, by a graph break or by DDP splitting the graph at a gradient-bucket "
    "boundary, can't be rewritten (with DDP, torch._dynamo.config.optimize_ddp = 'python_reducer' or "
    "False keeps it whole)"
)


def _leaves_graph(start: fx.Node, max_nodes: int = 16) -> bool:
    """Every path from `start` runs through elementwise ops of its shape to the graph's output."""
    shape, todo, seen = shape_of(start), [start], set()
    while todo and len(seen) < max_nodes:
        node = todo.pop()
        for user in node.users:
            if user.op == "output":
                continue
            if not is_elementwise_of(user, shape):
                return False
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return not todo and any(u.op == "output" for n in [start, *seen] for u in n.users)


def _unclaimed_widening_linears(gm: fx.GraphModule, covered: set[fx.Node]):
    """Linears widening their input (out >= 2 x in) that no site found holds: candidates for an
    MLP's first linear. A linear fed by a linear is an adapter's second half, not an MLP's first."""
    for node in gm.graph.nodes:
        linear = match_linear(node)
        if linear is not None and node not in covered and _widens(linear) and match_linear(linear.input) is None:
            yield linear


def _widens(linear: Linear) -> bool:
    widths = shape_of(linear.input), shape_of(linear.out)
    return None not in widths and widths[1][-1] >= 2 * widths[0][-1]


def _narrowing_linear_after(first: Linear, max_nodes: int = 24):
    """(second linear, the first op joining another tensor) for a linear reached from `first`'s
    output through elementwise ops that maps back to `first`'s input width (d -> I -> d), or None.
    Only paths that join another tensor count: a plain chain is a form the matcher knows, and so
    was already reported if it was left alone."""
    start, start_input = first.out, first.input
    shape, todo, seen = shape_of(start), [(start, None)], set()
    while todo and len(seen) < max_nodes:
        node, joint = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            linear = match_linear(user)
            if linear is not None and linear.input is node:
                if joint is not None and shape_of(linear.out)[-1] == shape_of(start_input)[-1]:
                    return linear, joint  # back to the first linear's input width: d -> I -> d
                continue
            if is_elementwise_of(user, shape):
                others = [a for a in user.all_input_nodes if a is not node and example_value(a) is not None]
                todo.append((user, joint or (user if others else None)))
    return None


def _describe_op(node: fx.Node) -> str:
    return f"{_target_name(node)} with another tensor"


def ends_gated_mlp(linear: Linear) -> bool:
    """`linear` is the down projection of a gated MLP, `down(act(gate(x)) * up(x))` in any matched
    form. (A plain `linear -> act -> linear` ending in a vocabulary is a head behind a projection.)"""
    try:
        site = _match_mlp(linear)
    except (CantChunk, GuardOnDataDependentSymNode):
        return False  # a near miss names an op that hides a linear; a head may well be behind one
    return site is not None and site.form.gated


def _match_mlp(down: Linear) -> MLPSite | None:
    """The MLP ending in `down`; None when `down` is no MLP's second linear."""
    product, identities, scaling = down.input, [], []
    while True:
        if is_inactive_dropout(product):  # dropout(p=0) after the product (CPM-Ant, ModernBERT)
            identities.append(product)
            product = product.args[0] if product.args else product.kwargs["input"]
        elif (scaled := _scaled(product)) is not None:  # `up * act(gate) * s`
            identities.append(product)
            scaling.insert(0, scaled[1])
            product = scaled[0]
        else:
            break
    if is_call(product, _MUL, ("mul", "__mul__")) and len(product.args) == 2 and not product.kwargs:
        p, q = product.args
        if example_value(p) is not None and example_value(q) is not None:
            for act_side, up_side, act_first in ((p, q, True), (q, p, False)):
                site = _match_gated(down, product, act_side, up_side, act_first, identities)
                if site is not None:
                    return _with_scaling(site, scaling)
    hidden = down.input
    fc_out = _chain_source(hidden)
    fc = match_any_linear(fc_out) if fc_out is not hidden else None
    if fc is None:
        _explain_plain_near_miss(hidden)
        return None  # not linear -> activation -> linear (or no activation at all)
    chain = elementwise_chain(fc_out, hidden)
    form = MLPForm(gated=False, fused=False, gate_index=0, act_first=True, transposed=fc.transposed)
    return _site(down, fc, None, form, fc_out, chain, [])


def _with_scaling(site: MLPSite, scaling: list) -> MLPSite:
    """The site with its product's scaling: numbers go in the form, parameters are site inputs
    (`("param", k)`: the k-th of `site.scales`)."""
    params = [s for _, s in scaling if isinstance(s, fx.Node)]
    steps = tuple((op, ("param", params.index(s)) if isinstance(s, fx.Node) else s) for op, s in scaling)
    site.form = dataclasses.replace(site.form, scaling=steps)
    site.scales = params
    return site


def _scaled(node) -> tuple[fx.Node, tuple[str, float | fx.Node]] | None:
    """(x, ("mul" | "div", s)) for `x * s`, `s * x` or `x / s` with a Python number s, or with s a
    per-channel parameter (a graph input of x's last width: `hidden * self.scale`), else None."""
    if not is_call(node, {operator.mul, operator.truediv}) or len(node.args) != 2 or len(node.users) != 1:
        return None
    op = "mul" if node.target is operator.mul else "div"
    for x, s in (node.args, node.args[::-1] if op == "mul" else ()):
        if not isinstance(x, fx.Node):
            continue
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            return x, (op, float(s))
        if op == "mul" and _is_per_channel(s, x):
            return x, ("mul", s)
    return None


def _is_per_channel(s, x: fx.Node) -> bool:
    """A parameter or buffer (a graph input), one value per channel of x's last dim."""
    value, shape = example_value(s), shape_of(x)
    if not isinstance(s, fx.Node) or s.op not in ("placeholder", "get_attr") or value is None or shape is None:
        return False
    return value.is_floating_point() and value.numel() == shape[-1] and value.shape[-1] == shape[-1]


def _match_gated(down, product, act_side, up_side, act_first, identities) -> MLPSite | None:
    gate_out = _chain_source(act_side)
    fused = _fused_halves(gate_out, up_side)
    if fused is not None:
        gate_up, split, gate_index = fused
        chain = elementwise_chain(gate_out, act_side)
        form = MLPForm(True, True, gate_index, act_first, gate_up.transposed)
        return _site(down, gate_up, None, form, gate_out, chain, [product, split, gate_out, up_side, *identities])
    gate, up = match_any_linear(gate_out), match_any_linear(up_side)
    if gate is None and up is not None:
        _explain_near_miss(act_side, up.input)
    if gate is None or up is None or gate.out is up.out:
        return None  # `x * sigmoid(1.702 * x)` (quick-GELU) is a plain MLP's activation
    if gate.input is not up.input or gate.transposed != up.transposed:
        return None
    chain = elementwise_chain(gate_out, act_side)
    form = MLPForm(True, False, 0, act_first, gate.transposed)
    return _site(down, gate, up, form, gate_out, chain, [product, *identities])


def _fused_halves(gate_half, up_half):
    """(gate_up linear, chunk node, index of the gate half) for `gate_up(x).chunk(2, -1)`."""
    for half in (gate_half, up_half):
        if not (is_call(half, {operator.getitem}) and isinstance(half.args[1], int)):
            return None
    split = gate_half.args[0]
    if split is not up_half.args[0] or not _is_last_dim_halving(split):
        return None
    gate_up = match_any_linear(split.args[0])
    if gate_up is None or {gate_half.args[1], up_half.args[1]} != {0, 1}:
        return None
    return gate_up, split, gate_half.args[1]


def _is_last_dim_halving(node) -> bool:
    if not is_call(node, {torch.chunk}, ("chunk",)):
        return False
    bound = dict(zip(("input", "chunks", "dim"), node.args)) | dict(node.kwargs)
    ndim = len(shape_of(node.args[0]) or ())
    return bound.get("chunks") == 2 and bound.get("dim", 0) in (-1, ndim - 1)


def _chain_source(end: fx.Node) -> fx.Node | None:
    """The one node that `end` is computed from by elementwise ops of its shape, if there is one."""
    shape, leaves, seen, todo = shape_of(end), set(), set(), [end]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_elementwise_of(node, shape) and match_any_linear(node) is None:
            todo.extend(a for a in node.all_input_nodes if example_value(a) is not None)
        else:
            leaves.add(node)
    return leaves.pop() if len(leaves) == 1 else None


def _explain_near_miss(act_side: fx.Node, x: fx.Node) -> None:
    """CantChunk naming the op that hides a gate linear on `x` behind the activation, if one does."""
    blocker, node = None, act_side
    while node is not None and node is not x:
        linear = match_linear(node)
        if linear is not None:
            if linear.input is x and blocker is not None:
                raise _blocked_by(blocker)
            return
        if blocker is None and not is_elementwise_of(node, shape_of(act_side)):
            blocker = node
        tensors = [a for a in node.all_input_nodes if example_value(a) is not None]
        node = tensors[0] if tensors else None


def _explain_plain_near_miss(hidden: fx.Node, max_hops: int = 6) -> None:
    """CantChunk naming the op that hides a widening linear behind `hidden`, if one does: a single
    path of ops back from `hidden`, keeping its shape, that reaches a linear after a non-elementwise
    op (Bloom's gelu as a custom autograd.Function, dropout with p > 0, a norm)."""
    shape, node, blocker = shape_of(hidden), hidden, None
    for _ in range(max_hops):
        linear = match_linear(node)
        if linear is not None:
            widens = (shape_of(linear.input) or (0,))[-1] < shape[-1]
            if blocker is not None and widens:
                raise _blocked_by(blocker)
            return
        if not is_elementwise_of(node, shape):
            blocker = node  # the one nearest the first linear names the op best
        inputs = [
            a for a in node.all_input_nodes if a.op in ("call_function", "call_method") and shape_of(a) in (shape, None)
        ]
        if len(inputs) != 1:
            return
        node = inputs[0]


def _blocked_by(blocker: fx.Node) -> CantChunk:
    random = "dropout" in str(blocker.target) or "rand" in str(blocker.target)
    why = "is random: a recompute would draw a different mask" if random else "is not elementwise"
    return CantChunk(f"'{blocker.name}' between the linears {why}")


def _site(down, gate, up, form, act_in, chain, glue) -> MLPSite:
    nodes = [*gate.nodes, *(up.nodes if up else []), *chain, *glue, *down.nodes]
    escaped = only_used_by([n for n in nodes if n is not down.out], [down.out])
    location = module_path(gate.weight, down.weight)
    kind = "mlp fused" if form.fused else "mlp gated" if form.gated else "mlp plain"
    if escaped is not None:
        raise CantChunk(f"an intermediate of {kind} is also used by '{escaped.name}'")
    for linear in (gate, up, down):
        refuse_random_adapter(linear)
    order = {n: i for i, n in enumerate(down.out.graph.nodes)}
    params = [gate.weight, gate.bias, *((up.weight, up.bias) if up else ()), down.weight, down.bias]
    params += [w for w in _adapter_weights(gate, up, down) if w is not None]
    mutation = first_mutation_between(min(nodes, key=order.__getitem__), down.out, [gate.input, *params])
    if mutation is not None:
        raise CantChunk(
            f"'{mutation.name}' updates the input or a weight of {kind} in place between its linears; "
            "the rewrite computes the whole MLP at the last linear and would read the updated values"
        )
    x_shape = shape_of(gate.input)
    if x_shape is None or len(x_shape) < 2:
        raise CantChunk(f"{kind}: the input has no usable shape")
    hidden = example_value(act_in)
    report = SiteReport(
        kind, location, True, None, None,
        tokens=numel_hint(x_shape[:-1]), in_width=size_hint(x_shape[-1]),
        amplified_width=size_hint(hidden.shape[-1]), itemsize=hidden.element_size(),
    )  # fmt: skip
    activation = lift_chain(act_in, chain, "Activation")
    form = dataclasses.replace(form, adapters=tuple(adapter_form(linear) for linear in (gate, up, down)))
    return MLPSite(gate.input, gate, up, down, form, activation, nodes, report)


def _adapter_weights(gate, up, down) -> list[fx.Node | None]:
    """A and B of each linear's adapter, in the order ChunkedMLP takes them (None where none)."""
    adapted = [linear if isinstance(linear, AdaptedLinear) else None for linear in (gate, up, down)]
    return [w for a in adapted for w in ((a.lora_a, a.lora_b) if a else (None, None))]


def rewrite_mlp_site(gm: fx.GraphModule, site: MLPSite, index: int, options: SiteOptions) -> None:
    name = f"mst_mlp_{index}"
    widths = (site.report.in_width, site.report.amplified_width)
    gm.add_submodule(name, ChunkedMLP(site.form, site.activation, widths, options))
    up = site.up
    args = (
        site.x, site.gate.weight, site.gate.bias,
        up.weight if up else None, up.bias if up else None,
        site.down.weight, site.down.bias,
    )  # fmt: skip
    if any(site.form.adapters) or site.scales:
        args += tuple(_adapter_weights(site.gate, up, site.down))
    args += tuple(site.scales)
    with gm.graph.inserting_before(site.down.out):
        chunked = gm.graph.call_module(name, args)
    chunked.meta.update(site.down.out.meta)
    site.down.out.replace_all_uses_with(chunked)
    erase_unused(site.nodes)
