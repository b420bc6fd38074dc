"""What the passes share: reading Dynamo graphs (linears in their forms, elementwise chains, shapes,
parameter names) and the `CantChunk` exception a matcher raises to leave a site alone with a reason.

The graphs are Dynamo's: torch-level calls (`torch._C._nn.linear`, `F.silu`, `operator.mul`,
`.view`, ...) with a FakeTensor in `node.meta["example_value"]`, parameters as placeholders.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import operator
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor


class CantChunk(Exception):
    """A site the passes understand in part but can't rewrite safely; the message says why."""


def example_value(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node) -> tuple | None:
    value = example_value(node)
    return None if value is None else tuple(value.shape)


def size_hint(size) -> int:
    """An int for a possibly symbolic size, without installing a guard on it."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            raise CantChunk("a token dimension has no size hint (unbacked symbolic size)")
        return int(hint)
    return int(size)


def numel_hint(shape) -> int:
    n = 1
    for s in shape:
        n *= size_hint(s)
    return n


def is_call(node, targets, methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


_LINEAR_FNS = {torch._C._nn.linear, F.linear}
_VIEW_METHODS = {"view", "reshape"}


@dataclasses.dataclass
class Linear:
    """One linear layer as it appears in the graph: `out = input @ W.T + b` (or `input @ W + b`)."""

    out: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool  # W stored (in, out): GPT-2's Conv1D as addmm around views
    nodes: list[fx.Node]  # every node that makes up the layer, input excluded


def match_linear(node) -> Linear | None:
    """`F.linear(x, W, b)`, Falcon's `x @ W.T`, or Conv1D's `addmm(b, x.view(-1, d), W).view(*lead, out)`."""
    if is_call(node, _MATMUL_FNS) and len(node.args) == 2 and not node.kwargs:
        x, weight_t = node.args
        weight = _transposed_weight(weight_t)
        if weight is None or len(weight_t.users) != 1 or len(shape_of(x) or ()) < 2:
            return None
        return Linear(node, x, weight, None, False, [weight_t, node])
    if is_call(node, _LINEAR_FNS):
        args = list(node.args) + [None] * 3
        x, weight = args[0], node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if isinstance(x, fx.Node) and isinstance(weight, fx.Node) and _is_tensor_or_none(bias):
            return Linear(node, x, weight, bias, False, [node])
        return None
    if is_call(node, (), _VIEW_METHODS) and is_call(node.args[0], {torch.addmm}):
        addmm = node.args[0]
        flat = addmm.args[1] if len(addmm.args) > 2 else None
        if addmm.kwargs or len(addmm.users) != 1 or not is_call(flat, (), _VIEW_METHODS):
            return None
        if len(flat.users) != 1:
            return None
        return Linear(node, flat.args[0], addmm.args[2], addmm.args[0], True, [flat, addmm, node])
    return None


_MATMUL_FNS = {operator.matmul, torch.matmul}


# `W.T` and `W.mT` as Dynamo writes them since torch 2.15 (before: getattr(W, "T")).
_ATEN_TRANSPOSES = {
    op for name in ("numpy_T", "mT") if (packet := getattr(torch.ops.aten, name, None)) is not None
    for op in (packet, getattr(packet, "default", packet))
}  # fmt: skip


def _transposed_weight(node) -> fx.Node | None:
    """W for `W.T`, `W.t()` or `W.transpose(0, 1)` of a 2-D W; None for anything else."""
    if not isinstance(node, fx.Node) or len(node.args) < 1 or len(shape_of(node.args[0]) or ()) != 2:
        return None
    is_t = (
        (is_call(node, {getattr}) and node.args[1:] in (("T",), ("mT",)))
        or (is_call(node, _ATEN_TRANSPOSES) and len(node.args) == 1)
        or (is_call(node, {torch.t}, ("t",)) and len(node.args) == 1)
        or (
            is_call(node, {torch.transpose}, ("transpose",))
            and set(node.args[1:]) in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1})
        )
    )
    return node.args[0] if is_t else None


def _is_tensor_or_none(x) -> bool:
    return x is None or example_value(x) is not None


# Ops that act on each element independently (given scalar extra arguments). Random ones such as
# dropout are left out on purpose: a recompute would draw a different mask.
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.square,
    torch.tanh, torch.sigmoid, torch.exp, torch.erf, torch.relu, torch.abs, torch.clamp,
    torch.sqrt, torch.rsqrt, torch.sin, torch.cos, torch.log1p,
    F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.sigmoid, F.tanh,
    F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.logsigmoid, F.softsign,
    torch._C._nn.gelu, torch._C._nn.silu, torch._C._nn.hardswish, torch._C._nn.softplus,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "square", "tanh", "sigmoid", "exp", "erf", "relu",
    "abs", "clamp", "sqrt", "rsqrt", "float", "half", "bfloat16", "to", "type",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__pow__",
}  # fmt: skip


def _node_args(node: fx.Node) -> list:
    flat = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return [a for a in flat if isinstance(a, fx.Node)]


def is_elementwise_of(node: fx.Node, shape: tuple) -> bool:
    """An elementwise op whose output has `shape` and whose other arguments are scalars."""
    if not (is_call(node, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS) or is_inactive_dropout(node)):
        return False
    return shape_of(node) == shape


_DROPOUT_FNS = {F.dropout, torch.dropout}
_DROPOUT_SIGNATURE = inspect.signature(lambda input, p=0.5, training=True, inplace=False: None)


def is_inactive_dropout(node) -> bool:
    """Dropout with p == 0 or not training: the identity, so a recompute gives the same values.
    (Configs that turn dropout off still leave `F.dropout(h, p=0.0, training=True)` in the graph.)"""
    if not is_call(node, _DROPOUT_FNS):
        return False
    try:
        bound = _DROPOUT_SIGNATURE.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return False
    p, training, inplace = bound.get("p", 0.5), bound.get("training", True), bound.get("inplace", False)
    return not inplace and (p == 0 or training is False)


def elementwise_chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The elementwise nodes computing `end` from `start` alone, in graph order.

    Raises CantChunk when `end` depends on another tensor or passes a non-elementwise op.
    """
    if end is start:
        return []
    shape, chain, todo = shape_of(start), {}, [end]
    while todo:
        node = todo.pop()
        if node is start or node in chain:
            continue
        if not is_elementwise_of(node, shape):
            raise CantChunk(f"'{node.name}' ({_describe(node)}) between the linears is not an elementwise op")
        chain[node] = None
        for arg in _node_args(node):
            if example_value(arg) is None:
                raise CantChunk(f"'{node.name}' takes a non-constant argument '{arg.name}'")
            todo.append(arg)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def lift_chain(start: fx.Node, chain: list[fx.Node], name: str) -> fx.GraphModule:
    """A one-input GraphModule that replays `chain` on its input (which stands for `start`)."""
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}
    for node in chain:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[chain[-1]] if chain else env[start])
    return fx.GraphModule(torch.nn.Module(), graph, name)


