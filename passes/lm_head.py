"""LM-head pass: linear -> cross_entropy, rewritten into a `ChunkedLinearCrossEntropy`.

Between the head and the loss it sees through ops that act on each row of logits alone:
views/reshapes/flatten/contiguous and leading-dim slicing ("row ops", replayed on the head's
input instead) and elementwise ops with scalar arguments such as `.float()`, Granite's
`/ logits_scaling` and Gemma-2's soft-cap `tanh(x / c) * c` (the "logit transform", applied per
chunk). The labels are whatever the graph computes (HF's pad + shift included); they are untouched.

Before (HF causal LM, training):

    logits = torch._C._nn.linear(h, w_head, None)
    logits_1 = logits.float()
    logits_2 = logits_1.view(-1, 32000)
    loss = F.cross_entropy(logits_2, labels, ignore_index=-100, reduction='mean')
    return (loss, logits)

After:

    view = h.view(-1, 256)
    mst_lm_head_0 = self.mst_lm_head_0(view, w_head, None, labels)
    empty = torch.empty((0,), dtype=torch.float32, device=device(type='cpu'))
    return (mst_lm_head_0, empty)

In training the logits the model returns become that empty placeholder unless `keep_logits=True`,
which leaves the site as it is (materialising N x V logits is what the rewrite exists to avoid).
The backend hands it to the caller as a `mst_fx.runtime.dropped_logits.DroppedLogits`, which raises when
computed with, and the manager says so once at WARNING level.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_ops import ChunkedLinearCrossEntropy, CrossEntropyForm
from mst_fx.runtime.site_options import SiteOptions

from .adapters import adapter_form, adapter_weights, match_any_linear, refuse_random_adapter
from .chunk_count import is_symbolic, plan_site
from .graph_utils import (
    CantChunk,
    Linear,
    erase_unused,
    example_value,
    first_mutation_between,
    head_path,
    is_call,
    is_elementwise_of,
    numel_hint,
    shape_of,
    size_hint,
)
from .loss_forms import LossMatch, cross_entropy_calls, logits_of, match_loss, match_split_losses, match_token_losses
from .report import SiteReport

DROPPED_LOGITS = "mst_dropped_logits"  # node meta: this graph output stands for logits not computed
_ROW_METHODS = {"view", "reshape", "contiguous", "flatten"}


@dataclasses.dataclass
class LMHeadSite:
    head: Linear
    loss: LossMatch
    row_ops: list[fx.Node]  # head output -> loss input, replayed on the head's input
    transform: list[fx.Node]  # elementwise ops on the logits, applied per chunk
    logits_outputs: list[fx.Node]  # nodes of the logits the graph returns
    form: CrossEntropyForm
    report: SiteReport


def find_lm_head_sites(gm, policy: ChunkPolicy, training: bool, returned_logits: str):
    """Sites to rewrite, and reports of the cross-entropy sites left alone (with reasons).

    `returned_logits`: what to do with a site whose logits the graph returns in training: "drop"
    them, "keep" them (option keep_logits=True) or keep them because the model is in "eval mode"
    (Liger-Kernel's rule: logits are dropped only in train mode)."""
    sites, skipped = [], []
    matched = match_split_losses(gm) + match_token_losses(gm)
    claimed = {n for match in matched for n in match.inside}
    # reduction="none" keeps a loss per token: the per-token pass's (`token_head.py`), which reports it.
    calls = [n for n in cross_entropy_calls(gm) if n not in claimed and not _per_token(n)]
    for loss in sorted([*matched, *calls], key=_graph_order(gm)):
        try:
            match = loss if isinstance(loss, LossMatch) else match_loss(loss)
            site = _match_lm_head(match, training, returned_logits)
            rows = example_value(site.head.input)
            symbolic = is_symbolic(shape_of(site.loss.target))
            plan_site(site.report, policy, symbolic, rows.device.type)
            if policy == ChunkPolicy() and not symbolic:
                refuse_if_estimated_to_cost(site.report)
        except CantChunk as why:
            head = _find_head(loss)
            location = head_path(head.weight) if head else _node_of(loss).name
            skipped.append(SiteReport("lm_head", location, False, str(why)))
            continue
        sites.append(site)
    return sites, skipped


def _per_token(call: fx.Node) -> bool:
    return call.kwargs.get("reduction") == "none" or "none" in call.args[2:]


def refuse_if_estimated_to_cost(report: SiteReport) -> None:
    """Under "auto", leave alone a head the estimate says the rewrite would make costlier: the
    gradients it computes in forward, (N + V) x d, held through the backward (and scaled into new
    tensors there) outweigh the N x V logits when d is large and the logits are not returned."""
    from mst_fx.inspect.memory_estimate import estimate_site  # here: it imports this package

    memory = estimate_site(report)
    before, after = memory.kept_before + memory.added_before, memory.kept_after + memory.added_after
    if after >= before:
        raise CantChunk(
            f"the estimate says the rewrite would cost memory here ({after / 2**20:.1f} MiB against "
            f"{before / 2**20:.1f} MiB: the {report.tokens} x {report.amplified_width} logits are smaller than "
            "the gradients it would hold); set chunk_size=<int> to force"
        )


def _graph_order(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda loss: order[_node_of(loss)]


def _node_of(loss: fx.Node | LossMatch) -> fx.Node:
    return loss.loss if isinstance(loss, LossMatch) else loss


def walk_to_head(logits: fx.Node) -> tuple[Linear, list[fx.Node], list[fx.Node]]:
    """(head, row ops, elementwise ops) from the loss input back to the linear that makes it."""
    vocab = shape_of(logits)[-1]
    row_ops, transform, node = [], [], logits
    while (head := match_any_linear(node)) is None:
        if node.op == "placeholder":
            raise CantChunk("the logits come from outside this graph (a graph break before the loss)")
        if is_row_op(node, vocab):
            row_ops.append(node)
        elif is_elementwise_of(node, shape_of(node)) and single_tensor_input(node) is not None:
            transform.append(node)
        else:
            raise CantChunk(f"'{node.name}' between the LM head and the loss is not a per-row op")
        node = node.args[0] if node in row_ops else single_tensor_input(node)
        if example_value(node) is None or shape_of(node)[-1] != vocab:
            raise CantChunk(f"'{node.name}' before the loss does not keep the vocabulary dimension")
    return head, row_ops[::-1], transform[::-1]


def is_row_op(node, vocab) -> bool:
    """A reshape of leading dims, or a slice of them, that keeps each row of V logits whole."""
    shape = shape_of(node)
    if example_value(node.args[0] if node.args else None) is None or not shape or shape[-1] != vocab:
        return False
    if is_call(node, (), _ROW_METHODS):
        return True  # input and output both end in V: only the leading dims were regrouped
    if is_call(node, {operator.getitem}):
        index = _full_index(node.args[1], len(shape_of(node.args[0])))
        return (
            index is not None
            and index[-1] == slice(None)
            and all(all(isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)) for i in index)
        )
    return False


def _full_index(index, ndim: int) -> tuple[slice, ...] | None:
    """`index` as one slice per dimension: `x[:, :-1]` and `x[..., :-1, :]` are `x[:, :-1, :]` on
    3 dims (an Ellipsis stands for the dims it skips, trailing dims are whole); None for anything
    but slices (an int would drop a dim, a tensor gather rows)."""
    index = index if isinstance(index, tuple) else (index,)
    if index.count(Ellipsis) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    if len(index) > ndim:
        return None
    return index + (slice(None),) * (ndim - len(index))


def single_tensor_input(node) -> fx.Node | None:
    tensors = [a for a in node.all_input_nodes if example_value(a) is not None]
    return tensors[0] if len(tensors) == 1 else None


def _find_head(loss: fx.Node | LossMatch) -> Linear | None:
    try:
        return walk_to_head(loss.logits if isinstance(loss, LossMatch) else logits_of(loss))[0]
    except (CantChunk, TypeError, IndexError):
        return None


def _match_lm_head(match: LossMatch, training: bool, returned_logits: str) -> LMHeadSite:
    if example_value(match.logits) is None:
        raise CantChunk("cross_entropy input has no example value")
    head, row_ops, transform = walk_to_head(match.logits)
    refuse_random_adapter(head)
    transform = transform + match.casts
    form = CrossEntropyForm(match.reduction, match.ignore_index, match.label_smoothing, head.transposed, adapter_form(head))
    loss, target = match.loss, match.target
    read = [head.input, head.weight, head.bias, *adapter_weights(head)]
    mutation = first_mutation_between(head.nodes[0], loss, read)
    if mutation is not None:
        raise CantChunk(
            f"'{mutation.name}' updates the head's input or weight in place before the loss; the "
            "rewrite computes the head where the loss is and would read the updated values"
        )
    between = [*head.nodes, *row_ops, *transform]
    logits_outputs = _logits_returned(between, match.inside)
    if logits_outputs and not training:
        raise CantChunk("the logits are an output of an inference graph (nothing to save)")
    if logits_outputs and returned_logits == "keep":
        raise CantChunk("the logits are a graph output and keep_logits=True")
    if logits_outputs and returned_logits == "eval mode":
        raise CantChunk("the logits are a graph output and the model is in eval mode (logits are dropped in train mode only)")
    x_shape, logits = shape_of(head.input), example_value(head.out)
    report = SiteReport(
        "lm_head", head_path(head.weight), True,
        tokens=numel_hint(shape_of(target)), in_width=size_hint(x_shape[-1]),
        amplified_width=size_hint(logits.shape[-1]), itemsize=logits.element_size(),
        logits_returned=bool(logits_outputs),
    )  # fmt: skip
    return LMHeadSite(head, match, row_ops, transform, logits_outputs, form, report)


def _logits_returned(between: list[fx.Node], loss: list[fx.Node]) -> list[fx.Node]:
    """Nodes of the logits that the graph returns; CantChunk if anything but the loss's own nodes
    uses them (a dead pure op, such as an unused `.float()`, is no use: the rewrite erases it)."""
    returned, inside = [], set(between) | set(loss)
    for node in between:
        for user in node.users:
            if user.op == "output":
                returned.append(node)
            elif user not in inside and not is_dead_pure(user):
                raise CantChunk(f"the logits are also used by '{user.name}'")
    return returned


def is_dead_pure(node: fx.Node) -> bool:
    """Computes a value nobody reads, and does nothing else (no in-place update, no out=)."""
    if node.users or node.op not in ("call_function", "call_method") or "out" in node.kwargs:
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not (name.endswith("_") and not name.endswith("__")) and not node.is_impure()


def rewrite_lm_head_site(gm: fx.GraphModule, site: LMHeadSite, index: int, options: SiteOptions) -> None:
    between = [*site.transform, *site.row_ops, *site.head.nodes]
    erase_unused([user for node in between for user in list(node.users) if is_dead_pure(user)])
    name = f"mst_lm_head_{index}"
    widths = (site.report.in_width, site.report.amplified_width)
    head = ChunkedLinearCrossEntropy(site.form, lift_transform(site.transform), widths, options)
    gm.add_submodule(name, head)
    graph, head = gm.graph, site.head
    loss = site.loss
    with graph.inserting_before(loss.loss):
        rows, target = head.input, loss.target
        for op in site.row_ops:
            rows = replay_row_op(graph, op, rows, site.report.in_width)
        if loss.per_token:
            target = graph.call_method("squeeze", (target, -1))
        per_token_target = target
        if loss.classes_at_1 or loss.per_token:  # (B, N, d) rows and (B, N) targets, read as B*N tokens
            rows = graph.call_method("reshape", (rows, -1, site.report.in_width))
            target = graph.call_method("reshape", (target, -1))
        kwargs = {"weights": _token_weights(graph, loss.weights, per_token_target)} if loss.weights else {}
        chunked = graph.call_module(name, (rows, head.weight, head.bias, target, *adapter_weights(head)), kwargs)
        result = _scaled_as_written(graph, chunked, loss, per_token_target)
        if site.logits_outputs:
            logits = example_value(head.out)
            empty = graph.call_function(torch.empty, ((0,),), {"dtype": logits.dtype, "device": logits.device})
            empty.meta["example_value"] = logits.new_empty((0,))
            empty.meta[DROPPED_LOGITS] = True
    result.meta.update(loss.loss.meta)
    loss.loss.replace_all_uses_with(result)
    for node in site.logits_outputs:
        node.replace_all_uses_with(empty)
    erase_unused([*loss.inside, *site.transform, *site.row_ops, *head.nodes])


def _token_weights(graph: fx.Graph, masks: list[fx.Node], target: fx.Node) -> fx.Node:
    """The masks of a per-token loss multiplied together, one weight per token, flat."""
    weights = masks[0]
    for mask in masks[1:]:
        weights = graph.call_function(operator.mul, (weights, mask))
    weights = graph.call_method("expand_as", (weights, target))
    return graph.call_method("reshape", (weights, -1))


def _scaled_as_written(graph: fx.Graph, chunked: fx.Node, loss: LossMatch, target: fx.Node) -> fx.Node:
    """A per-token loss's sign and factors, and its mean's division by the token count."""
    result = chunked
    if loss.scale != 1.0:
        result = graph.call_function(operator.mul, (result, loss.scale))
    if loss.mean:
        result = graph.call_function(operator.truediv, (result, graph.call_method("numel", (target,))))
    return result


def dropped_logits_outputs(gm: fx.GraphModule) -> list[int]:
    """Positions in the graph's outputs of the placeholders for logits the rewrite did not compute."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    return [i for i, v in enumerate(values) if isinstance(v, fx.Node) and v.meta.get(DROPPED_LOGITS)]


def replay_row_op(graph: fx.Graph, op: fx.Node, rows: fx.Node, width: int) -> fx.Node:
    """The same reshape or slice on the head's input: sizes keep their leading dims, end in d.

    Always a reshape: a view that was legal on the (fresh) logits may not be on the input, which can
    be a strided slice of a bigger tensor (CPM-Ant's)."""
    if op.op == "call_method" and op.target in ("view", "reshape"):
        sizes = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], (tuple, list)) else op.args[1:]
        return graph.call_method("reshape", (rows, *sizes[:-1], width))
    return graph.create_node(op.op, op.target, (rows, *op.args[1:]), dict(op.kwargs))


def lift_transform(ops: list[fx.Node]) -> fx.GraphModule:
    """The elementwise logit ops as a one-input graph (identity when there are none)."""
    graph = fx.Graph()
    current = graph.placeholder("logits")
    for op in ops:
        tensor_in = single_tensor_input(op)
        current = graph.node_copy(op, lambda n, cur=current, src=tensor_in: cur if n is src else n)
    graph.output(current)
    return fx.GraphModule(torch.nn.Module(), graph, "LogitTransform")
