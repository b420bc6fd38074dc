"""The chunked runtime: what the passes put in place of a matched site, and the loop that runs it.

A rewritten site is one opaque custom op in the compiled graph (`torch.ops.mst.*`). Inductor can't
see into it, so however it orders or fuses the graph, no tensor of one chunk can be scheduled next
to another chunk's: the memory bound holds by construction. Inside, the op walks the tokens chunk
by chunk and calls a chunk body that Inductor compiled once per chunk shape (`chunk_bodies.py`):

    MLP, forward       mst::mlp_forward(site, x, params)                 the graph saves only x
        out = empty(N, d)
        for c in chunks:   out[c] = forward_body(x[c], params)
    MLP, backward      mst::mlp_backward(site, x, grad_out, params, needs)
        grad_x = empty(N, d);  grad_W = zeros(W.shape, fp32) for each weight
        for c in chunks:
            dx, (dz, inp) per linear = gradient_body(x[c], grad_out[c], params)   # recompute + grads
            grad_x[c] = dx;  grad_W.addmm_(dz.T, inp);  grad_b += dz.sum(0)
    LM head + loss     mst::linear_cross_entropy(site, x, [W, b, (A, B)], target, weights, needs)
        (the loss is the graph's last node: its gradient is a scalar, so the forward computes the
         gradients too, with no recompute, as torch core's F.linear_cross_entropy and Liger do)
        loss = 0;  grad_x = empty(N, d);  grad_W = zeros(W.shape, fp32)
        for c in chunks:
            loss_c, dx, dz = gradient_body(x[c], 1 / count, W, b, target[c])
            loss += loss_c;  grad_x[c] = dx;  grad_W.addmm_(dz.T, x[c])
        backward: grad_x * grad_loss, grad_W * grad_loss, computed in fp32

What lives where:
    across the whole step   x, the output / grad_x (N x d), one accumulator per weight, the loss
    one chunk at a time     the body's inputs and outputs: x[c], dz and h (N/M x I, N/M x V)
    nowhere                 any N x I or N x V tensor; for fp32 weights, any weight-sized partial
                            (bf16/fp16 weights: one chunk's product at a time, see Precision)

Chunk lengths come from the site's `ChunkPolicy` (`chunk_plan.py`) at run time, so under dynamic
shapes the number of chunks follows the length and one compiled graph serves every length.

Precision: the loss, bias gradients and weight gradients accumulate in fp32. For fp32 weights the
accumulator is the gradient itself, summed in place by `addmm_`. For bf16/fp16 weights (and under
autocast) each chunk's product comes out of the matmul in that dtype, one rounding of a 1/M part,
and is added into an fp32 accumulator: 4 bytes per weight element, plus that product, for the
duration of the loop. `grad_accumulation="param"` accumulates in place in the weight's own dtype
instead, as Liger-Kernel does: no extra memory, but one rounding of the running sum per chunk,
which the randomized parity test (`tests/test_random_parity.py`) found up to 2x over its bound at
~100 chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chunk_bodies, memory_budget
from .chunk_plan import ChunkPolicy
from .site_options import SiteOptions


def _runtime_version() -> str:
    """A hash of this runtime's code. It is part of every site key, and so of what torch's compile
    caches key on: a graph cached by another version of the runtime (another signature of its ops,
    say) is never reused."""
    from pathlib import Path

    here = Path(__file__).parent
    code = b"".join((here / name).read_bytes() for name in ("chunked_ops.py", "chunked_token_ops.py", "chunked_experts.py", "chunk_bodies.py", "chunk_plan.py", "memory_budget.py"))
    return hashlib.sha1(code).hexdigest()[:16]


_RUNTIME_VERSION = _runtime_version()

# site key -> the live modules that describe it. The graph names a site by key (a string argument
# of the custom op), so that the op stays a plain op that any compiler and cache can hold. The key
# hashes the whole description, so every module of one key computes the same; the compiled graph
# that calls a site holds its module (`mst_fx.dynamo_backend`), and once the last module of a key
# is gone, so are the key and the bodies compiled for it.
_SITES: dict[str, weakref.WeakSet] = {}
_UNGROUPED = memory_budget.SiteGroup()  # sites built outside a compile (`mst_fx.explain`, tests)


class ChunkedSite(nn.Module):
    """A site's description (`chunk`), its chunk policy, its memory budget and the compiler of its bodies."""

    # chunk x W tensors (W: the amplified width) one chunk holds at its largest: `memory_estimate`'s
    # figures for a gated MLP's backward, rounded up for the other kinds
    WORK_TENSORS = 6
    WORK_ITEMSIZE: int | None = None  # bytes per element of those tensors; None: the input's
    floor_scale = 1.0  # scales the lean rule's chunk floor (routed experts: E / k)

    def __init__(self, widths: tuple[int, int], options: SiteOptions):
        super().__init__()
        self.in_width, self.amplified_width = widths
        self.policy, self.compiler = options.policy, options.compiler
        self.fp32_accumulation = options.grad_accumulation == "fp32"
        fixed = self.policy.rows is not None or self.policy.count is not None
        self.budget = memory_budget.OFF if fixed else options.budget  # fixed chunking is not the budget's to change
        self.group = site_group(options)
        self.kept_row_bytes: dict[tuple, int] = {}  # by the dtypes and shapes of x and params

    def register(self, *description) -> None:
        settings = (self.policy, self.compiler, self.fp32_accumulation, self.budget)
        made_for = memory_budget.making()  # made at run time: no graph names it, so its key is its group's
        own = () if made_for is None else (id(made_for),)
        text = repr((_RUNTIME_VERSION, type(self).__name__, self.in_width, self.amplified_width, *settings, *description, *own))
        self.key = f"{type(self).__name__}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"
        _SITES.setdefault(self.key, weakref.WeakSet()).add(self)
        weakref.finalize(self, _forget, self.key)
        self.group.add(self)

    def work_row_bytes(self, x: Tensor) -> int:
        """Bytes per row of one chunk's intermediates, at their largest."""
        return self.WORK_TENSORS * self.amplified_width * (self.WORK_ITEMSIZE or x.element_size())

    def lean_rows(self, tokens: int, device_type: str) -> int:
        return self.policy.rows_for(tokens, self.in_width, self.amplified_width, device_type, self.floor_scale)

    def lean_chunk_bytes(self, tokens: int, device_type: str) -> int:
        """One chunk at the lean rule, in fp32 (the most it can be): what other sites reserve for it."""
        return min(tokens, self.lean_rows(tokens, device_type)) * self.WORK_TENSORS * self.amplified_width * 4

    def decide(self, x: Tensor, keep_row: int = 0) -> memory_budget.Decision:
        """This call's decision (`memory_budget.py`); `keep_row`: bytes per row it would keep, 0 if it can't."""
        lean = self.lean_rows(x.shape[0], x.device.type)
        return memory_budget.decide(
            self.budget, self.group, self.key, x, keep_row, self.work_row_bytes(x), lean, keep_row > 0
        )

    def lean_decision(self, x: Tensor) -> memory_budget.Decision:
        """The lean rule's chunks, whatever the budget: what a call retreats to (`run_retreating`)."""
        return memory_budget.Decision(False, self.lean_rows(x.shape[0], x.device.type), None)

    def run_retreating(self, x: Tensor, decision: memory_budget.Decision, run: Callable):
        """`run(decision)`, or, when that runs out of memory under a budget, `run` again at the lean
        rule once what the first call took is freed (`memory_budget.retreat`)."""
        with memory_budget.site_call(self.budget, x.device):
            try:
                return run(decision)
            except Exception as error:
                if decision.budget is None or not memory_budget.out_of_memory(error):
                    raise
                memory_budget.retreat(x.device, decision, self.key, error)
            # out of the handler: its traceback, and the failed call's tensors with it, are gone
            return run(self.lean_decision(x))

    def keep(self, x: Tensor, kept: object, nbytes: int, decision: memory_budget.Decision) -> Tensor:
        """The ticket of a call that kept `kept` (`nbytes` bytes) for its backward."""
        return memory_budget.ledger(x.device).keep((kept, decision), nbytes)

    def keep_graph(self, x: Tensor, kept: object, nbytes: int, decision: memory_budget.Decision) -> Tensor:
        """`keep` for a call that kept its autograd graph (`kept_graphs.py`): the bytes per row it
        measured are what the site's next decisions read (`keep_row`)."""
        self.keep_row = -(-nbytes // max(1, x.shape[0]))
        return self.keep(x, kept, nbytes, decision)

    def backward_retreating(self, x: Tensor, ticket: Tensor, replay: Callable, recompute: Callable):
        """A backward: `replay(kept)` from what its forward kept behind `ticket`, or else
        `recompute(decision)` chunk by chunk; when a replay runs out of memory, the kept tensors
        go and it recomputes at the lean rule (`run_retreating`)."""
        memory_budget.note_backward(self.budget, x.device)
        stash = [memory_budget.ledger(x.device).take(ticket)]  # (kept, the forward's decision), or None

        def run(decision: memory_budget.Decision):
            kept = stash.pop() if stash else None  # a lean retry drops what the forward kept
            if decision.keep and kept is not None:
                return replay(kept[0])
            del kept
            return recompute(decision)

        return self.run_retreating(x, stash[0][1] if stash[0] is not None else self.decide(x), run)

    def chunks_of(self, x: Tensor, decision: memory_budget.Decision | None = None) -> list[tuple[int, int]]:
        decision = decision or self.decide(x)
        policy = self.policy if decision.budget is None else ChunkPolicy(rows=decision.rows)
        return policy.chunks(x.shape[0], self.in_width, self.amplified_width, x.device.type, self.floor_scale)

    def chunk(self, linear, x: Tensor, params, *extra) -> Tensor:
        raise NotImplementedError


def _site(key: str) -> ChunkedSite:
    for site in _SITES.get(key, ()):
        return site
    raise KeyError(f"mst: no live site {key}: the compiled graph that called it is gone")


def _forget(key: str) -> None:
    """A site of `key` is gone: with the last one go the key and the bodies compiled for it."""
    if not any(True for _ in _SITES.get(key, ())):
        _SITES.pop(key, None)
        chunk_bodies.forget(key)


def site_group(options: SiteOptions) -> memory_budget.SiteGroup:
    """The group of the sites built with these options: their compiled graph's, where sites made
    at run time for it (the loss of its deferred logits) are kept too; outside a compile, the
    ungrouped sites'."""
    return getattr(options, "group", None) or _UNGROUPED


def live_site_keys() -> set[str]:
    """The keys of the sites alive now (the compiled graphs that call them are still held)."""
    return {key for key, sites in list(_SITES.items()) if any(True for _ in sites)}


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _probe(site: ChunkedSite, x: Tensor, params, autocast_dtype, *extra) -> Tensor:
    """The chunk's output on zero rows: its dtype and trailing shape, for the real op and the fake."""
    rows, extra = x.narrow(0, 0, 0), [e.narrow(0, 0, 0) for e in extra]
    with torch.no_grad(), chunk_bodies.autocast(x.device.type, autocast_dtype):
        return site.chunk(chunk_bodies.plain_linear(params), rows, params, *extra)


# ---------------------------------------------------------------- the loops


def _forward_loop(site: ChunkedSite, x: Tensor, params: list, autocast_dtype, decision=None) -> Tensor:
    probe = _probe(site, x, params, autocast_dtype)
    out = x.new_empty((x.shape[0], *probe.shape[1:]), dtype=probe.dtype)
    tensors, present = _present(params)
    body = chunk_bodies.forward_body(site.chunk, present, autocast_dtype)
    for start, length in site.chunks_of(x, decision):
        inputs = [x.narrow(0, start, length), *tensors]
        entry = chunk_bodies.compiled((site.key, "forward", present, autocast_dtype), body, None, inputs, site.compiler)
        (out_c,) = chunk_bodies.run(entry, inputs)
        out.narrow(0, start, length).copy_(out_c)
    return out


def _keeping_forward(site: ChunkedSite, x: Tensor, params: list, autocast_dtype, decision):
    """(output, {start: the intermediates of the piece at start}, where they go in the replay).

    The decision's pieces are one chunk when N is a power of two, else N's binary pieces (512 + 8
    for 520): a body compiled per power of two serves every length, where one per N would compile
    again at each new length."""
    tensors, present = _present(params)
    body, positions = chunk_bodies.keeping_forward_body(site.chunk, present, autocast_dtype)
    out, kept, layout = None, {}, None
    for start, length in site.chunks_of(x, decision):
        inputs = [x.narrow(0, start, length), *tensors]
        entry = chunk_bodies.compiled((site.key, "keeping", present, autocast_dtype), body, positions, inputs, site.compiler)
        out_c, *kept[start] = chunk_bodies.run(entry, inputs)
        out = x.new_empty((x.shape[0], *out_c.shape[1:]), dtype=out_c.dtype) if out is None else out
        out.narrow(0, start, length).copy_(out_c)
        layout = entry[1]
    return out, kept, layout


def _kept_row_bytes(site: ChunkedSite, x: Tensor, params: list, autocast_dtype) -> int:
    """Bytes per row that keeping this site's intermediates costs (run once on zero rows per dtypes)."""
    tensors, present = _present(params)
    key = (x.dtype, autocast_dtype, tuple((t.dtype, tuple(t.shape)) for t in tensors))
    if key not in site.kept_row_bytes:
        body, _ = chunk_bodies.keeping_forward_body(site.chunk, present, autocast_dtype)
        with torch.no_grad():
            kept = body(x.narrow(0, 0, 0), *tensors)[1:]
        site.kept_row_bytes[key] = sum(k.shape[1:].numel() * k.element_size() for k in kept)
    return site.kept_row_bytes[key]


def _gradient_loop(site, x, seed_of, params, extra_of, needs, autocast_dtype, with_loss, chunks, replay=None):
    """(fp32 loss sum or None, grad_x or None, [gradient or None per param]) over `chunks`, the
    (start, length) pairs. `replay`: where the kept intermediates (the last of `extra_of`'s tensors)
    go, when the backward replays them instead of recomputing."""
    tensors, present = _present(params)
    body, layouts = chunk_bodies.gradient_body(site.chunk, present, needs, autocast_dtype, with_loss, replay)
    key = (site.key, "gradient", present, tuple(needs), autocast_dtype, replay)
    grad_x = torch.empty_like(x) if needs[0] else None
    accumulators = [_accumulator(p, site.fp32_accumulation) if need else None for p, need in zip(params, needs[1:])]
    loss = x.new_zeros((), dtype=torch.float32) if with_loss else None
    for start, length in chunks:
        x_c, seed = x.narrow(0, start, length), seed_of(start, length)
        inputs = [x_c, seed, *tensors, *extra_of(start, length)]
        entry = chunk_bodies.compiled(key, body, layouts, inputs, site.compiler)
        results, layout = chunk_bodies.run(entry, inputs), entry[1]
        if with_loss:
            loss += results[layout.loss].float()
        if layout.grad_x is not None:
            grad_x.narrow(0, start, length).copy_(results[layout.grad_x])
        for linear in layout.linears:
            _accumulate_linear(linear, accumulators, results, x_c, seed)
        for param, result in layout.elementwise:
            accumulators[param].add_(results[result])
        del results  # this chunk's N/M x W tensors go before the next chunk's are made
    grads = [None if a is None else a.to(p.dtype) for a, p in zip(accumulators, params)]
    return loss, grad_x, grads


def _accumulate_linear(linear: chunk_bodies.LinearGrads, accumulators, results, x_c, seed) -> None:
    dz = seed if linear.dz == -1 else results[linear.dz]
    if linear.input is not None:
        inp = x_c if linear.input == -1 else results[linear.input]
        # W stored (out, in): dW = dz^T inp; stored (in, out) (Conv1D): dW = inp^T dz.
        a, b = (inp.t(), dz) if linear.transposed else (dz.t(), inp)
        _add_matmul(accumulators[linear.weight], a, b)
    if linear.bias_grad is not None:
        accumulators[linear.bias].add_(results[linear.bias_grad])


def _add_matmul(accumulator: Tensor, a: Tensor, b: Tensor) -> None:
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)  # in place: the matmul adds straight into the gradient
    else:  # a bf16/fp16 product of one chunk (one rounding of a 1/M part), added in fp32
        accumulator.add_(torch.mm(a, b))