_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor,
}  # fmt: skip


def mutated_tensor(node: fx.Node):
    """The tensor argument `node` updates in place (`x.mul_(2)`, `x += y`, `x[i] = v`,
    `F.relu(x, inplace=True)`, `torch.add(a, b, out=x)`), or None."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return node.kwargs.get("out")
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    trailing_underscore = name.endswith("_") and not name.endswith("__")
    if name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or trailing_underscore:
        return node.args[0]
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return node.args[0]
    return node.kwargs.get("out")


def first_mutation_between(first: fx.Node, last: fx.Node, read: list) -> fx.Node | None:
    """The first node after `first` and before `last` that updates in place a tensor sharing
    storage with one of `read` (views included), or None. A rewrite that moves the reading of
    `read` from `first` to `last` would read the updated values."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(value):
        tensor = example_value(value)
        try:
            return None if tensor is None else StorageWeakRef(tensor.untyped_storage())
        except (NotImplementedError, RuntimeError):  # no storage to compare: assume it may alias
            return "unknown"

    def may_alias(a, b) -> bool:
        return isinstance(a, str) or isinstance(b, str) or a == b

    watched = {storage(n) for n in read if isinstance(n, fx.Node)} - {None}
    node = first.next
    while node is not last and node.op != "output":
        target = mutated_tensor(node)
        mutated = storage(target) if isinstance(target, fx.Node) else None
        if mutated is not None and any(may_alias(mutated, w) for w in watched):
            return node
        node = node.next
    return None


