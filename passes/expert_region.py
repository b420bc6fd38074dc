"""The routed-expert computation of one mixture-of-experts layer, as a region of the graph: found
from its combine, proven row-wise in the tokens, and lifted into a function of one chunk of tokens.

Every expert implementation ends the same way: the expert outputs of the T·k (token, expert) slots
go back to their T tokens, by `index_add_`/`scatter_add` into a (T, d) buffer (loops over experts,
torchtitan) or by summing a (T, k, d) view over k (transformers' grouped_mm and batched_mm). That
combine is where the region ends. Walking back from it, the region takes every node that descends
from the router's top-k (over the expert dim: one choice per token) and stops at

    row inputs     tensors with T rows that the routing does not compute: the hidden states, the
                   router's scores (DeepSeek gathers its weights from them), a shared expert's
                   output that the combine adds into; and the top-k's own values and indices
    whole inputs   parameters and buffers (the experts' stacked weights, or one weight per expert)

Row-wise: `dispatch_rules.py` proves it before anything is chunked.

Lifting (`lift_region`): the region as a graph of (row inputs..., whole inputs...) -> output,
where every size of the traced token count (T, T·k, ...) that sets a leading dim (`view(T, k, d)`,
`arange(T·k)`) is recomputed from the chunk's rows, so one lifted graph serves any chunk length.
Under dynamic shapes those sizes are symbolic: a size placeholder the region reads must be a
multiple of T, and is recomputed from the chunk the same way. `check_lift` runs the lifted graph
on fake tensors of another length and compares the output's shape.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx

from .graph_utils import CantChunk, example_value, module_path, mutated_tensor, shape_of, size_hint
from .row_function import op_name


class NotRowWise(CantChunk):
    """An op of the region that makes a token's output depend on other tokens; the message says which."""


@dataclasses.dataclass
class ExpertRegion:
    combines: list[fx.Node]  # the combine nodes (several: one index_add_ per expert of a loop)
    output: fx.Node  # the node whose value is the region's result (a combine, or the buffer it fills)
    topk: fx.Node
    nodes: list[fx.Node]  # graph order
    rows: list[fx.Node]  # row inputs (T leading rows)
    whole: list[fx.Node]  # parameters, buffers
    tokens: int  # T
    top_k: int
    experts: int
    index: set[fx.Node] = dataclasses.field(default_factory=set)  # nodes computed from routing ids alone
    # symbolic sizes the region reads (dynamic shapes), each a multiple of T: node -> multiple
    sizes: dict[fx.Node, int] = dataclasses.field(default_factory=dict)


_TOPK = {torch.topk}
_INDEX_ADD = {"index_add_", "index_add", "scatter_add_", "scatter_add"}
MATMULS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "_grouped_mm", "grouped_mm", "einsum", "__matmul__"}


def routing_topks(gm: fx.GraphModule) -> list[fx.Node]:
    """Top-k calls on tensors of two dims or more: candidate routers (which dim they pick along
    is judged against the token count in `collect_region`)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _TOPK or node.op == "call_method" and node.target == "topk":
            if len(shape_of(node.args[0]) or ()) >= 2:
                found.append(node)
    return found


def _picks_per_token(topk: fx.Node, tokens: int) -> bool:
    """A top-k along the last dim of a tensor with one row per token: each token picks its experts."""
    shape = shape_of(topk.args[0])
    dim = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1)
    return isinstance(dim, int) and dim % len(shape) == len(shape) - 1 and _token_rows(example_value(topk.args[0])) == tokens


def combine_groups(gm: fx.GraphModule, topks: list[fx.Node]) -> list[tuple[list[fx.Node], fx.Node, list[fx.Node]]]:
    """(combines, output, their top-ks) per candidate region, in graph order: combines fed by
    slots that descend from a routing top-k and from a matmul of them."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    routed = _descendants(topks)
    first = min((order[t] for t in topks), default=len(order))
    matmuls = [n for n in gm.graph.nodes if order[n] > first and (op_name(n) in MATMULS or is_custom_matmul(n))]
    after_matmul = _descendants(matmuls) & routed
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node not in after_matmul:
            continue
        name = op_name(node)
        if is_custom_scatter_add(node):  # torchtitan's deterministic_scatter_add(out, index, src)
            groups[node] = [node]
        elif name in _INDEX_ADD and dim_arg(node, 1) == 0:
            buffer = node.args[0]
            if name.endswith("_"):
                groups.setdefault(buffer, []).append(node)
            else:
                groups[node] = [node]
        elif name == "sum" and _is_sum_over_slots(node):
            groups[node] = [node]
    result, previous = [], -1
    for output, combines in sorted(groups.items(), key=lambda item: order[item[1][-1]]):
        mine = [t for t in topks if previous < order[t] < order[combines[0]] and _feeds(t, combines[-1])]
        if mine:
            result.append((combines, output, mine))
        previous = order[combines[-1]]
    return result


