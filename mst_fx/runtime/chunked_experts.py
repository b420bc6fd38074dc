"""The routed experts of a mixture-of-experts layer, chunk by chunk over the tokens.

The pass (`passes/moe_experts.py`) lifts the layer's expert computation, from the routing (top-k
ids and weights) and the hidden states to the combined (T, d) output, into one graph `region(*rows,
*whole)`: `rows` have one row per token (hidden states, top-k ids and weights, router scores),
`whole` are the experts' weights. The pass has proven the region row-wise: a token's output row
depends only on its own input rows. So it runs over chunks of tokens:

    forward    mst::experts_forward(site, rows, whole, needs) -> (out, ticket)
        for c in chunks:   out[c] = region(rows[c], whole)              the graph saves only rows
    backward   mst::experts_backward(site, rows, whole, ticket, grad_out, needs)
        for c in chunks:   recompute region(rows[c], whole) under autograd, then
                           grad_rows[c] = d out[c] / d rows[c]           (the router's gradient too)
                           grad_whole  += d out[c] / d whole            (fp32 accumulators)

When the memory budget lets the call keep (`memory_budget.py`), the forward runs the region once
over all its tokens under autograd and keeps that graph (`kept_graphs.py`): the backward runs no
dispatch again. The decision reads the pass's bound per token (`kept_bytes_per_token`: every
token-sized intermediate of the region) until a keep has measured what autograd really saved.

Alive at once when chunked: the rows and their gradients (T x d, T x k), one fp32 accumulator per
expert weight, and one chunk's dispatch: its T_c·k gathered rows, gate/up, activation and outputs.
The per-chunk weight gradient comes out of the chunk's own grouped matmul (a weight-sized tensor)
and is added into the accumulator: unlike a linear's `addmm_`, a grouped matmul can't accumulate
in place, so one weight-sized partial is alive next to the accumulator during the backward loop.

Regions whose dispatch has data-dependent sizes (a loop over `nonzero` positions) can't be traced
into a fixed-shape body; those run as the lifted graph itself, chunk by chunk, under autograd.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, fx

from . import chunk_bodies, kept_graphs, memory_budget
from .chunked_ops import _autocast_dtype, ChunkedSite, _site, refuse_double_backward
from .site_options import SiteOptions

log = logging.getLogger(__name__)


class ChunkedExperts(ChunkedSite):
    """`region(*rows, *whole)` over chunks of tokens; backward recomputes one chunk at a time."""

    WORK_TENSORS = 4  # `memory_estimate`'s figure, in units of the largest dispatch tensor

    def __init__(
        self, region: fx.GraphModule, row_count: int, output: tuple[tuple[int, ...], torch.dtype],
        widths: tuple[int, int], sparsity: float, keep_row: int, options: SiteOptions,
    ):  # fmt: skip
        """`output`: the trailing shape and dtype of the region's output. `widths`: the hidden
        width d and the elements per token of the region's largest tensor (what the policy cuts).
        `sparsity`: experts over experts per token, E / k (it scales the policy's chunk floor).
        `keep_row`: bytes per token that keeping the region's autograd graph holds at most."""
        super().__init__(widths, options)
        self.region, self.row_count, self.sparsity = region, row_count, sparsity
        self.floor_scale = sparsity
        self.out_tail, self.out_dtype = output
        self.keep_row = keep_row  # replaced by what a keep measured, once one has
        self.traceable = True  # False once a body could not be traced at fixed shapes
        self.register(row_count, output, sparsity, region.code)

    def forward(self, *inputs: Tensor | None) -> Tensor:
        return _ExpertsFunction.apply(self.key, self.row_count, *inputs)

    def chunk(self, linear, x, params, *extra):  # the policy's probe API is not used by this site
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.policy.describe()}, {self.row_count} row inputs"


def _chunks(site: ChunkedExperts, rows: list[Tensor], decision) -> list[tuple[int, int]]:
    return site.chunks_of(rows[0], decision)


def _forward_body(region, autocast_dtype):
    def body(*inputs):
        with chunk_bodies.autocast(inputs[0].device.type, autocast_dtype):
            return (region(*inputs),)

    return body


def _gradient_body(region, needs: tuple[bool, ...], row_count: int, autocast_dtype):
    """(grad_out_c, *rows_c, *whole) -> the gradient of every input in `needs`: rows as they are,
    whole inputs in fp32 (zeros where the chunk sends no token to an expert)."""

    def body(grad_out, *inputs):
        with torch.enable_grad(), chunk_bodies.autocast(grad_out.device.type, autocast_dtype):
            leaves = [t.detach().requires_grad_(need) if need else t for t, need in zip(inputs, needs)]
            out = region(*leaves)
            targets = [t for t, need in zip(leaves, needs) if need]
            grads = torch.autograd.grad(out, targets, grad_out.to(out.dtype), allow_unused=True)
        results, wanted = [], [i for i, need in enumerate(needs) if need]
        for i, g in zip(wanted, grads):
            g = torch.zeros_like(inputs[i]) if g is None else g
            results.append(g if i < row_count else g.float())
        return tuple(results)

    return body


