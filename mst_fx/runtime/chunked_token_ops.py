"""Per-token outputs of an LM head, chunk by chunk: log-probs, entropies, unreduced cross-entropy.

Post-training code keeps one value (or a few) per token and reduces later: GRPO's log-probs of the
chosen tokens, an entropy bonus, a token accuracy, `cross_entropy(..., reduction="none")`. The
pass (`passes/token_head.py`) lifts every row-wise function of the logits between the head and
those values into one graph, `row_function(logits_rows, *token_inputs, *whole_inputs)`, and puts
this site in its place:

    forward    mst::linear_rows_forward(site, x, params, token_inputs, whole_inputs)
        for c in chunks:   out_k[c] = row_function(head(x[c]), token_inputs[c], whole_inputs)
    backward   mst::linear_rows_backward(site, x, grad_outs, params, ...)
        for c in chunks:   recompute the differentiable outputs of chunk c, weighted by grad_outs[c]:
                           grad_x[c] = ..., grad_W += dz^T x[c] (fp32)

The upstream gradient is one number per token and output, known only in backward, so the backward
recomputes each chunk's logits (the MLP rewrite's scheme: one more head matmul per chunk). All
outputs share one pass over the chunks; those that are not differentiable (an argmax, a value
computed under no_grad) are computed in forward only and cost no backward. When the memory budget
lets a call keep, the forward runs the head and the row function once over all tokens under
autograd and keeps that graph (`kept_graphs.py`): the backward then recomputes nothing.

A row-wise loss: when the graph reduces the one value per token straight to a scalar (a sum or a
mean over every token: a cross-entropy written in any form, a focal loss), `ChunkedLinearRowLoss`
takes the sum too. Its upstream gradient is then a scalar, so its forward computes the gradients
as well, with no recompute, as the LM head's cross-entropy does:

    mst::linear_row_loss(site, x, params, token_inputs, whole_inputs, needs)
        for c in chunks:   loss_c, dx, dz = gradient of sum(row_function(head(x[c]), ...)) * scale
                           loss += loss_c;  grad_x[c] = dx;  grad_W.addmm_(dz.T, x[c])
        backward: grad_x * grad_loss, grad_W * grad_loss
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from . import chunk_bodies, kept_graphs, memory_budget
from .chunked_ops import (
    ChunkedLinearCrossEntropy,
    CrossEntropyForm,
    _autocast_dtype,
    ChunkedSite,
    _contiguous,
    _gradient_loop,
    _present,
    _site,
    head_logits,
    refuse_double_backward,
    scaled_saved_gradients,
)
from .site_options import SiteOptions


class ChunkedLinearRows(ChunkedSite):
    """The head and a row-wise function of its logits, chunk by chunk; the N x V logits never exist.

    `row_function`: (logits rows (c, V), *token inputs (c, ...), *whole inputs) -> per-token outputs,
    each (c,) or (c, k). `differentiable`: which outputs carry a gradient."""

    WORK_TENSORS = 4  # a chunk's logits, their log-softmax, and in backward their gradients (fp32)
    WORK_ITEMSIZE = 4
    KEPT_TENSORS = 3  # the bound a keep is planned with until one has measured: logits and two of their kind

    def __init__(
        self, form: CrossEntropyForm, row_function: fx.GraphModule, differentiable: tuple[bool, ...],
        token_specs: tuple, whole_specs: tuple, output_leads: tuple[str, ...], widths: tuple[int, int],
        options: SiteOptions,
    ):  # fmt: skip
        """`token_specs`: per input read per token, ("model" | "flat", trailing shape): it broadcasts
        to the logits' leading dims (or to all tokens flat) and that trailing shape. `whole_specs`:
        the trailing shape each input read whole is viewed as. `output_leads`: per output, whether
        it comes back with the logits' leading dims ("model") or flat."""
        super().__init__(widths, options)
        self.form, self.row_function, self.differentiable = form, row_function, differentiable
        self.token_specs, self.whole_specs, self.output_leads = token_specs, whole_specs, output_leads
        self.register(form, differentiable, token_specs, whole_specs, row_function.code)
        # The backward's site, found by key; held here in a tuple, not as a submodule (the registry
        # holds sites weakly), since a submodule would make a cycle that compile caches can't pickle.
        self._gradient_site = (_DifferentiableRows(self.key, widths, options),)
        self.gradient_key = self._gradient_site[0].key
        self.keep_row = self.KEPT_TENSORS * self.amplified_width * self.WORK_ITEMSIZE  # measured by the first keep

    def forward(self, x: Tensor, params: list, token_inputs: list, whole_inputs: list) -> tuple[Tensor, ...]:
        lead = x.shape[:-1]
        rows, tokens, wholes = _flat_inputs(x, token_inputs, whole_inputs, self.token_specs, self.whole_specs)
        counts = (len(params), len(tokens))
        outs = _LinearRowsFunction.apply(self.key, counts, rows, *params, *tokens, *wholes)
        return tuple(o.view(*lead, *o.shape[1:]) if where == "model" else o for o, where in zip(outs, self.output_leads))

    def chunk(self, linear, x, params, *inputs):
        return tuple(self.row_function(head_logits(linear, x, params, self.form), *inputs))

    def extra_repr(self) -> str:
        return f"{self.policy.describe()}, {self.form}, differentiable={self.differentiable}"


