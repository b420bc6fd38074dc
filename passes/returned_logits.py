"""Returned-logits pass: an LM head whose logits leave the graph, for a loss computed outside it.

torchtitan, litgpt, torchtune and hand-written loops compute the loss outside the compiled model, so
the graph ends at the head and its N x V logits are an output. In a training graph such a head
(a widening linear, then only row ops and logit ops: casts, scaling by a number, tanh soft-capping)
is taken out: the graph returns the head's input instead, with the row ops replayed on it, and
the head's weight and bias as extra outputs. The backend hands the caller a
`mst_fx.runtime.deferred_logits.DeferredLogits` in the logits' place, on which `cross_entropy` runs chunked
and anything else computes the logits once (see that module).

Before (litgpt's GPT, training, loss outside):

    lm_head = torch._C._nn.linear(x_5, l_self_modules_lm_head_parameters_weight_, None)
    return (lm_head,)

After:

    return (x_5, l_self_modules_lm_head_parameters_weight_)        # the caller gets DeferredLogits

Left as they are, with a reason: logits also used inside the graph, logits of a model in eval mode
(`mst_fx.compile`) or kept with `keep_logits=True`. Not claimed at all: inference graphs (they keep
their logits), and graphs DDP's optimizer split (the next piece of the model is a compiled graph,
not a loss; the MLP pass reports such cuts).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.deferred_logits import DeferredOutput
from mst_fx.runtime.site_options import SiteOptions

from .adapters import adapter_form, adapter_weights, refuse_random_adapter
from .chunk_count import is_symbolic, plan_site
from .graph_utils import (
    CantChunk,
    Linear,
    erase_unused,
    example_value,
    head_path,
    is_call,
    numel_hint,
    shape_of,
    size_hint,
)
from .lm_head import is_dead_pure, lift_transform, replay_row_op, walk_to_head
from .loss_forms import CASTS
from .mlp import ends_gated_mlp
from .report import SiteReport

DEFERRED = "mst_deferred_head"  # output node meta: DeferredOutput of the heads the pass took out
# Ops on the logits that a head's logits may go through (Granite's scaling, Gemma-2's soft-cap, a
# cast): an activation there would make the linear an MLP's first half, cut by a graph break.
_LOGIT_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div, torch.tanh}
_LOGIT_METHODS = {*CASTS, "mul", "div", "tanh", "__mul__", "__rmul__", "__truediv__"}


@dataclasses.dataclass
class ReturnedHead:
    head: Linear
    output: fx.Node  # the value the graph returns
    row_ops: list[fx.Node]
    transform: list[fx.Node]
    report: SiteReport


def find_returned_heads(gm: fx.GraphModule, policy: ChunkPolicy, returned_logits: str):
    """Heads to take out of a training graph, reports of those left alone and the nodes of those
    (reported here, so not the MLP pass's to report). `returned_logits` as in
    `lm_head.find_lm_head_sites`: "drop" (take them out), "keep" or "eval mode"."""
    sites, skipped, left_alone = [], [], set()
    for value in dict.fromkeys(_output_values(gm)):
        try:
            head, row_ops, transform = walk_to_head(value)
        except CantChunk:
            continue  # not logits: the MLP pass reports a widening linear that leaves otherwise
        if not _is_head(head, transform):
            continue
        report = SiteReport("lm_head", head_path(head.weight), True, logits_returned=False, loss_outside=True)
        try:
            refuse_random_adapter(head)
            _check_only_returned([*head.nodes, *row_ops, *transform])
            if returned_logits != "drop":
                why = "keep_logits=True" if returned_logits == "keep" else "the model is in eval mode"
                raise CantChunk(f"the logits leave this graph for a loss computed outside it, and {why}")
            _plan(report, head, value, policy)
        except CantChunk as why:
            report.rewritten, report.reason = False, str(why)
            skipped.append(report)
            left_alone.update(head.nodes)
            continue
        sites.append(ReturnedHead(head, value, row_ops, transform, report))
    return sites, skipped, left_alone


def _output_values(gm: fx.GraphModule) -> list[fx.Node]:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    tensors = [example_value(v) if isinstance(v, fx.Node) else None for v in values]
    return [v for v, t in zip(values, tensors) if t is not None and t.dim() >= 2 and t.is_floating_point()]


def _is_head(head: Linear, transform: list[fx.Node]) -> bool:
    """A widening linear whose output leaves the graph, and which ends no gated MLP: an MoE expert's
    down projection (I < d) is returned too when a graph break cuts the expert loop."""
    widths = shape_of(head.input), shape_of(head.out)
    widens = None not in widths and widths[1][-1] >= 2 * widths[0][-1]
    row_ops = all(is_call(op, _LOGIT_FUNCTIONS, _LOGIT_METHODS) for op in transform)
    return widens and row_ops and not ends_gated_mlp(head)


def _check_only_returned(between: list[fx.Node]) -> None:
    inside = set(between)
    for node in between:
        for user in node.users:
            if user.op != "output" and user not in inside and not is_dead_pure(user):
                raise CantChunk(f"the logits leave this graph and are also used by '{user.name}' in it")


def _plan(report: SiteReport, head: Linear, value: fx.Node, policy: ChunkPolicy) -> None:
    x, logits = shape_of(head.input), example_value(value)
    rows = logits.shape[:-1]
    report.tokens = numel_hint(rows)
    report.in_width, report.amplified_width = size_hint(x[-1]), size_hint(logits.shape[-1])
    report.itemsize = logits.element_size()
    plan_site(report, policy, is_symbolic(rows), logits.device.type)


def rewrite_returned_head(gm: fx.GraphModule, site: ReturnedHead, options: SiteOptions) -> None:
    """Return the rows in the logits' place and the head's weight (and bias) at the end."""
    graph, head = gm.graph, site.head
    (output,) = [n for n in graph.nodes if n.op == "output"]
    values = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    erase_unused([u for n in [*head.nodes, *site.row_ops, *site.transform] for u in list(n.users) if is_dead_pure(u)])
    with graph.inserting_before(output):
        rows = head.input
        for op in site.row_ops:
            rows = replay_row_op(graph, op, rows, site.report.in_width)
    params = [head.weight, head.bias, *(adapter_weights(head) or [None, None])]
    positions, extra = [], []
    for param in params:
        positions.append(None if param is None else len(values) + len(extra))
        extra += [] if param is None else [param]
    previous = output.meta.get(DEFERRED, [])
    plan = _deferred_output(site, values.index(site.output), tuple(positions), options)
    values = [rows if v is site.output else v for v in values] + extra
    output.args = (tuple(values),)
    output.meta[DEFERRED] = [*previous, plan]
    erase_unused([*site.transform, *site.row_ops, *head.nodes])


def _deferred_output(site: ReturnedHead, position: int, params: tuple, options: SiteOptions) -> DeferredOutput:
    head, logits = site.head, example_value(site.output)
    weight_dtype = example_value(head.weight).dtype
    out_dtype = example_value(head.out).dtype
    autocast_dtype = out_dtype if out_dtype != weight_dtype and out_dtype in (torch.bfloat16, torch.float16) else None
    return DeferredOutput(
        rows=position, params=params, transposed=head.transposed, adapter=adapter_form(head),
        transform=lift_transform(site.transform), dtype=logits.dtype,
        autocast_dtype=autocast_dtype, options=options, location=site.report.location,
    )  # fmt: skip


def deferred_outputs(gm: fx.GraphModule) -> tuple[list[DeferredOutput], int]:
    """The deferred heads of a rewritten graph, and how many outputs the pass appended."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    plans = output.meta.get(DEFERRED, [])
    return plans, sum(i is not None for p in plans for i in p.params)