def _run(site: ChunkedExperts, key: tuple, body, inputs: list[Tensor]) -> list[Tensor]:
    """The body for these inputs: compiled per chunk shape, or run as it is when its dispatch has
    data-dependent sizes (then the body is called under autograd's ordinary dispatch)."""
    if site.traceable:
        try:
            entry = chunk_bodies.compiled(key, body, None, inputs, site.compiler)
            return chunk_bodies.run(entry, inputs)
        except Exception as error:  # nonzero / where: no fixed-shape trace
            if not _data_dependent(error):
                raise
            site.traceable = False
            log.info("mst: %s has data-dependent sizes; its chunks run uncompiled", site.key)
    with torch._C._ForceDispatchKeyGuard(*chunk_bodies.ORDINARY_DISPATCH), torch.no_grad():
        return list(body(*inputs))


def _data_dependent(error: Exception) -> bool:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    text = f"{type(error).__name__} {error}"
    data_dependent = (DynamicOutputShapeException, DataDependentOutputException)
    return isinstance(error, data_dependent) or "data-dependent" in text or "DynamicOutputShape" in text


def _forward_loop(site: ChunkedExperts, rows: list[Tensor], whole: list[Tensor], autocast_dtype, decision) -> Tensor:
    out = rows[0].new_empty((rows[0].shape[0], *site.out_tail), dtype=site.out_dtype)
    body = _forward_body(site.region, autocast_dtype)
    for start, length in _chunks(site, rows, decision):
        inputs = [r.narrow(0, start, length) for r in rows] + whole
        (out_c,) = _run(site, (site.key, "forward", autocast_dtype), body, inputs)
        out.narrow(0, start, length).copy_(out_c)
    return out


def _backward_loop(site, rows, whole, grad_out, needs, autocast_dtype, decision) -> list[Tensor]:
    body = _gradient_body(site.region, tuple(needs), site.row_count, autocast_dtype)
    inputs_all = rows + whole
    grads = [
        (torch.empty_like(t) if i < site.row_count else torch.zeros(t.shape, dtype=torch.float32, device=t.device))
        if need else None
        for i, (t, need) in enumerate(zip(inputs_all, needs))
    ]  # fmt: skip
    wanted = [i for i, need in enumerate(needs) if need]
    key = (site.key, "gradient", tuple(needs), autocast_dtype)
    for start, length in _chunks(site, rows, decision):
        inputs = [grad_out.narrow(0, start, length)] + [r.narrow(0, start, length) for r in rows] + whole
        results = _run(site, key, body, inputs)
        for i, g in zip(wanted, results):
            if i < site.row_count:
                grads[i].narrow(0, start, length).copy_(g)
            else:
                grads[i].add_(g)
        del results  # this chunk's dispatch goes before the next chunk's is made
    return [g if i < site.row_count else g.to(inputs_all[i].dtype) for i, g in enumerate(grads) if g is not None]


def _split(row_count: int, inputs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    inputs = [t.detach().contiguous() if t.is_floating_point() else t.contiguous() for t in inputs]
    return inputs[:row_count], inputs[row_count:]


@torch.library.custom_op("mst::experts_forward", mutates_args=())
def experts_forward(
    site: str, inputs: list[Tensor], row_count: int, needs: list[bool], autocast_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(output, ticket): the ticket names the autograd graph kept for backward, when the budget
    let this call keep it (`memory_budget.py`); 0 when the backward is to recompute."""
    rows, whole = _split(row_count, inputs)
    experts = _site(site)
    x = rows[0]

    def run(decision):
        if not decision.keep:
            return _forward_loop(experts, rows, whole, autocast_dtype, decision), memory_budget.no_ticket()
        (out,), kept, nbytes = kept_graphs.run_keeping(experts.region, rows + whole, needs, autocast_dtype)
        return out, experts.keep_graph(x, kept, nbytes, decision)

    keep_row = experts.keep_row if any(needs) else 0  # nothing to differentiate: nothing to keep
    return experts.run_retreating(x, experts.decide(x, keep_row), run)


@experts_forward.register_fake
def _(site, inputs, row_count, needs, autocast_dtype):
    experts = _site(site)
    out = inputs[0].new_empty((inputs[0].shape[0], *experts.out_tail), dtype=experts.out_dtype)
    return out, memory_budget.no_ticket()


@torch.library.custom_op("mst::experts_backward", mutates_args=())
def experts_backward(
    site: str, inputs: list[Tensor], ticket: Tensor, grad_out: Tensor, row_count: int, needs: list[bool],
    autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    rows, whole = _split(row_count, inputs)
    experts = _site(site)
    grad_out = grad_out.contiguous()

    def replay(kept):  # the kept graph: no dispatch runs again
        return kept_graphs.gradients(kept, [grad_out], needs)

    def recompute(decision):
        return _backward_loop(experts, rows, whole, grad_out, needs, autocast_dtype, decision)

    return experts.backward_retreating(rows[0], ticket, replay, recompute)


@experts_backward.register_fake
def _(site, inputs, ticket, grad_out, row_count, needs, autocast_dtype):
    return [torch.empty_like(t) for t, need in zip(inputs, needs) if need]


class _ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, row_count: int, *inputs: Tensor) -> Tensor:
        ctx.key, ctx.row_count, ctx.autocast = key, row_count, _autocast_dtype(inputs[0])
        needs = [bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[2:], inputs)]
        out, ticket = torch.ops.mst.experts_forward(key, list(inputs), row_count, needs, ctx.autocast)
        ctx.save_for_backward(ticket, *inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward()
        ticket, *inputs = ctx.saved_tensors
        needs = [bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[2:], inputs)]
        grads = iter(
            torch.ops.mst.experts_backward(ctx.key, list(inputs), ticket, grad_out, ctx.row_count, needs, ctx.autocast)
        )
        return None, None, *(next(grads) if need else None for need in needs)
