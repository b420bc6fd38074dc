"""`mst_fx.compile(model)`: compile a model in place with mst, for the stacks that train it.

    model = mst_fx.compile(model)                  # then Trainer(model=model, ...), accelerate, a loop
    model = mst_fx.compile(model, chunk_size=2048) # backend options, validated now

It does what `model.compile(backend="mst")` does (the module stays itself: `model.forward`, its
signature, `save_pretrained` and `state_dict` are untouched, so Hugging Face's Trainer still finds
`labels` and reports `eval_loss`), plus one thing the bare backend can't: it knows the model.

The backend is handed graphs, never modules, so on its own it can't tell `model.train()` from
`model.eval()`. Here the compiled call reads `model.training` first, which makes Dynamo guard on it
(a train-mode graph is never reused in eval mode), and the backend reads the same flag while it
compiles. The logits the model returns are then dropped only in train mode, as Liger-Kernel does
when labels are given; a model in eval mode with gradients on keeps them. (Past a graph break
inside `forward`, Dynamo compiles the rest as frames of their own, which guard on the mode only if
they read it, as HF models' layers do; one that doesn't keeps the rule of the mode it was compiled
in, and logits it dropped still say so when used.)
"""

from __future__ import annotations

import functools

import torch
from torch import fx, nn

from mst_fx.dynamo_backend import compile_graph
from mst_fx.options import MstOptions
from mst_fx.tracing.restored_attributes import mark_mst_backend


def compile(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None, **options) -> nn.Module:
    """Compile `model` in place with the mst backend and these options; returns `model` itself.

    `dynamic` and `mode` are torch.compile's. A bad option raises ValueError here, not at the
    first step."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mst_fx.compile takes an nn.Module, got {type(model).__name__}")
    configured = MstOptions.from_mapping(options)

    @mark_mst_backend
    def mst(gm: fx.GraphModule, example_inputs, options=None, mode=None):
        return compile_graph(gm, example_inputs, configured, mode, model_training=model.training)

    compiled = torch.compile(_call_guarded_on_mode, backend=mst, dynamic=dynamic, mode=mode)
    # What nn.Module.compile does, with the call below in place of the module's own.
    model._compiled_call_impl = functools.partial(compiled, model)
    return model


def _call_guarded_on_mode(self: nn.Module, *args, **kwargs):
    # Branching on the flag is what makes Dynamo guard on it; both branches do the same. The module
    # is an argument named `self`, so that the graph names its parameters as `model.compile()` does.
    if self.training:
        return self._call_impl(*args, **kwargs)
    return self._call_impl(*args, **kwargs)
