"""LoRA adapters: a linear with a low-rank adapter added still counts as one linear for the MLP pass.

PEFT's LoRA layer computes `base(x) + B(A(dropout(x))) * s` and casts the sum back to the base
layer's output dtype. It is still a function of each row of x alone, so an MLP built of such layers
chunks like any other. In the Dynamo graph (Llama's gate_proj with LoRA, r=4, alpha=8):

    result = torch._C._nn.linear(x, w_base, None)
    linear_5 = torch._C._nn.linear(x, w_lora_a, None)       # x.to(adapter dtype) when they differ
    linear_6 = torch._C._nn.linear(linear_5, w_lora_b, None)
    mul_11 = linear_6 * 2.0
    result_1 = result + mul_11
    result_2 = result_1.to(torch.float32)

`match_adapted_linear(result_2)` returns it as one `AdaptedLinear` whose weight is the base's; the
chunk body replays the same ops (`chunked_ops.AdapterForm`), and the adapter's A and B gradients
are accumulated like any weight's. Adapter dropout with p > 0 is matched but marked random: a
recompute would draw a new mask, so the MLP pass refuses such a site and says why.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator

import torch
from torch import fx

from mst_fx.runtime.chunked_ops import AdapterForm

from .graph_utils import CantChunk, Linear, example_value, is_call, is_inactive_dropout, match_linear

_ADD = {operator.add, torch.add}
_MUL = {operator.mul, torch.mul}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout}


@dataclasses.dataclass
class AdaptedLinear(Linear):
    """`base(x) + scale * B(A(x))`, optionally cast: `weight`/`bias` are the base layer's."""

    lora_a: fx.Node | None = None
    lora_b: fx.Node | None = None
    scale: float = 1.0
    input_dtype: torch.dtype | None = None  # x is cast to this before A (the adapter's dtype)
    output_dtype: torch.dtype | None = None  # the sum is cast to this (the base output's dtype)
    random: fx.Node | None = None  # a dropout with p > 0 on the adapter's input


def adapter_form(linear: Linear | None) -> AdapterForm | None:
    """What the chunked runtime needs to replay `linear`'s adapter, or None when it has none."""
    if not isinstance(linear, AdaptedLinear):
        return None
    return AdapterForm(linear.scale, linear.input_dtype, linear.output_dtype)


def adapter_weights(linear: Linear) -> list[fx.Node]:
    """A and B of `linear`'s adapter, or nothing."""
    return [linear.lora_a, linear.lora_b] if isinstance(linear, AdaptedLinear) else []


def refuse_random_adapter(linear: Linear) -> None:
    if isinstance(linear, AdaptedLinear) and linear.random is not None:
        raise CantChunk(
            f"'{linear.random.name}', a LoRA adapter's dropout with p > 0, is random: a recompute would draw a "
            "different mask (lora_dropout=0 makes the site chunkable)"
        )


def inside_adapted_linears(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes of linears with a LoRA adapter other than their output: the base linear in there (and
    the adapter's B, which widens) is not a layer of its own; the whole adapted linear is."""
    adapted = (match_adapted_linear(node) for node in gm.graph.nodes)
    return {n for linear in adapted if linear is not None for n in linear.nodes if n is not linear.out}


def match_any_linear(node) -> Linear | None:
    """A linear, with or without a LoRA adapter."""
    return match_adapted_linear(node) or match_linear(node)


def match_adapted_linear(node) -> AdaptedLinear | None:
    out, output_dtype, cast = node, None, None
    if _cast_dtype(node) is not None:
        cast, output_dtype, node = node, _cast_dtype(node), node.args[0]
    if not (is_call(node, _ADD, ("add", "__add__")) and len(node.args) == 2 and not node.kwargs):
        return None
    for base_out, scaled in (node.args, node.args[::-1]):
        base = match_linear(base_out)
        low = _scaled_low_rank(scaled)
        if base is None or low is None:
            continue
        a, b, scale, mul = low
        adapter_input, input_dtype, steps = _adapter_input(a.input, base.input)
        if adapter_input is None:
            continue
        random = next((s for s in steps if is_call(s, _DROPOUT) and not is_inactive_dropout(s)), None)
        nodes = [*base.nodes, *steps, *a.nodes, *b.nodes, mul, node, *([cast] if cast is not None else [])]
        return AdaptedLinear(
            out, base.input, base.weight, base.bias, base.transposed, nodes,
            a.weight, b.weight, scale, input_dtype, output_dtype, random,
        )  # fmt: skip
    return None


def _scaled_low_rank(node):
    """(A, B, scale, the mul node) for `B(A(.)) * scale` with plain bias-free linears, else None."""
    if not (is_call(node, _MUL, ("mul", "__mul__")) and len(node.args) == 2 and not node.kwargs):
        return None
    for product, scale in (node.args, node.args[::-1]):
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            continue
        b = match_linear(product)
        a = match_linear(b.input) if b is not None else None
        if a is None or a.bias is not None or b.bias is not None or a.transposed or b.transposed:
            continue
        return a, b, float(scale), node
    return None


def _adapter_input(node, x):
    """(x, dtype cast to or None, the ops in between) when `node` is x through a dtype cast and/or
    a dropout (PEFT applies both to the adapter's input only); (None, None, []) otherwise."""
    steps, dtype = [], None
    while node is not x:
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None, None, []
        if _cast_dtype(node) is not None and dtype is None:
            dtype = _cast_dtype(node)
        elif not is_call(node, _DROPOUT):
            return None, None, []
        steps.append(node)
        node = node.args[0] if node.args else node.kwargs.get("input")
    return x, dtype, steps[::-1]


def _cast_dtype(node) -> torch.dtype | None:
    """The dtype of a `t.to(dtype)` that changes nothing else, or None."""
    if not is_call(node, (), ("to",)) or len(node.args) + len(node.kwargs) != 2:
        return None
    dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    value = example_value(node)
    return dtype if isinstance(dtype, torch.dtype) and value is not None and value.dtype == dtype else None
