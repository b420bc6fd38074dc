"""Row-wise, proven on the structure of an expert region (`expert_region.py`): the output row of
token t must depend on token t's input rows only, or chunking the tokens would change the result.

The routing is a top-k over each token's expert scores. Inside the region, values derived from
the routing ids alone ("index" values: sort permutations, per-expert counts and offsets, one-hot
masks and their nonzero positions) may reorder and group the slots by expert, and are read only as
indices, offsets or loop bounds. Refused, each with the op named: a count along the tokens (a
`cumsum` over T or T·k slots: a token's place in its expert, the mark of a capacity limit and of
token dropping), a top-k over the tokens (expert-choice routing), a reduction or matmul across
the rows of token data, an index value used as data, and any op this module does not know.
"""

from __future__ import annotations

from torch import fx

from .expert_region import MATMULS, ExpertRegion, NotRowWise, dim_arg, is_custom_matmul, is_custom_scatter_add
from .graph_utils import shape_of, size_hint
from .row_function import op_name


def check_row_wise(region: ExpertRegion) -> None:
    """NotRowWise naming the first op that could make a token's output read another token's rows."""
    # dims of T or T·k elements are the tokens' (a top-k's k can equal T·k only when T is 1)
    slots = {region.tokens, region.tokens * region.top_k} if region.tokens > region.top_k else set()
    for node in region.nodes:
        name = op_name(node)
        if node in region.index:
            _check_index_op(node, name, slots)
        else:
            _check_data_op(node, name, region, slots)


def _check_index_op(node: fx.Node, name: str, slots: set[int]) -> None:
    shape = shape_of(node.args[0]) if node.args else None
    dim = dim_arg(node, 1)
    along = size_hint(shape[dim % len(shape)]) if shape and isinstance(dim, int) else None
    if name in ("cumsum", "cumprod") and along in slots:
        raise NotRowWise(
            f"'{node.name}' ({name}) counts along the tokens: a token's place in its expert depends on the tokens "
            "before it (a capacity limit or token dropping), so routing chunks separately would change the result"
        )
    if name == "topk" and along in slots:
        raise NotRowWise(
            f"'{node.name}' (topk) picks tokens, not experts: expert-choice routing depends on the whole batch"
        )


_DATA_OPS = {
    # casts, views and copies of each row
    "to", "float", "half", "bfloat16", "type_as", "contiguous", "clone", "view", "reshape", "flatten",
    "unsqueeze", "squeeze", "expand", "expand_as", "chunk", "split", "getitem", "repeat_interleave",
    "zeros_like", "empty_like", "ones_like", "new_zeros", "new_empty", "zeros", "empty", "detach",
    "index_select", "gather", "index_add_", "index_add", "scatter_add_", "scatter_add", "setitem",
    "masked_fill", "masked_fill_", "where", "cat", "stack", "transpose", "permute", "sum", "mean",
    "softmax", "log_softmax", "amax", "norm", "rms_norm", "layer_norm",
    # elementwise and activations
    "add", "sub", "mul", "div", "truediv", "pow", "neg", "square", "exp", "log", "sqrt", "rsqrt",
    "reciprocal", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "abs", "tanh", "sigmoid",
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "softplus", "mish",
    "hardswish", "hardsigmoid", "hardtanh", "logsigmoid", "erf", "sin", "cos", "add_", "mul_", "div_",
    "copy_", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__pow__", "__neg__", "iadd", "imul", "itruediv", "sym_size", "size",
    *MATMULS,
}  # fmt: skip
_INDEX_POSITIONS = {
    "getitem": (1,), "setitem": (1,), "index_select": (2, "index"), "gather": (2, "index"),
    "index_add_": (2, "index"), "index_add": (2, "index"), "scatter_add_": (2, "index"),
    "scatter_add": (2, "index"), "_grouped_mm": ("offs",), "grouped_mm": ("offs",),
    "repeat_interleave": (1, "repeats"), "size": (), "sym_size": (),
}  # fmt: skip
_ACROSS_ROWS = {"sum", "mean", "softmax", "log_softmax", "amax", "norm", "cumsum", "cat", "stack"}


def _check_data_op(node: fx.Node, name: str, region: ExpertRegion, slots: set[int]) -> None:
    if name not in _DATA_OPS and not is_custom_matmul(node) and not is_custom_scatter_add(node):
        raise NotRowWise(f"'{node.name}' ({name}) is not an op the expert rewrite knows to act on each token alone")
    positions = (1,) if is_custom_scatter_add(node) else _INDEX_POSITIONS.get(name, ())
    for position, arg in _arguments(node):
        if arg in region.index and position not in positions and not _is_offsets(node, arg):
            raise NotRowWise(
                f"'{node.name}' ({name}) reads '{arg.name}', computed from every token's routing, as a value "
                "(a capacity or dropping mask?): chunking the tokens would change it"
            )
    if name in _ACROSS_ROWS and _across_tokens(node, name, slots):
        raise NotRowWise(f"'{node.name}' ({name}) works across the rows of different tokens")
    if name in ("mm", "matmul", "__matmul__", "addmm", "linear") and len(node.args) >= 2:
        second = node.args[-1] if name != "linear" else node.args[1]
        if isinstance(second, fx.Node) and _depends_on_rows(second, region):
            raise NotRowWise(f"'{node.name}' ({name}) contracts over the rows of token data")


def _across_tokens(node: fx.Node, name: str, slots: set[int]) -> bool:
    """A reduction, scan or concatenation along the first dim, or along a dim of token length."""
    dim = dim_arg(node, 1)
    if dim is None:
        return True
    source = node.args[0] if name not in ("cat", "stack") else (node.args[0] or [None])[0]
    shape = shape_of(source)
    if not shape:
        return False
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(d % len(shape) == 0 or size_hint(shape[d % len(shape)]) in slots for d in dims)


def _is_offsets(node: fx.Node, arg: fx.Node) -> bool:
    return (is_custom_matmul(node) or op_name(node) in ("_grouped_mm", "grouped_mm")) and (
        node.kwargs.get("offs") is arg or arg in node.args[2:]
    )


def _arguments(node: fx.Node):
    """(position or keyword, node) for every node argument, nested ones at their top position."""
    for i, arg in enumerate(node.args):
        for inner in _flat_nodes(arg):
            yield i, inner
    for key, arg in node.kwargs.items():
        for inner in _flat_nodes(arg):
            yield key, inner


def _flat_nodes(arg):
    flat = []
    fx.node.map_arg(arg, flat.append)
    return flat


def _depends_on_rows(node: fx.Node, region: ExpertRegion) -> bool:
    inputs = set(region.rows)
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in inputs:
            return True
        if current in region.nodes:
            for arg in current.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    todo.append(arg)
    return False