def grad_enabled_at(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether gradients are on where `node` runs: the compile's grad mode, as the graph's own
    `_set_grad_enabled` calls (Dynamo's `with torch.no_grad():` blocks) leave it."""
    enabled = torch.is_grad_enabled()
    for current in gm.graph.nodes:
        if current.op == "call_function" and current.target is torch._C._set_grad_enabled:
            enabled = bool(current.args[0])
        if current is node:
            break
    return enabled


def only_used_by(nodes, allowed) -> fx.Node | None:
    """The first user of any of `nodes` outside `nodes` and `allowed`, or None."""
    inside = set(nodes) | set(allowed)
    for node in nodes:
        for user in node.users:
            if user not in inside:
                return user
    return None


def erase_unused(nodes) -> None:
    """Erase `nodes` (now dead), users before their inputs."""
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if nodes else {}
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            node.graph.erase_node(node)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of `gm`'s graph; submodules and parameters are shared, not copied.
    What Dynamo marks on the graph and its inputs goes with it: DDP's optimizer reads it."""
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    copy = fx.GraphModule(gm, graph, gm.__class__.__name__)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for node, new in copies.items():
        if hasattr(node, "_dynamo_source"):
            new._dynamo_source = node._dynamo_source
    return copy


_PATH_SEPARATOR = re.compile(r"(?:^|_)(?:modules|parameters|buffers)_")

# While the passes run on one Dynamo graph: its parameter placeholders' names in the module the user
# compiled, keyed by placeholder name in lower case (see `names_in_compiled_module`).
_compiled_names: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("mst_compiled_names", default={})
# The same, for weights shared by an embedding and another module (a tied LM head): placeholder ->
# (the other module's path, the embedding's path).
_tied_heads: contextvars.ContextVar[dict[str, tuple[str, str]]] = contextvars.ContextVar("mst_tied_heads", default={})


def parameter_path(node) -> str:
    """`model.layers.0.mlp.gate_proj.weight`: the parameter's name in the module the user compiled
    when it is known (`names_in_compiled_module`), else read from Dynamo's placeholder name, which is
    relative to the traced frame's `self`."""
    if not isinstance(node, fx.Node):
        return "?"
    if node.op == "get_attr":
        return str(node.target)
    name = _compiled_names.get().get(str(node.target).lower())
    return without_wrappers(name) if name else _path_in_frame(node)


def _path_in_frame(node: fx.Node) -> str:
    # Outer graphs name it `L_self_modules_..._weight_` (`L_args_0_modules_...` when the traced frame
    # is a decorator's wrapper, whose first argument is the module), checkpoint bodies `l_self_...`.
    # A module reached through `__dict__` (PEFT's `__getattr__`) adds `dict_`: `base_model_dict_modules_model`.
    name = re.sub(r"^[Ll]_(self_|args_0_)?", "", str(node.target)).rstrip("_")
    name = _THROUGH_DICT.sub("", name)
    return without_wrappers(".".join(p for p in _PATH_SEPARATOR.split(name) if p) or name)


_THROUGH_DICT = re.compile(r"(?:^|(?<!modules)(?<!parameters)(?<!buffers)_)dict(?=_(?:modules|parameters|buffers)_)")
# Modules that wrap the user's module under a name of their own: torch.distributed's checkpoint
# wrapper, torch.compile's and FSDP1's. Users name the module inside by the wrapper's own path.
_WRAPPERS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def without_wrappers(path: str) -> str:
    """`layers.0._checkpoint_wrapped_module.feed_forward` -> `layers.0.feed_forward`."""
    return ".".join(p for p in path.split(".") if p not in _WRAPPERS and "_" + p not in _WRAPPERS)


def module_path(*weights) -> str:
    """The module that owns a site: for one weight its layer, for several their common parent."""
    drop = 1 if len(weights) == 1 else 2  # "lm_head.weight" -> lm_head; "mlp.up.weight" -> mlp
    owners = [parameter_path(w).split(".")[:-drop] for w in weights]
    return ".".join(os.path.commonprefix(owners)) or "<graph>"


def head_path(weight) -> str:
    """An LM head's module. A head tied to an embedding reads `lm_head (tied to model.embed_tokens)`:
    Dynamo names a tied weight once, after its first use, which is the embedding's."""
    tied = _tied_heads.get().get(str(getattr(weight, "target", "")).lower())
    return f"{tied[0]} (tied to {tied[1]})" if tied else module_path(weight)


def qualified_module_path(graph: fx.Graph, frame_path: str) -> str:
    """`frame_path`, a module's path relative to the traced frame (`self_attn` in a layer's frame),
    with the prefix the module the user compiled gives it (`model.layers.3.self_attn`), read off a
    parameter of that module among the graph's placeholders; `frame_path` itself when none is there."""
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        in_frame = _path_in_frame(node)
        if in_frame.startswith(frame_path + "."):
            full = parameter_path(node)
            if full.endswith(in_frame):
                return full[: len(full) - len(in_frame)] + frame_path
    return frame_path


@contextlib.contextmanager
def names_in_compiled_module(gm: fx.GraphModule, example_inputs):
    """Within it, `parameter_path` names `gm`'s parameters (and those of the checkpoint bodies it
    calls) as the module the user compiled names them.

    Dynamo names a placeholder after the traced frame's `self`. When that frame is one layer's
    forward, as under FSDP2 (its hooks break the graph at every sharded module) or when each block
    is compiled on its own, that drops the layer's prefix: `mlp.gate_proj.weight`, not
    `model.layers.1.mlp.gate_proj.weight`. The example inputs are the parameters themselves, so
    their names are looked up by identity in the outermost module being called (which is on the
    Python stack while Dynamo compiles). A name is only taken when it agrees with Dynamo's (one ends
    with the other), so a lookup can add a prefix or drop a wrapper's, never rename a parameter.
    """
    names, tied = _names_by_placeholder(gm, example_inputs)
    token, tied_token = _compiled_names.set(names), _tied_heads.set(tied)
    try:
        yield
    finally:
        _compiled_names.reset(token)
        _tied_heads.reset(tied_token)


def _names_by_placeholder(gm: fx.GraphModule, example_inputs) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    root = _outermost_module_on_stack()
    if root is None:
        return {}, {}
    names: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):  # tied weights: every name
        names.setdefault(id(param), []).append(name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found, tied = {}, {}
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            continue
        in_frame = _path_in_frame(node)
        agreeing = [n for n in names.get(id(value), ()) if _agree(without_wrappers(n), in_frame)]
        if agreeing:
            # A checkpoint body names the same parameter with the outer name in lower case.
            found[str(node.target).lower()] = agreeing[0]
            pair = _head_and_embedding(root, names[id(value)])
            if pair is not None:
                tied[str(node.target).lower()] = pair
    return found, tied


def _head_and_embedding(root: torch.nn.Module, names: list[str]) -> tuple[str, str] | None:
    """(the other module, the embedding) for a weight an embedding shares with one other module."""
    owners = [name.rpartition(".")[0] for name in names]
    if len(owners) != 2:
        return None
    embedding = [isinstance(root.get_submodule(o), torch.nn.Embedding) for o in owners]
    if embedding.count(True) != 1:
        return None
    other, embed = (owners[1], owners[0]) if embedding[0] else (owners[0], owners[1])
    return without_wrappers(other), without_wrappers(embed)


def _agree(name: str, in_frame: str) -> bool:
    """`model.layers.1.mlp.up.weight` and `mlp.up.weight`, or `blocks.0.up.weight` and DDP's
    `module.blocks.0.up.weight`: one is the other with a prefix."""
    return name == in_frame or name.endswith("." + in_frame) or in_frame.endswith("." + name)


def _outermost_module_on_stack() -> torch.nn.Module | None:
    """The outermost `nn.Module` whose method is running: the model the user called, unwrapped from
    torch.compile's `OptimizedModule` and DDP, whose prefixes (`_orig_mod.`, `module.`) the user never
    wrote. None when no module is running (a graph compiled directly)."""
    outermost, frame = None, sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":  # read locals only where `self` may be
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, torch.nn.Module) and not isinstance(candidate, fx.GraphModule):
                outermost = candidate
        frame = frame.f_back
    return None if outermost is None else _unwrapped(outermost)


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(module, OptimizedModule):
            module = module._orig_mod
        elif _is_ddp(module):
            module = module.module
        else:
            return module


def _is_ddp(module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def propagate_example_values(nodes: list[fx.Node], grad_enabled: bool) -> bool:
    """Each new node's example value, computed on the fake values of its inputs under the graph's grad
    mode there; False if one fails."""
    for node in nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value"))
        values = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        # The values' own mode: a compile may hold another one (detect_fake_mode would return that).
        mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
        if mode is None:
            return False
        try:
            with mode, torch.set_grad_enabled(grad_enabled):
                if node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
        except Exception:
            return False
        node.meta["example_value"] = value
    return True
