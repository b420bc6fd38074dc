"""Chunk bodies: one chunk's computation as a function of tensors, traced once per chunk shape by
`make_fx` and compiled by Inductor (or run as the traced ATen graph under the other compilers).

A site describes its chunk as `chunk(linear, x, params, *extra)`, calling `linear(inp, w, b, t)`
for each of its linears (`w`, `b`: indices into `params`; `t`: weight stored (in, out)). Two bodies
are made from that description:

* the **forward body**, `chunk` itself: `(x_c, *params) -> (out_c,)`;
* the **gradient body**: runs the chunk under autograd and returns, besides the gradient of `x_c`,
  for every linear the gradient of its *output* (`dz`), the input it was fed and the bias gradient.
  The weight gradient `dz^T inp` is left to the caller, which adds it into one accumulator in place
  (`addmm_`): no chunk's weight-sized partial is ever materialised, and the N/M x I (or N/M x V)
  tensors exist only between a body's call and the caller's accumulate.

`Layout` records, at trace time, where each of those results sits in the body's flat output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_warned_compile_failure: list[bool] = []

# Compiled bodies, shared by every site with the same description: key -> (callable, Layout).
_BODIES: dict[tuple, tuple[Callable, Layout | None]] = {}


def plain_linear(params: Sequence[Tensor | None]):
    """`linear(inp, w, b, transposed)` for a chunk function: just the computation."""

    def linear(inp: Tensor, w: int, b: int | None, transposed: bool) -> Tensor:
        weight, bias = params[w], None if b is None else params[b]
        if not transposed:
            return F.linear(inp, weight, bias)
        return torch.mm(inp, weight) if bias is None else torch.addmm(bias, inp, weight)

    return linear


@dataclasses.dataclass
class _Recorded:
    weight: int
    bias: int | None
    transposed: bool
    input: Tensor
    output: Tensor


@dataclasses.dataclass(frozen=True)
class LinearGrads:
    """Where one linear's gradient pieces are in a gradient body's output (None: not returned)."""

    weight: int
    bias: int | None
    transposed: bool
    dz: int | None  # gradient of the linear's output; -1: it is the body's seed (the chunk's grad_out)
    input: int | None  # the input as fed to the matmul; -1: it is x_c itself
    bias_grad: int | None


@dataclasses.dataclass(frozen=True)
class Layout:
    grad_x: int | None
    linears: tuple[LinearGrads, ...]
    loss: int | None = None
    # (param index, result index) of the gradients of params no linear takes (a per-channel scale)
    elementwise: tuple[tuple[int, int], ...] = ()


def _recording_linear(params, records: list[_Recorded], autocast_dtype: torch.dtype | None):
    compute = plain_linear(params)

    def linear(inp, w, b, transposed):
        if autocast_dtype is not None:  # what autocast does to a linear, made explicit so that the
            inp = inp.to(autocast_dtype)  # input we record is the one the matmul really saw
        out = compute(inp, w, b, transposed)
        if not out.requires_grad:  # a frozen linear on a frozen input: still want d(out)
            out = out.detach().requires_grad_()
        records.append(_Recorded(w, b, transposed, inp, out))
        return out

    return linear


def autocast(device_type: str, dtype: torch.dtype | None):
    """The forward's autocast state, entered inside a body so that tracing bakes its casts in."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _with_nones(tensors: Sequence[Tensor], present: Sequence[bool]) -> list[Tensor | None]:
    """The params list as the chunk function indexes it: bodies take only the tensors (no None)."""
    found = iter(tensors)
    return [next(found) if p else None for p in present]


def forward_body(chunk: Callable, present: Sequence[bool], autocast_dtype):
    """(x_c, *params, *extra) -> outputs: the chunk's computation alone (one output or several)."""
    count = sum(present)

    def body(x, *rest):
        params, extra = _with_nones(rest[:count], present), rest[count:]
        with autocast(x.device.type, autocast_dtype):
            out = chunk(plain_linear(params), x, params, *extra)
        return out if isinstance(out, tuple) else (out,)

    return body