class ChunkedLinearRowLoss(ChunkedSite):
    """The head, a row-wise function of its logits to one value per token, and the sum (or mean)
    of those values over every token: a scalar loss, with its gradients computed in forward.

    `row_function`: as `ChunkedLinearRows`', with one output, (c,) or (c, k)."""

    # Reported as an LM head (`passes/budget_report.py`), and sized as one: a chunk's logits, one
    # N/M x V intermediate and their gradient (Inductor fuses the row function's elementwise ops).
    WORK_TENSORS, WORK_ITEMSIZE = ChunkedLinearCrossEntropy.WORK_TENSORS, ChunkedLinearCrossEntropy.WORK_ITEMSIZE

    def __init__(
        self, form: CrossEntropyForm, row_function: fx.GraphModule, token_specs: tuple, whole_specs: tuple,
        mean: bool, widths: tuple[int, int], options: SiteOptions,
    ):  # fmt: skip
        super().__init__(widths, options)
        self.form, self.row_function, self.mean = form, row_function, mean
        self.token_specs, self.whole_specs = token_specs, whole_specs
        self.register(form, token_specs, whole_specs, mean, row_function.code)

    def forward(self, x: Tensor, params: list, token_inputs: list, whole_inputs: list) -> Tensor:
        rows, tokens, wholes = _flat_inputs(x, token_inputs, whole_inputs, self.token_specs, self.whole_specs)
        return _LinearRowLossFunction.apply(self.key, (len(params), len(tokens)), rows, *params, *tokens, *wholes)

    def values(self, linear, x, params, *inputs) -> Tensor:
        """The row function's one value (or k values) per token of a chunk."""
        (values,) = self.row_function(head_logits(linear, x, params, self.form), *inputs)
        return values

    def chunk(self, linear, x, params, *inputs):
        return self.values(linear, x, params, *inputs).sum()

    def extra_repr(self) -> str:
        return f"{self.policy.describe()}, {self.form}, {'mean' if self.mean else 'sum'} over tokens"


