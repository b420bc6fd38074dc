"""A site's call kept as an autograd graph, for the sites whose backward otherwise runs their
forward again: routed experts (their dispatch) and per-token heads (the head's matmul and the row
function).

When the memory budget lets a call keep (`memory_budget.py`), its forward runs the site's function
once over all its rows under autograd, and keeps that graph (the outputs and the leaves) behind the
ticket; the backward is `autograd.grad` of the kept outputs, and runs nothing of the forward again.
The bytes kept are those autograd saved, counted by a saved-tensor hook as they are saved, once per
storage, the inputs' own storages left out (they are alive anyway).

A custom op's implementation runs with autograd's dispatch keys excluded; both halves run in the
dispatch state of ordinary code (`chunk_bodies.ORDINARY_DISPATCH`), as the gradient bodies do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import chunk_bodies


def run_keeping(function: Callable, inputs: Sequence[Tensor | None], needs: Sequence[bool], autocast_dtype):
    """(outputs detached, what to keep, bytes autograd saved): `function(*inputs)` once under
    autograd, with the inputs in `needs` as leaves that require grad. `function` returns a tensor
    or a tuple of them."""
    counted = _SavedBytes([t for t in inputs if t is not None])
    device = next(t for t in inputs if t is not None).device.type
    ordinary = torch._C._ForceDispatchKeyGuard(*chunk_bodies.ORDINARY_DISPATCH)
    with ordinary, torch.enable_grad(), chunk_bodies.autocast(device, autocast_dtype):
        leaves = [t.detach().requires_grad_() if need and t is not None else t for t, need in zip(inputs, needs)]
        with torch.autograd.graph.saved_tensors_hooks(counted.pack, lambda t: t):
            outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(o.detach() for o in outputs), (outputs, leaves), counted.nbytes


def gradients(kept, grad_outputs: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor]:
    """The gradient of each input in `needs`, from the kept graph and the outputs' gradients (None
    for an output the loss does not read); zeros where an input does not reach a read output."""
    outputs, leaves = kept
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    targets = [leaf for leaf, need in zip(leaves, needs) if need]
    with torch._C._ForceDispatchKeyGuard(*chunk_bodies.ORDINARY_DISPATCH):
        found = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(found, targets)]


class _SavedBytes:
    """A saved-tensor hook that counts the bytes autograd saves, once per storage."""

    def __init__(self, inputs: list[Tensor]):
        self.storages = {_storage(t) for t in inputs}
        self.nbytes = 0

    def pack(self, tensor: Tensor) -> Tensor:
        storage = _storage(tensor)
        if storage not in self.storages:
            self.storages.add(storage)
            self.nbytes += tensor.untyped_storage().nbytes()
        return tensor


def _storage(tensor: Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()