def unmatched_routings(gm: fx.GraphModule, topks: list[fx.Node], used: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(top-k, the first matmul it feeds) for routings per token that reach, within a few ops, a
    matmul with stacked expert weights (a parameter of E x ... for E choices), but ended in no
    combine found: expert layers in a form the pass does not take."""
    found = []
    for topk in topks:
        rows = _token_rows(example_value(topk.args[0]))
        if topk in used or rows is None or rows <= 1 or not _picks_per_token(topk, rows):
            continue
        matmul = _first_expert_matmul_after(topk, size_hint(shape_of(topk.args[0])[-1]))
        if matmul is not None:
            found.append((topk, matmul))
    return found


def _first_expert_matmul_after(start: fx.Node, experts: int, limit: int = 40) -> fx.Node | None:
    todo, seen = list(start.users), 0
    while todo and seen < limit:
        node = todo.pop(0)
        seen += 1
        if (op_name(node) in MATMULS or is_custom_matmul(node)) and any(_stacked_weights(a, experts) for a in node.all_input_nodes):
            return node
        todo.extend(node.users)
    return None


def _stacked_weights(node: fx.Node, experts: int, hops: int = 3) -> bool:
    """A graph input of shape (E, ...) reached through a few views or casts: one weight per expert."""
    for _ in range(hops):
        value = example_value(node)
        if node.op in ("placeholder", "get_attr"):
            return value is not None and value.dim() >= 3 and size_hint(value.shape[0]) == experts
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def collect_region(combines: list[fx.Node], output: fx.Node, topks: list[fx.Node]) -> ExpertRegion:
    """The region ending in `combines` (see the module docstring); CantChunk when it reads a tensor
    that is neither per token nor a parameter."""
    tokens = _rows(example_value(output)) or 0
    per_token = [t for t in topks if _picks_per_token(t, tokens)]
    if not per_token:
        raise _not_per_token(topks[-1], tokens)
    topks, topk = per_token, per_token[-1]
    picks = {u for t in topks for u in t.users}
    routed = _descendants(topks) - picks - set(topks)
    region, rows, whole, todo, sizes = set(combines), [], [], list(combines), {}
    if output not in region and output not in routed:
        rows.append(output)  # the buffer the combine fills: zeros, or a shared expert's output
    while todo:
        _walk_back(todo, region, rows, whole, sizes, picks, routed, tokens)
        todo = sorted(_mutations_of(region) - region, key=lambda n: n.name)  # in-place updates reach no fx edge
        region.update(todo)
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    experts = shape_of(topk.args[0])[-1]
    top_k = size_hint(shape_of(topk)[-1]) if shape_of(topk) else size_hint(shape_of(next(iter(topk.users)))[-1])
    found = ExpertRegion(
        combines, output, topk, nodes, sorted(rows, key=order.__getitem__), whole, tokens, top_k, size_hint(experts),
        sizes=sizes,
    )  # fmt: skip
    found.index = _index_nodes(found)
    return found


def _not_per_token(topk: fx.Node, tokens: int) -> CantChunk:
    """Why a top-k is no routing the pass can cut: batched (B, N, E) scores, or expert-choice."""
    shape = [size_hint(d) for d in shape_of(topk.args[0])]
    if len(shape) >= 3 and math.prod(shape[:-1]) == tokens:
        return CantChunk(
            f"'{topk.name}' (topk) routes each token, but over scores laid out {tuple(shape)}: the rewrite takes "
            "per-token rows as (T, ...) or (1, T, ...), not a batch of several sequences"
        )
    if shape[-1] in (tokens, tokens * 2) or len(shape) >= 2 and math.prod(shape[1:]) == tokens:
        return NotRowWise(
            f"'{topk.name}' (topk) picks along the tokens, not each token's experts (expert-choice routing): "
            "which tokens an expert takes depends on the whole batch"
        )
    return CantChunk(
        f"'{topk.name}' (topk) picks from scores laid out {tuple(shape)}, which don't have one row for each "
        f"of the {tokens} rows the experts' output is combined into"
    )


def unrouted_expert_weights(gm: fx.GraphModule, reported: list[str]) -> dict[str, tuple[fx.Node, int]]:
    """Stacked expert weights (a graph input of three dims or more, one slice per expert) that a
    matmul uses, in modules no expert site was reported for: module -> (the matmul, E)."""
    found = {}
    for node in gm.graph.nodes:
        if not (op_name(node) in MATMULS or is_custom_matmul(node)):
            continue
        for weight in filter(None, (stacked_input(a) for a in node.all_input_nodes)):
            owner = module_path(weight)
            if not any(owner.startswith(r) or r.startswith(owner) for r in reported):
                found.setdefault(owner, (node, size_hint(example_value(weight).shape[0])))
    return found


def stacked_input(node: fx.Node, hops: int = 3) -> fx.Node | None:
    """The graph input of three dims or more (one slice per expert) `node` is, or is a view or
    cast of, within a few ops; None otherwise."""
    for _ in range(hops):
        if node.op in ("placeholder", "get_attr"):
            value = example_value(node)
            return node if value is not None and value.dim() >= 3 and size_hint(value.shape[0]) > 1 else None
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _walk_back(todo, region, rows, whole, sizes, picks, routed, tokens) -> None:
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            if arg in region or arg in rows or arg in whole or arg in sizes:
                continue
            size = _symbolic_size(arg)
            if size is not None and arg.op == "placeholder":
                if size % tokens:
                    raise CantChunk(f"the expert computation reads the size '{arg.name}' ({size}), not a multiple of its {tokens} tokens")
                sizes[arg] = size // tokens  # a token count: recomputed from each chunk
                continue
            value = example_value(arg)
            made_here = op_name(arg) in _FACTORIES and value is not None and not value.is_floating_point()
            if arg in picks or (arg not in routed and not made_here and value is not None and _token_rows(value) == tokens):
                rows.append(arg)
            elif arg.op in ("placeholder", "get_attr") and value is not None:
                whole.append(arg)
            elif arg.op == "placeholder":
                raise CantChunk(f"the expert computation reads '{arg.name}', a size or value from outside it")
            else:
                if arg not in routed and not made_here and _reads_tokens_elsewhere(arg, tokens) and not _from_weights(arg):
                    raise CantChunk(f"the expert computation reads '{arg.name}', which is not one row per token")
                region.add(arg)
                todo.append(arg)


def lift_region(region: ExpertRegion) -> fx.GraphModule:
    """(row inputs..., whole inputs...) -> output, with token sizes recomputed from the chunk."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(region.rows):
        env[node] = graph.placeholder(f"row_{i}")
        if is_batch_of_one(example_value(node)):
            env[node] = graph.call_method("unsqueeze", (env[node], 0))
    for i, node in enumerate(region.whole):
        env[node] = graph.placeholder(f"whole_{i}")
    first_row = next(n for n in graph.nodes if n.op == "placeholder")
    chunk_tokens = graph.call_function(operator.getitem, (graph.call_method("size", (first_row,)), 0))
    for node, multiple in region.sizes.items():
        env[node] = chunk_tokens if multiple == 1 else graph.call_function(operator.mul, (chunk_tokens, multiple))
    for row in region.rows:
        if region.output is row or any(mutated_tensor(n) is row for n in region.nodes):
            env[row] = graph.call_method("clone", (env[row],))  # the region updates it in place
    for node in region.nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        args = _with_chunk_sizes(node, args, region.tokens, chunk_tokens, graph)
        env[node] = graph.create_node(node.op, node.target, args, kwargs)
        if _made_without_grad(node):  # under no_grad, or detached, in the model: so in the region
            env[node] = graph.call_method("detach", (env[node],))
    graph.output(env[region.output])
    return fx.GraphModule(torch.nn.Module(), graph, "ExpertRegion")


def check_lift(lifted: fx.GraphModule, region: ExpertRegion) -> None:
    """Run the lifted region on fake tensors with another token count; CantChunk if a shape does
    not follow (a size that sets a token dim was not recognised as one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tokens = region.tokens
    other = tokens - 1 if tokens > 2 else tokens + 1
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # a shape environment, so that a dispatch with data-dependent sizes (nonzero) gets unbacked ones
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()) as mode:
        inputs = [_fake_with_rows(_flat_rows(example_value(n)), other, tokens, mode) for n in region.rows]
        inputs += [mode.from_tensor(example_value(n)) for n in region.whole]
        try:
            out = lifted(*inputs)
        except Exception as error:
            raise CantChunk(f"the expert computation's sizes don't follow a chunk of tokens ({type(error).__name__})") from None
    expected = _rescaled(shape_of(region.output), tokens, other)
    if tuple(out.shape) != expected:
        raise CantChunk(f"the expert computation's output is {tuple(out.shape)} for {other} tokens, not {expected}")


def slot_bytes(region: ExpertRegion) -> tuple[int, int]:
    """(elements per token, itemsize) of the region's largest tensor: what one chunk holds per token."""
    best, itemsize = 0, 4
    for node in region.nodes:
        value = example_value(node)
        if value is None or not value.is_floating_point() or value.dim() == 0:
            continue
        per_token = value.numel() // max(1, region.tokens) if _rows(value) in (region.tokens, region.tokens * region.top_k) else 0
        if per_token * value.element_size() > best * itemsize:
            best, itemsize = per_token, value.element_size()
    return best, itemsize


def kept_bytes_per_token(region: ExpertRegion) -> int:
    """Bytes per token of the region's token-sized intermediates, views left out: at least what
    keeping the region's autograd graph for backward holds, since it saves some of them."""
    total = 0
    for node in region.nodes:
        value = example_value(node)
        if isinstance(value, torch.Tensor) and not value._is_view():
            if _rows(value) in (region.tokens, region.tokens * region.top_k):
                total += value.numel() * value.element_size()
    return -(-total // max(1, region.tokens))


# ---------------------------------------------------------------- helpers


def _descendants(starts) -> set[fx.Node]:
    seen, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _feeds(source: fx.Node, target: fx.Node, limit: int = 5000) -> bool:
    seen, todo = set(), [target]
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is source:
            return True
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return False


def _token_rows(value) -> int | None:
    """Rows of a per-token tensor: its first dim, or the second of a (1, T, ...) batch of one
    (torchtitan's router works on (B, L, E) scores)."""
    rows = _rows(value)
    if rows == 1 and value.dim() >= 3:
        return _rows(value[0])
    return rows


def is_batch_of_one(value) -> bool:
    """(1, T, ...): passed to the chunked site as (T, ...) rows, seen by the region as (1, c, ...)."""
    return value.dim() >= 3 and _rows(value) == 1 and _rows(value[0]) != 1


def _rows(value) -> int | None:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    try:
        return size_hint(value.shape[0])
    except CantChunk:
        return None


def _reads_tokens_elsewhere(node: fx.Node, tokens: int) -> bool:
    """A tensor whose shape holds the token count in a dim other than the first: a (B, N, d) view
    of the hidden states, say, which the region can't cut by rows."""
    value = example_value(node)
    if value is None or value.dim() < 2 or tokens <= 1:
        return False
    return any(size_hint(s) == tokens for s in value.shape[1:]) and _rows(value) != tokens


def _made_without_grad(node: fx.Node) -> bool:
    value = example_value(node)
    if value is None or not value.is_floating_point() or value.requires_grad:
        return False
    return any(getattr(example_value(a), "requires_grad", False) for a in node.all_input_nodes)


def _symbolic_size(node: fx.Node) -> int | None:
    """The hint of a node whose value is a symbolic int (a dynamic size), else None."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    return None


def _from_weights(node: fx.Node, limit: int = 8) -> bool:
    """Computed from graph inputs alone through a few ops (a weight's cast and transpose)."""
    todo, seen = [node], 0
    while todo:
        current = todo.pop()
        seen += 1
        if seen > limit:
            return False
        if current.op in ("placeholder", "get_attr"):
            continue
        if current.op not in ("call_function", "call_method") or not current.all_input_nodes:
            return False
        todo.extend(current.all_input_nodes)
    return True


def dim_arg(node: fx.Node, position: int):
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    if len(node.args) > position and isinstance(node.args[position], (int, tuple, list)):
        dim = node.args[position]
        return dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    return None


def _is_sum_over_slots(node: fx.Node) -> bool:
    """`view(T, k, d).sum(dim=1)`: the k expert outputs of each token added up."""
    source = node.args[0] if node.args else None
    shape = shape_of(source)
    return shape is not None and len(shape) == 3 and dim_arg(node, 1) in (1, -2)


def is_custom_matmul(node: fx.Node) -> bool:
    """A library's grouped matmul as a custom op (transformers' `grouped_mm_fallback`)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket | torch._ops.OpOverload) and "grouped_mm" in str(node.target) and "backward" not in str(node.target)


def is_custom_scatter_add(node: fx.Node) -> bool:
    """A library's scatter-add along rows as a custom op: (out, index, src) -> out + scattered src."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket | torch._ops.OpOverload) and "scatter_add" in str(node.target)


def _index_nodes(region: ExpertRegion) -> set[fx.Node]:
    """Nodes computed from the routing ids alone (and constants): the top-k indices and what the
    dispatch derives from them."""
    ids = {u for u in region.topk.users if op_name(u) == "getitem" and u.args[1] == 1}
    index = set(ids)
    for node in region.nodes:
        tensors = [a for a in node.all_input_nodes if example_value(a) is not None]
        value = example_value(node)
        integral = value is not None and not value.is_floating_point()
        if tensors and all(a in index for a in tensors) or integral and (not tensors or op_name(node) in _FACTORIES):
            index.add(node)
    return index


_FACTORIES = {"zeros_like", "empty_like", "ones_like", "full_like", "new_zeros", "new_empty", "new_ones", "new_full"}


def _mutations_of(region: set[fx.Node]) -> set[fx.Node]:
    """In-place updates of a region tensor (`inv_perm[perm] = arange`), which no fx edge leads to."""
    found = set()
    for node in list(region):
        for user in node.users:
            if user not in region and mutated_tensor(user) is node:
                found.add(user)
    return found


_SIZE_ARGS = {"view", "reshape", "expand", "new_zeros", "new_empty", "new_ones", "zeros", "empty", "ones", "arange", "full", "new_full"}


def _with_chunk_sizes(node: fx.Node, args: tuple, tokens: int, chunk_tokens: fx.Node, graph: fx.Graph) -> tuple:
    """`args` (the node's, mapped into the lifted graph) with a leading size that is a multiple of
    the token count T replaced by the same multiple of the chunk's token count."""
    args = list(args)
    if op_name(node) not in _SIZE_ARGS:
        return tuple(args)
    sizes_at = 1 if node.op == "call_method" else 0
    if op_name(node) == "arange":
        sizes_at = 0
    if len(args) <= sizes_at:
        return tuple(args)
    sizes = args[sizes_at:] if not isinstance(args[sizes_at], (tuple, list)) else list(args[sizes_at])
    packed = isinstance(args[sizes_at], (tuple, list))
    first = sizes[0]
    if isinstance(first, int) and first >= tokens and first % tokens == 0:
        multiple = first // tokens
        sizes = list(sizes)
        sizes[0] = chunk_tokens if multiple == 1 else graph.call_function(operator.mul, (chunk_tokens, multiple))
    if packed:
        args[sizes_at] = tuple(sizes)
    else:
        args[sizes_at:] = sizes
    return tuple(args)


def _rescaled(shape, tokens: int, other: int) -> tuple:
    if not shape:
        return tuple(shape)
    first = size_hint(shape[0])
    lead = first // tokens * other if first % tokens == 0 else first
    return (lead, *(size_hint(s) for s in shape[1:]))


def _flat_rows(value: torch.Tensor) -> torch.Tensor:
    return value[0] if is_batch_of_one(value) else value


def _fake_with_rows(value: torch.Tensor, rows: int, tokens: int, mode):
    shape = _rescaled(tuple(value.shape), tokens, rows)
    with mode:
        if value.is_floating_point():
            return torch.empty(shape, dtype=value.dtype, device=value.device)
        return torch.zeros(shape, dtype=value.dtype, device=value.device)