def _flat_inputs(x: Tensor, token_inputs: list, whole_inputs: list, token_specs: tuple, whole_specs: tuple):
    """(x as rows (N, d), each input read per token as (N, ...), each input read whole in its shape)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    tokens = [_flat(t, lead if where == "model" else rows.shape[:1], tail) for t, (where, tail) in zip(token_inputs, token_specs)]
    return rows, tokens, [w.reshape(tail) for w, tail in zip(whole_inputs, whole_specs)]


def _flat(tensor: Tensor, lead, tail) -> Tensor:
    """An input read per token, broadcast to (*lead, *tail) and flattened to (N, *tail)."""
    return tensor.expand(*lead, *tail).reshape(-1, *tail)


class _DifferentiableRows(ChunkedSite):
    """What the backward recomputes: the differentiable outputs, flattened and joined, (c, k) fp32."""

    WORK_TENSORS, WORK_ITEMSIZE = ChunkedLinearRows.WORK_TENSORS, ChunkedLinearRows.WORK_ITEMSIZE

    def __init__(self, site_key: str, widths, options):
        super().__init__(widths, options)
        self.site_key = site_key
        self.register(site_key)

    def chunk(self, linear, x, params, *inputs):
        site = _site(self.site_key)
        outs = site.chunk(linear, x, params, *inputs)
        kept = [o for o, d in zip(outs, site.differentiable) if d]
        return torch.cat([o.float().reshape(o.shape[0], -1) for o in kept], dim=-1)


def _narrowed(tokens: list[Tensor], wholes: list[Tensor]):
    return lambda start, length: [*(t.narrow(0, start, length) for t in tokens), *wholes]


def _probe(site: ChunkedLinearRows, x, params, tokens, wholes, autocast_dtype) -> tuple[Tensor, ...]:
    """The outputs on zero rows: their dtypes and trailing shapes, for the real op and the fake."""
    inputs = _narrowed(tokens, wholes)(0, 0)
    with torch.no_grad(), chunk_bodies.autocast(x.device.type, autocast_dtype):
        return site.chunk(chunk_bodies.plain_linear(params), x.narrow(0, 0, 0), params, *inputs)


@torch.library.custom_op("mst::linear_rows_forward", mutates_args=())
def linear_rows_forward(
    site: str, x: Tensor, params: list[Tensor | None], token_inputs: list[Tensor], whole_inputs: list[Tensor],
    needs: list[bool], autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    """[*outputs, ticket]: the ticket names the autograd graph kept for backward, when the budget let
    this call keep it (`memory_budget.py`); 0 when the backward is to recompute. `needs`: x, then
    each param, whether its gradient is wanted."""
    head = _site(site)
    x, *params = _contiguous([x, *params])
    tokens, wholes = _contiguous(token_inputs), _contiguous(whole_inputs)
    probes = _probe(head, x, params, tokens, wholes, autocast_dtype)
    tensors, present = _present(params)
    body = chunk_bodies.forward_body(head.chunk, present, autocast_dtype)
    inputs_of = _narrowed(tokens, wholes)

    def run(decision):
        if decision.keep:
            return _keeping_forward(head, x, params, tokens, wholes, needs, autocast_dtype, decision)
        outs = [x.new_empty((x.shape[0], *p.shape[1:]), dtype=p.dtype) for p in probes]
        for start, length in head.chunks_of(x, decision):
            inputs = [x.narrow(0, start, length), *tensors, *inputs_of(start, length)]
            entry = chunk_bodies.compiled((site, "forward", present, autocast_dtype), body, None, inputs, head.compiler)
            for out, out_c in zip(outs, chunk_bodies.run(entry, inputs)):
                out.narrow(0, start, length).copy_(out_c)
        return [*outs, memory_budget.no_ticket()]

    keep_row = head.keep_row if any(needs) else 0  # nothing to differentiate: nothing to keep
    return head.run_retreating(x, head.decide(x, keep_row), run)


def _keeping_forward(head: ChunkedLinearRows, x, params, tokens, wholes, needs, autocast_dtype, decision):
    count = len(params)

    def rows_of(x, *rest):
        params, inputs = list(rest[:count]), rest[count:]
        return tuple(head.chunk(chunk_bodies.plain_linear(params), x, params, *inputs))

    every_need = [*needs, *(False for _ in (*tokens, *wholes))]
    outs, kept, nbytes = kept_graphs.run_keeping(rows_of, [x, *params, *tokens, *wholes], every_need, autocast_dtype)
    return [*outs, head.keep_graph(x, kept, nbytes, decision)]


@linear_rows_forward.register_fake
def _(site, x, params, token_inputs, whole_inputs, needs, autocast_dtype):
    probes = _probe(_site(site), x, params, token_inputs, whole_inputs, autocast_dtype)
    return [*(x.new_empty((x.shape[0], *p.shape[1:]), dtype=p.dtype) for p in probes), memory_budget.no_ticket()]


@torch.library.custom_op("mst::linear_rows_backward", mutates_args=())
def linear_rows_backward(
    site: str, x: Tensor, ticket: Tensor, grad_rows: Tensor, params: list[Tensor | None], token_inputs: list[Tensor],
    whole_inputs: list[Tensor], needs: list[bool], autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    """The gradients in `needs` (x, then each param). `grad_rows`: (N, k) fp32, the upstream
    gradients of the differentiable outputs, flattened and joined as `_DifferentiableRows` joins them."""
    rows_site = _site(site)
    head = _site(rows_site.gradient_key)
    x, grad_rows, *params = _contiguous([x, grad_rows, *params])
    inputs_of = _narrowed(_contiguous(token_inputs), _contiguous(whole_inputs))
    seed_of = lambda start, length: grad_rows.narrow(0, start, length)  # noqa: E731

    def replay(graph) -> list[Tensor | None]:  # the kept graph: nothing runs again
        grad_outs = _split_rows(grad_rows, graph[0], rows_site.differentiable)
        every_need = [*needs, *(False for _ in graph[1][len(needs) :])]
        found = iter(kept_graphs.gradients(graph, grad_outs, every_need))
        return [next(found) if need else None for need in needs]

    def recompute(decision) -> list[Tensor | None]:
        chunks = head.chunks_of(x, decision)
        _, grad_x, grads = _gradient_loop(head, x, seed_of, params, inputs_of, needs, autocast_dtype, False, chunks)
        return [grad_x, *grads]

    return [g for g in head.backward_retreating(x, ticket, replay, recompute) if g is not None]


def _split_rows(grad_rows: Tensor, outputs: tuple[Tensor, ...], differentiable: tuple[bool, ...]) -> list[Tensor | None]:
    """The joined (N, k) gradient of the differentiable outputs back to one per output (None for the
    others), in each output's shape."""
    found, offset = [], 0
    for out, d in zip(outputs, differentiable):
        if not d:
            found.append(None)
            continue
        width = out.shape[1:].numel()
        found.append(grad_rows[:, offset : offset + width].reshape(out.shape))
        offset += width
    return found


