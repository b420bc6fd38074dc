"""The chunked computations that the passes put into the graph, in place of a matched site.

Each is an `nn.Module` (so the rewritten graph reads `self.mst_mlp_0(x, ...)`) wrapping an
`autograd.Function` that walks the flattened tokens M chunks at a time:

* `ChunkedMLP`: the forward runs each chunk of linear -> activation -> linear and keeps only its
  input; the backward recomputes one chunk's N/M x I intermediates at a time and differentiates it.
* `ChunkedLinearCrossEntropy`: the loss is the last node, so its upstream gradient is a scalar;
  the forward computes each chunk's logits, loss and input/weight gradients at once (as torch's
  own `F.linear_cross_entropy` does) and the backward only scales them. No N x V tensor lives
  longer than one chunk, and there is no recompute matmul.

AOTAutograd traces through both. The MLP's recompute is, op for op, the forward's computation, so
joint-graph CSE would merge them back; the backend turns CSE off when it hands off a graph with an
MLP rewrite (see `mst_fx.dynamo_backend`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """`x @ W.T + b`; with `transposed`, W is stored (in, out) as GPT-2's Conv1D does (`addmm`)."""
    if not transposed:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight)
    return torch.addmm(bias, x, weight)


def split_rows(rows: Tensor, chunks: int) -> list[Tensor]:
    """M row ranges: M - 1 of N // M rows, the last one takes the N % M rows left over.

    Written without branching on N, so a symbolic (dynamic) token count gets no guards on it and
    one compiled graph serves every length. With a static N < M, M becomes N.
    """
    n = rows.shape[0]
    if isinstance(n, int):
        chunks = max(1, min(chunks, n))
    size = n // chunks
    pieces = [rows.narrow(0, i * size, size) for i in range(chunks - 1)]
    return pieces + [rows.narrow(0, (chunks - 1) * size, n - (chunks - 1) * size)]