def _accumulator(param: Tensor, fp32: bool) -> Tensor:
    """fp32, or (option grad_accumulation="param") the weight's own dtype; biases always fp32."""
    fp32 = fp32 or param.dim() == 1
    return torch.zeros(param.shape, dtype=torch.float32 if fp32 else param.dtype, device=param.device)


def _present(params) -> tuple[list[Tensor], tuple[bool, ...]]:
    return [p for p in params if p is not None], tuple(p is not None for p in params)


def _contiguous(tensors):
    return [None if t is None else t.detach().contiguous() for t in tensors]


# ---------------------------------------------------------------- the custom ops


@torch.library.custom_op("mst::mlp_forward", mutates_args=())
def mlp_forward(
    site: str, x: Tensor, params: list[Tensor | None], autocast_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(output, ticket): the ticket names the intermediates kept for backward, when the budget let
    this call keep them (`memory_budget.py`); 0 when the backward is to recompute them."""
    mlp = _site(site)
    x, *params = _contiguous([x, *params])

    def run(decision: memory_budget.Decision):
        if not decision.keep:
            return _forward_loop(mlp, x, params, autocast_dtype, decision), memory_budget.no_ticket()
        out, kept, positions = _keeping_forward(mlp, x, params, autocast_dtype, decision)
        nbytes = sum(t.numel() * t.element_size() for piece in kept.values() for t in piece)
        return out, mlp.keep(x, (positions, kept), nbytes, decision)

    return mlp.run_retreating(x, mlp.decide(x, _kept_row_bytes(mlp, x, params, autocast_dtype)), run)


@mlp_forward.register_fake
def _(site, x, params, autocast_dtype):
    probe = _probe(_site(site), x, params, autocast_dtype)
    return x.new_empty((x.shape[0], *probe.shape[1:]), dtype=probe.dtype), memory_budget.no_ticket()


@torch.library.custom_op("mst::mlp_backward", mutates_args=())
def mlp_backward(
    site: str, x: Tensor, ticket: Tensor, grad_out: Tensor, params: list[Tensor | None], needs: list[bool],
    autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    x, grad_out, *params = _contiguous([x, grad_out, *params])
    mlp = _site(site)
    seed_of = lambda s, n: grad_out.narrow(0, s, n)  # noqa: E731

    def replay(kept):  # the forward's pieces, replayed: no recompute
        positions, pieces = kept
        chunks = [(start, piece[0].shape[0]) for start, piece in pieces.items()]
        extra_of = lambda s, n: pieces[s]  # noqa: E731
        return _gradient_loop(mlp, x, seed_of, params, extra_of, needs, autocast_dtype, False, chunks, positions)

    def recompute(decision):
        chunks = mlp.chunks_of(x, decision)
        return _gradient_loop(mlp, x, seed_of, params, lambda s, n: (), needs, autocast_dtype, False, chunks)

    _, grad_x, grads = mlp.backward_retreating(x, ticket, replay, recompute)
    return [g for g in [grad_x, *grads] if g is not None]


@mlp_backward.register_fake
def _(site, x, ticket, grad_out, params, needs, autocast_dtype):
    return [torch.empty_like(t) for t, need in zip([x, *params], needs) if need]


@torch.library.custom_op("mst::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    site: str, x: Tensor, params: list[Tensor | None], target: Tensor, weights: Tensor | None, needs: list[bool],
    autocast_dtype: torch.dtype | None,
) -> list[Tensor]:  # fmt: skip
    """[loss, *the gradients in `needs`], the gradients being those of the loss itself. `params`:
    the head's weight and bias, then its LoRA adapter's A and B if it has one. `weights`: one per
    token, for a loss written as a weighted sum of per-token terms (a mask), or None."""
    head = _site(site)
    x, target, weights, *params = _contiguous([x, target, weights, *params])
    extra = [target] if weights is None else [target, weights]
    counted = (target != head.form.ignore_index).sum()
    mean = head.form.reduction == "mean"
    # An all-ignored batch has all-zero gradients, as in PyTorch: clamp so 0 * (1 / 0) is not NaN.
    scale = 1.0 / counted.clamp(min=1).float() if mean else x.new_ones((), dtype=torch.float32)
    extra_of = lambda s, n: [e.narrow(0, s, n) for e in extra]  # noqa: E731
    total, grad_x, grads = head.run_retreating(x, head.decide(x), lambda decision: _gradient_loop(
        head, x, lambda s, n: scale, params, extra_of, needs, autocast_dtype, True, head.chunks_of(x, decision)
    ))  # fmt: skip
    loss = total / counted if mean else total
    dtype = _probe(head, x, params, autocast_dtype, *extra).dtype
    return [loss.to(dtype), *(g for g in [grad_x, *grads] if g is not None)]


@linear_cross_entropy.register_fake
def _(site, x, params, target, weights, needs, autocast_dtype):
    loss = _probe(_site(site), x, params, autocast_dtype, *([target] if weights is None else [target, weights]))
    return [loss.new_empty(()), *(torch.empty_like(t) for t, need in zip([x, *params], needs) if need)]


# ---------------------------------------------------------------- autograd: the ops as one function each


def refuse_double_backward() -> None:
    """Gradients computed chunk by chunk are not themselves differentiable: under create_graph=True
    (a gradient penalty) they would silently drop every second-order term through this site."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "mst: a chunked site (MLP or LM head) does not support double backward (create_graph=True); "
            "compile with options={'mlp': False, 'lm_head': False} for second-order gradients"
        )


