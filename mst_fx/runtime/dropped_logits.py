"""What a training step gets in place of the logits mst did not compute.

In training the LM-head rewrite computes the loss without the N x V logits, so the logits the
model returns are a placeholder. An empty tensor used quietly gives wrong answers (`mean()` of
nothing is NaN), so the placeholder is a `DroppedLogits`: its shape, dtype and device can be read
and it prints, but any computation with it raises, saying why and what to do instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

MESSAGE = (
    "mst: these logits were not computed. In training, mst computes the loss without materialising "
    "the N x V logits, which is the memory it saves; the model returns this empty placeholder instead. "
    "Compile with options={'keep_logits': True} to get them (the LM head is then left as it is), "
    "run under torch.no_grad() (inference graphs keep their logits), or compile with "
    "mst_fx.compile(model): a model in eval mode then keeps its logits."
)

# What may be read without computing anything.
READABLE = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.requires_grad.__get__,
    Tensor.ndim.__get__, Tensor.layout.__get__, Tensor.is_leaf.__get__, Tensor.grad_fn.__get__,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.__repr__, Tensor.__format__, Tensor.__len__,
    Tensor.is_floating_point, Tensor.element_size, Tensor._base.__get__, Tensor._is_view,
}  # fmt: skip


class DroppedLogits(Tensor):
    """An empty tensor that refuses every computation (see the module docstring)."""

    @staticmethod
    def __new__(cls, placeholder: Tensor):
        return placeholder.as_subclass(cls)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in READABLE:
            raise RuntimeError(MESSAGE)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def mark_outputs(compiled, indices: list[int]):
    """`compiled` (a compiled graph) with its outputs at `indices` replaced by DroppedLogits."""
    if not indices:
        return compiled

    def replace(outputs):
        outputs = list(outputs)
        for i in indices:
            # On fake tensors (DDP's graph optimizer compiling its pieces) there is nothing to guard.
            if not torch._subclasses.fake_tensor.is_fake(outputs[i]):
                outputs[i] = DroppedLogits(outputs[i])
        return outputs

    def call(*args):
        return replace(compiled(*args))

    return call