def keeping_forward_body(chunk: Callable, present: Sequence[bool], autocast_dtype):
    """(x, *params) -> (out, *kept), and a list that receives, at trace, which linear calls (in
    order) the kept tensors are the outputs of: every linear's but the one whose output is `out`."""
    positions: list[tuple[int, ...]] = []
    count = sum(present)

    def body(x, *rest):
        params = _with_nones(rest[:count], present)
        outputs: list[Tensor] = []
        compute = plain_linear(params)

        def linear(inp, w, b, transposed):
            if autocast_dtype is not None:
                inp = inp.to(autocast_dtype)
            outputs.append(compute(inp, w, b, transposed))
            return outputs[-1]

        with autocast(x.device.type, autocast_dtype):
            out = chunk(linear, x, params)
        kept = [i for i, o in enumerate(outputs) if o is not out]
        positions[:] = [tuple(kept)]
        return (out, *(outputs[i] for i in kept))

    return body, positions


class _Replayed(torch.autograd.Function):
    """A linear's output replayed from what the forward kept: no matmul forward; backward gives
    its input's gradient, d(out) @ W (the weight's is the caller's, from d(out) and the input)."""

    @staticmethod
    def forward(ctx, inp: Tensor, weight: Tensor, value: Tensor, transposed: bool) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.transposed = transposed
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        weight = weight.to(grad.dtype)
        grad_inp = grad.mm(weight.t() if ctx.transposed else weight) if ctx.needs_input_grad[0] else None
        return grad_inp, None, None, None


def _replaying_linear(params, records: list[_Recorded], autocast_dtype, replay: tuple[int, ...], kept: list[Tensor]):
    """`_recording_linear` whose k-th call returns the k-th kept output instead of computing it; the
    one call not kept (the output's) returns zeros of its shape, whose value nothing reads."""
    calls = iter(range(len(replay) + 1))

    def linear(inp, w, b, transposed):
        if autocast_dtype is not None:
            inp = inp.to(autocast_dtype)
        call, weight = next(calls), params[w]
        if call in replay:
            value = kept[replay.index(call)]
        else:
            width = weight.shape[1] if transposed else weight.shape[0]
            value = inp.new_zeros(()).expand(inp.shape[0], width)
        out = _Replayed.apply(inp, weight, value, transposed)
        if not out.requires_grad:
            out = out.detach().requires_grad_()
        records.append(_Recorded(w, b, transposed, inp, out))
        return out

    return linear