@linear_rows_backward.register_fake
def _(site, x, ticket, grad_rows, params, token_inputs, whole_inputs, needs, autocast_dtype):
    return [torch.empty_like(t) for t, need in zip([x, *params], needs) if need]


class _LinearRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, counts: tuple[int, int], x: Tensor, *tensors: Tensor | None):
        params, rest = list(tensors[: counts[0]]), tensors[counts[0] :]
        tokens, wholes = list(rest[: counts[1]]), list(rest[counts[1] :])
        ctx.key, ctx.counts, ctx.autocast = key, counts, _autocast_dtype(x)
        needs = [ctx.needs_input_grad[2], *ctx.needs_input_grad[3 : 3 + counts[0]]]
        *outs, ticket = torch.ops.mst.linear_rows_forward(key, x, params, tokens, wholes, needs, ctx.autocast)
        ctx.save_for_backward(x, ticket, *tensors)
        differentiable = _site(key).differentiable
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, differentiable) if not d))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        refuse_double_backward()
        x, ticket, *tensors = ctx.saved_tensors
        params, rest = tensors[: ctx.counts[0]], tensors[ctx.counts[0] :]
        tokens, wholes = rest[: ctx.counts[1]], rest[ctx.counts[1] :]
        differentiable = _site(ctx.key).differentiable
        # Outputs the loss doesn't read get zeros here (autograd materialises them).
        kept = [g for g, d in zip(grad_outs, differentiable) if d]
        grad_rows = torch.cat([g.float().reshape(x.shape[0], -1) for g in kept], -1)
        needs = [ctx.needs_input_grad[2], *ctx.needs_input_grad[3 : 3 + ctx.counts[0]]]
        grads = iter(torch.ops.mst.linear_rows_backward(
            ctx.key, x, ticket, grad_rows, list(params), list(tokens), list(wholes), needs, ctx.autocast
        ))  # fmt: skip
        found = [next(grads) if need else None for need in needs]
        return None, None, *found, *(None for _ in rest)


