"""The backend without the compiler: trace a model with Dynamo, exactly as `torch.compile` does,
run the passes on every graph it captures and keep what they found, then run each graph as it is.

On a model built on the meta device nothing is allocated, so any size can be inspected; example
inputs are moved to meta when the model is there. `mst_fx.explain` is this with validated options.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx

from mst_fx.passes import PassOptions, rewrite
from mst_fx.tracing.graph_breaks import GraphBreakMonitor
from mst_fx.tracing.restored_attributes import mark_mst_backend

from .model_report import InspectedGraph, ModelReport

log = logging.getLogger(__name__)


def dry_run(model, example_inputs: tuple, example_kwargs: dict | None, options: PassOptions,
            target: str | None = None) -> ModelReport:  # fmt: skip
    """Trace `model(*example_inputs, **example_kwargs)` and report what the passes would do with
    `options` (the backend's, a dataclass: the report records them). Runs with gradients enabled,
    as a training step does. Raises what the model raises."""
    graphs: list[InspectedGraph] = []
    graph_breaks = GraphBreakMonitor()

    @mark_mst_backend
    def inspecting_backend(gm: fx.GraphModule, inputs):
        graph_breaks.graph_compiled(gm)
        rewritten, report = rewrite(gm, inputs, options)
        graphs.append(InspectedGraph(report, gm.code, rewritten.code))
        log.debug(
            "mst explain: graph %s: %d sites, %d rewritten",
            report.compile_id,
            len(report.sites),
            len(report.rewritten()),
        )
        return gm.forward

    args, kwargs = _on_model_device(model, example_inputs, dict(example_kwargs or {}))
    with torch.enable_grad():
        torch.compile(model, backend=inspecting_backend)(*args, **kwargs)
    if not graphs:
        raise RuntimeError(
            "Dynamo compiled no graph for this call (already at its recompile limit? torch._dynamo.reset() clears it)"
        )
    return ModelReport(graphs, dataclasses.asdict(options), target, graph_breaks.breaks())


def _on_model_device(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Inputs as meta tensors when the model's parameters are on meta (a mix would not trace)."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    if not any(p.is_meta for p in parameters):
        return args, kwargs

    def to_meta(value):
        if not isinstance(value, torch.Tensor) or value.is_meta:
            return value
        return torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)

    return tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()}