def gradient_body(
    chunk: Callable, present: Sequence[bool], needs: Sequence[bool], autocast_dtype, with_loss: bool,
    replay: tuple[int, ...] | None = None,
):  # fmt: skip
    """(x_c, seed, *params, *extra) -> flat results, and a list that receives the Layout at trace.

    `needs`: for x, then each param, whether its gradient is wanted. `seed`: the gradient of the
    chunk's output (MLP), or the loss's scale (LM head, `with_loss`). `replay`: the forward kept
    its linears' outputs (`keeping_forward_body`); they are the last `len(replay)` of `extra`, and
    the chunk is replayed from them: only its elementwise ops run again, no matmul of the forward."""
    layouts: list[Layout] = []
    count = sum(present)

    def body(x, seed, *rest):
        params, extra = _with_nones(rest[:count], present), rest[count:]
        kept: list[Tensor] = []
        if replay is not None:
            extra, kept = extra[: len(extra) - len(replay)], list(extra[len(extra) - len(replay) :])
        records: list[_Recorded] = []
        with torch.enable_grad(), autocast(x.device.type, autocast_dtype):
            x = x.detach().requires_grad_(needs[0])
            # Params no linear takes are differentiated directly; which ones is known after the
            # chunk runs, so each param that may be one is a leaf that requires grad.
            params = [p.detach().requires_grad_(need) if p is not None else None for p, need in zip(params, needs[1:])]
            if replay is None:
                linear = _recording_linear(params, records, autocast_dtype)
            else:
                linear = _replaying_linear(params, records, autocast_dtype, replay, kept)
            out = chunk(linear, x, params, *extra)
            grad_seed = seed.to(out.dtype) if with_loss else seed
            wanted = [r for r in records if needs[1 + r.weight] or (r.bias is not None and needs[1 + r.bias])]
            taken = {i for r in records for i in (r.weight, r.bias)}
            free = [i for i, need in enumerate(needs[1:]) if need and i not in taken]
            targets = ([x] if needs[0] else []) + [r.output for r in wanted if r.output is not out]
            targets += [params[i] for i in free]
            grads = list(torch.autograd.grad(out, targets, grad_seed)) if targets else []
            free_grads = grads[len(grads) - len(free) :]
            del grads[len(grads) - len(free) :]
        results = [out.detach()] if with_loss else []
        put = results.append
        grad_x = None
        if needs[0]:
            grad_x = len(results)
            put(grads.pop(0))
        linears = []
        for r in wanted:
            dz_tensor = grad_seed if r.output is out else grads.pop(0)
            dz = -1 if r.output is out and not with_loss else len(results)
            if dz != -1:
                put(dz_tensor)
            inp = None
            if needs[1 + r.weight]:
                inp = -1 if r.input is x else len(results)
                if inp != -1:
                    put(r.input.detach())
            bias_grad = None
            if r.bias is not None and needs[1 + r.bias]:
                bias_grad = len(results)
                put(dz_tensor.sum(0, dtype=torch.float32))
            linears.append(LinearGrads(r.weight, r.bias, r.transposed, dz, inp, bias_grad))
        elementwise = []
        for i, g in zip(free, free_grads):
            elementwise.append((i, len(results)))
            put(g.float())
        layouts[:] = [Layout(grad_x, tuple(linears), 0 if with_loss else None, tuple(elementwise))]
        return tuple(results)

    return body, layouts


def compiled(key: tuple, body: Callable, layouts: list | None, inputs: Sequence[Tensor], compiler: str):
    """The body compiled for these inputs' shapes, strides and dtypes (traced on first use)."""
    signature = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)
    entry = _BODIES.get((key, compiler, signature))
    if entry is None:
        entry = _BODIES[(key, compiler, signature)] = _compile(body, layouts, inputs, compiler)
        log.debug("mst: compiled a chunk body for %s at %s", key[0], [tuple(t.shape) for t in inputs[:1]])
    return entry


def forget(site_key: str) -> None:
    """Drop the bodies compiled for a site that is gone (`chunked_ops._forget`)."""
    for entry in [k for k in _BODIES if k[0][0] == site_key]:
        del _BODIES[entry]


# The dispatch state of ordinary code. A custom op's implementation runs with autograd's dispatch
# keys excluded; tracing a gradient body needs autograd, so the trace runs in this state instead.
ORDINARY_DISPATCH = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _compile(body, layouts, inputs, compiler):
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch._C._ForceDispatchKeyGuard(*ORDINARY_DISPATCH), torch.no_grad(), _autocast_off(inputs[0].device.type):
        graph = make_fx(body, tracing_mode="fake")(*inputs)
        layout = layouts[0] if layouts else None
        if compiler != "inductor":
            return graph, layout
        try:
            return _inductor_compile(graph, list(inputs)), layout
        except Exception as error:  # the traced ATen graph computes the same, only slower
            if not _warned_compile_failure:
                _warned_compile_failure.append(True)
                log.warning(
                    "mst: Inductor failed to compile a chunk body (%s: %s); running it uncompiled",
                    type(error).__name__,
                    error,
                )
            return graph, layout


def _inductor_compile(graph, inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, inputs)


def _autocast_off(device_type: str):
    """Bodies carry their autocast casts explicitly (traced in the forward's state); the ambient
    state, whatever it is when the body runs, must not apply on top."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def run(entry, inputs: Sequence[Tensor]) -> list[Tensor]:
    fn, _ = entry
    with torch.no_grad(), _autocast_off(inputs[0].device.type):
        return list(fn(*inputs))