class _ChunkedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, x: Tensor, *params: Tensor | None) -> Tensor:
        # The autocast state is read while the graph is traced, where it is the forward's (the
        # ambient one and any region the model enters), and handed to both ops as a constant.
        ctx.key, ctx.autocast = key, _autocast_dtype(x)
        out, ticket = torch.ops.mst.mlp_forward(key, x, list(params), ctx.autocast)
        ctx.save_for_backward(x, ticket, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward()
        x, ticket, *params = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[1:])
        grads = iter(torch.ops.mst.mlp_backward(ctx.key, x, ticket, grad_out, params, needs, ctx.autocast))
        return None, *(next(grads) if need else None for need in needs)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, x: Tensor, target: Tensor, weights: Tensor | None, *params: Tensor | None) -> Tensor:
        needs = [ctx.needs_input_grad[1], *ctx.needs_input_grad[4:]]
        autocast_dtype = _autocast_dtype(x)
        loss, *grads = torch.ops.mst.linear_cross_entropy(key, x, list(params), target, weights, needs, autocast_dtype)
        found = iter(grads)
        ctx.save_for_backward(*(next(found) if need else None for need in needs))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        refuse_double_backward()
        grad_x, *grads = scaled_saved_gradients(ctx, grad_loss)
        return None, grad_x, None, None, *grads