@torch.library.custom_op("mst::linear_row_loss", mutates_args=())
def linear_row_loss(
    site: str, x: Tensor, params: list[Tensor | None], token_inputs: list[Tensor], whole_inputs: list[Tensor],
    needs: list[bool], autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    """[loss, *the gradients in `needs`] (x, then each param), those of the loss itself."""
    head = _site(site)
    x, *params = _contiguous([x, *params])
    tokens, wholes = _contiguous(token_inputs), _contiguous(whole_inputs)
    probe = _probe_loss(head, x, params, tokens, wholes, autocast_dtype)
    count = x.shape[0] * probe.numel() if head.mean else 1  # the mean's denominator: every value of every token
    scale = x.new_full((), 1.0 / max(count, 1), dtype=torch.float32)
    inputs_of = _narrowed(tokens, wholes)
    total, grad_x, grads = head.run_retreating(x, head.decide(x), lambda decision: _gradient_loop(
        head, x, lambda s, n: scale, params, inputs_of, needs, autocast_dtype, True, head.chunks_of(x, decision)
    ))  # fmt: skip
    loss = total / count if head.mean else total
    return [loss.to(probe.dtype), *(g for g in [grad_x, *grads] if g is not None)]


@linear_row_loss.register_fake
def _(site, x, params, token_inputs, whole_inputs, needs, autocast_dtype):
    probe = _probe_loss(_site(site), x, params, token_inputs, whole_inputs, autocast_dtype)
    return [x.new_empty((), dtype=probe.dtype), *(torch.empty_like(t) for t, need in zip([x, *params], needs) if need)]


def _probe_loss(site: ChunkedLinearRowLoss, x, params, tokens, wholes, autocast_dtype) -> Tensor:
    """The per-token value of zero rows: its dtype, and its values per token (the trailing shape)."""
    inputs = _narrowed(tokens, wholes)(0, 0)
    with torch.no_grad(), chunk_bodies.autocast(x.device.type, autocast_dtype):
        values = site.values(chunk_bodies.plain_linear(params), x.narrow(0, 0, 0), params, *inputs)
    return values.new_empty(values.shape[1:])


class _LinearRowLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, counts: tuple[int, int], x: Tensor, *tensors: Tensor | None):
        params, rest = list(tensors[: counts[0]]), tensors[counts[0] :]
        tokens, wholes = list(rest[: counts[1]]), list(rest[counts[1] :])
        needs = [ctx.needs_input_grad[2], *ctx.needs_input_grad[3 : 3 + counts[0]]]
        loss, *grads = torch.ops.mst.linear_row_loss(key, x, params, tokens, wholes, needs, _autocast_dtype(x))
        found = iter(grads)
        ctx.save_for_backward(*(next(found) if need else None for need in needs))
        ctx.rest = len(rest)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward()
        grad_x, *grads = scaled_saved_gradients(ctx, grad_loss)
        return None, None, grad_x, *grads, *(None for _ in range(ctx.rest))
