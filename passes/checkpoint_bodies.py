"""The subgraphs of activation-checkpointed regions, so that the passes can rewrite inside them.

With `model.gradient_checkpointing_enable()` (HF) or `torch.utils.checkpoint` in user code, Dynamo
puts each checkpointed call in a higher-order op whose body is a child GraphModule:

    wrap_body_0 = self.wrap_body_0
    tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(
        wrap_body_0, hidden_states, w_norm, w_q, ..., w_gate, w_up, w_down, use_reentrant=False)

The layer's MLP is inside `wrap_body_0`, in the same form as in a flat graph, so the MLP pass runs
on each body as it runs on the outer graph. That matters twice: the forward holds one chunk's
intermediates at a time, and so does the backward's recomputation of the layer, which is where a
checkpointed model's peak is.

Bodies are owned by the module Dynamo built, which the caller keeps as its unrewritten fallback:
each body is copied before the passes touch it, and the copy is installed on the work module.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx

from .graph_utils import copy_graph_module

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def checkpoint_bodies(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Each checkpoint body reachable from `gm` (nested ones too), as a copy now owned by `gm`'s tree."""
    names = {n.args[0].target for n in gm.graph.nodes if _is_checkpoint_call(n)}
    for name in sorted(names):
        body = copy_graph_module(getattr(gm, name))
        setattr(gm, name, body)
        yield body
        yield from checkpoint_bodies(body)


def _is_checkpoint_call(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is CHECKPOINT
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "get_attr"
    )