def scaled_saved_gradients(ctx, grad_loss: Tensor) -> list[Tensor | None]:
    """The gradients a scalar loss's forward computed and saved, times the loss's gradient.
    In fp32: GradScaler's 65536 is inf in fp16, and a bf16 scale would be rounded."""
    scale = grad_loss.float()
    return [None if g is None else (g.float() * scale).to(g.dtype) for g in ctx.saved_tensors]


# ---------------------------------------------------------------- the modules the passes insert


@dataclasses.dataclass(frozen=True)
class MLPForm:
    """How a matched MLP combines its linears (see `passes/mlp.py` for the graphs)."""

    gated: bool  # act(gate(x)) * up(x)
    fused: bool  # gate and up are one linear split with .chunk(2, -1)
    gate_index: int  # fused only: which half goes through the activation
    act_first: bool  # gated only: the product is act * up (else up * act)
    transposed: bool  # weights stored (in, out): GPT-2's Conv1D
    adapters: tuple[AdapterForm | None, ...] = (None, None, None)  # LoRA on gate, up, down
    # gated only: ("mul" | "div", s) on the product, in order; s a number, or ("param", k) for the
    # k-th per-channel scale, passed after the adapters' weights (params 12 on)
    scaling: tuple[tuple[str, float | tuple[str, int]], ...] = ()