def _detached(tensors: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [None if t is None else t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]


def _grads(output: Tensor, inputs: Sequence[Tensor | None], needs: Sequence[bool], grad_output) -> list:
    """Gradients of `output` for the inputs that need one; None for the rest."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    found = iter(torch.autograd.grad(output, wanted, grad_output) if wanted else ())
    return [next(found) if need and t is not None else None for t, need in zip(inputs, needs)]


def _autocast_state(device_type: str) -> dict:
    """The autocast state for `device_type` now, as `torch.autocast(**state)` arguments."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def _accumulate(total: Tensor | None, part: Tensor | None) -> Tensor | None:
    if part is None:
        return total
    part = part.float() if part.dtype in (torch.float16, torch.bfloat16) else part
    return part if total is None else total + part


class _RecomputedChunks(torch.autograd.Function):
    """Rows out = cat(fn(chunk, *params) for chunk), for x's flattened rows; backward recomputes fn
    one chunk at a time.

    The output is the fresh `cat`, not a view of it: a model may update it in place (Falcon's
    `mlp_output += attention_output`), which autograd forbids on a view made inside a Function.
    """

    @staticmethod
    def forward(ctx, fn: Callable, chunks: int, x: Tensor, *params: Tensor | None) -> Tensor:
        ctx.fn, ctx.chunks, ctx.autocast = fn, chunks, _autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        rows = x.reshape(-1, x.shape[-1])
        return torch.cat([fn(piece, *params) for piece in split_rows(rows, chunks)])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x_parts, grad_params = [], [None] * len(params)
        for piece, grad_piece in zip(split_rows(rows, ctx.chunks), split_rows(grad_rows, ctx.chunks)):
            # The recompute runs in the forward's autocast state (as torch.utils.checkpoint does),
            # whatever the state is when backward runs: its ops must have the forward's dtypes.
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                inputs = _detached([piece, *params], needs)
                out = ctx.fn(*inputs)
            grad_piece_x, *grad_piece_params = _grads(out, inputs, needs, grad_piece)
            grad_x_parts.append(grad_piece_x)
            grad_params = [_accumulate(t, p) for t, p in zip(grad_params, grad_piece_params)]
        grad_x = torch.cat(grad_x_parts).view_as(x) if needs[0] else None
        grad_params = [None if g is None else g.to(p.dtype) for g, p in zip(grad_params, params)]
        return None, None, grad_x, *grad_params


@dataclasses.dataclass(frozen=True)
class MLPForm:
    """How a matched MLP combines its linears (see `passes/mlp.py` for the graphs)."""

    gated: bool  # act(gate(x)) * up(x)
    fused: bool  # gate and up are one linear split with .chunk(2, -1)
    gate_index: int  # fused only: which half goes through the activation
    act_first: bool  # gated only: the product is act * up (else up * act)
    transposed: bool  # weights stored (in, out): GPT-2's Conv1D


class ChunkedMLP(nn.Module):
    """down(act(gate(x)) [* up(x)]) over M token chunks, recomputed per chunk in backward."""

    def __init__(self, form: MLPForm, activation: nn.Module, chunks: int):
        super().__init__()
        self.form, self.activation, self.chunks = form, activation, chunks

    def forward(self, x, gate_w, gate_b, up_w, up_b, down_w, down_b):
        rows = _RecomputedChunks.apply(self._chunk, self.chunks, x, gate_w, gate_b, up_w, up_b, down_w, down_b)
        return rows.view(*x.shape[:-1], rows.shape[-1])

    def _chunk(self, x, gate_w, gate_b, up_w, up_b, down_w, down_b):
        form = self.form
        gate = linear(x, gate_w, gate_b, form.transposed)
        if form.fused:
            halves = gate.chunk(2, dim=-1)
            gate, up = halves[form.gate_index], halves[1 - form.gate_index]
        elif form.gated:
            up = linear(x, up_w, up_b, form.transposed)
        hidden = self.activation(gate)
        if form.gated:
            hidden = hidden * up if form.act_first else up * hidden
        return linear(hidden, down_w, down_b, form.transposed)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, {self.form}"


@dataclasses.dataclass(frozen=True)
class CrossEntropyForm:
    """The loss a matched LM head feeds: F.cross_entropy's arguments that we support."""

    reduction: str  # "mean" or "sum"
    ignore_index: int
    label_smoothing: float
    transposed: bool  # the head's weight is stored (in, out)


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(transform(x @ W.T + b), y) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, head: ChunkedLinearCrossEntropy, x: Tensor, weight: Tensor, bias, target: Tensor):
        needs = ctx.needs_input_grad[1:4]
        form = head.form
        counted = (target != form.ignore_index).sum()
        # Gradients of the mean come out scaled in forward. An all-ignored batch has all-zero
        # gradients, as in PyTorch: clamp so that 0 * (1 / 0) does not turn them into NaN.
        grad_scale = 1.0 / counted.clamp(min=1).float() if form.reduction == "mean" else counted.new_ones(())
        total = x.new_zeros((), dtype=torch.float32)  # the loss accumulates in fp32 whatever its dtype
        grad_x_parts, grad_w, grad_b = [], None, None
        for x_piece, y_piece in zip(split_rows(x, head.chunks), split_rows(target, head.chunks)):
            with torch.enable_grad():
                inputs = _detached([x_piece, weight, bias], needs)
                loss = head.chunk_loss(*inputs, y_piece)
            gx, gw, gb = _grads(loss, inputs, needs, grad_scale.to(loss))
            grad_x_parts.append(gx)
            grad_w, grad_b = _accumulate(grad_w, gw), _accumulate(grad_b, gb)
            total, loss_dtype = total + loss.detach().float(), loss.dtype
        grad_x = torch.cat(grad_x_parts) if needs[0] else None
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        loss = total / counted if form.reduction == "mean" else total
        return loss.to(loss_dtype)  # cross_entropy's own output dtype: its logits' dtype

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return None, *scaled, None


class ChunkedLinearCrossEntropy(nn.Module):
    """The LM head and its cross-entropy over M token chunks; the N x V logits never exist."""

    def __init__(self, form: CrossEntropyForm, logit_transform: nn.Module, chunks: int):
        super().__init__()
        self.form, self.logit_transform, self.chunks = form, logit_transform, chunks

    def forward(self, x_rows: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
        return _LinearCrossEntropy.apply(self, x_rows, weight, bias, target)

    def chunk_loss(self, x, weight, bias, target) -> Tensor:
        logits = self.logit_transform(linear(x, weight, bias, self.form.transposed))
        return F.cross_entropy(
            logits,
            target,
            ignore_index=self.form.ignore_index,
            reduction="sum",
            label_smoothing=self.form.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, {self.form}"