@dataclasses.dataclass(frozen=True)
class AdapterForm:
    """A LoRA adapter on one of the MLP's linears: `base(x) + B(A(x')) * scale` (see passes/adapters.py)."""

    scale: float
    input_dtype: torch.dtype | None  # x' = x.to(input_dtype); None: x itself
    output_dtype: torch.dtype | None  # the sum cast to this; None: left as it is


class ChunkedMLP(ChunkedSite):
    """down(act(gate(x)) [* up(x)]) chunk by chunk; backward recomputes one chunk at a time."""

    def __init__(self, form: MLPForm, activation: nn.Module, widths: tuple[int, int], options: SiteOptions):
        super().__init__(widths, options)
        self.form, self.activation = form, activation
        self.register(form, activation.code)

    def forward(self, x, gate_w, gate_b, up_w, up_b, down_w, down_b, *adapter_weights_and_scales):
        """Then A and B of each linear's LoRA adapter (None, None where it has none), and the
        per-channel scales of the product (both only when the form has any)."""
        rows = x.reshape(-1, x.shape[-1])
        out = _ChunkedMLPFunction.apply(
            self.key, rows, gate_w, gate_b, up_w, up_b, down_w, down_b, *adapter_weights_and_scales
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    def chunk(self, linear, x, params, *extra):
        form = self.form
        gate = self._linear(linear, 0, x, params)
        if form.fused:
            halves = gate.chunk(2, dim=-1)
            gate, up = halves[form.gate_index], halves[1 - form.gate_index]
        elif form.gated:
            up = self._linear(linear, 1, x, params)
        hidden = self.activation(gate)
        if form.gated:
            hidden = hidden * up if form.act_first else up * hidden
        for op, s in form.scaling:
            s = params[12 + s[1]] if isinstance(s, tuple) else s  # ("param", k): the k-th scale
            hidden = hidden * s if op == "mul" else hidden / s
        return self._linear(linear, 2, hidden, params)

    def _linear(self, linear, which: int, x, params):
        """The gate (0), up (1) or down (2) linear, with its adapter if it has one. Params hold
        weight and bias of each linear (0-5), then A and B of each adapter (6-11)."""
        w = 2 * which
        return adapted_linear(linear, x, params, (w, w + 1, 6 + w, 7 + w), self.form.transposed, self.form.adapters[which])

    def extra_repr(self) -> str:
        return f"{self.policy.describe()}, {self.form}"


def adapted_linear(linear, x, params, indices: tuple[int, int, int, int], transposed: bool, adapter):
    """`linear` (a chunk function's, see `chunk_bodies`) with its LoRA adapter if it has one:
    `base(x) + B(A(x')) * scale`. `indices`: of the weight, bias, A and B in `params`."""
    w, b, a, bb = indices
    out = linear(x, w, b if params[b] is not None else None, transposed)
    if adapter is None:
        return out
    a_in = x if adapter.input_dtype is None else x.to(adapter.input_dtype)
    low_rank = linear(linear(a_in, a, None, False), bb, None, False)
    out = out + low_rank * adapter.scale
    return out if adapter.output_dtype is None else out.to(adapter.output_dtype)


@dataclasses.dataclass(frozen=True)
class CrossEntropyForm:
    """The loss a matched LM head feeds: F.cross_entropy's arguments that we support."""

    reduction: str  # "mean" or "sum"
    ignore_index: int
    label_smoothing: float
    transposed: bool  # the head's weight is stored (in, out)
    adapter: AdapterForm | None = None  # a LoRA adapter on the head: params 2 and 3 are its A and B


def head_logits(linear, x, params, form: CrossEntropyForm):
    """The head's logits for a chunk function: params are weight, bias (and the adapter's A, B)."""
    return adapted_linear(linear, x, params, (0, 1, 2, 3), form.transposed, form.adapter)


class ChunkedLinearCrossEntropy(ChunkedSite):
    """The LM head and its cross-entropy chunk by chunk; the N x V logits never exist."""

    WORK_TENSORS = 3  # a chunk's logits, their fp32 log-softmax and their gradient
    WORK_ITEMSIZE = 4

    def __init__(self, form: CrossEntropyForm, logit_transform: nn.Module, widths: tuple[int, int], options: SiteOptions):
        super().__init__(widths, options)
        self.form, self.logit_transform = form, logit_transform
        self.register(form, logit_transform.code)

    def forward(self, x_rows: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *adapter, weights=None):
        """`adapter`: the LoRA adapter's A and B when the form has one. `weights`: one per token
        (the loss is then the weighted sum of the per-token terms)."""
        return _LinearCrossEntropyFunction.apply(self.key, x_rows, target, weights, weight, bias, *adapter)

    def chunk(self, linear, x, params, target, *weights):
        logits = self.logit_transform(head_logits(linear, x, params, self.form))
        form = self.form
        losses = F.cross_entropy(
            logits, target, ignore_index=form.ignore_index, reduction="none" if weights else "sum",
            label_smoothing=form.label_smoothing,
        )  # fmt: skip
        return (losses * weights[0]).sum() if weights else losses

    def extra_repr(self) -> str:
        return f"{self.policy.describe()}, {self.form}"
