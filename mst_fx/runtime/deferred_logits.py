"""What a compiled model returns in place of logits whose loss is computed outside its graph.

Most training stacks (torchtitan, litgpt, torchtune, a hand-written loop) take the logits out of the
model and compute the loss elsewhere: eagerly, or in a `torch.compile` region of its own. The graph
mst sees then ends at the LM head, and the N x V logits would be its output. Instead
(`passes/returned_logits.py`) the graph returns the head's input, and the caller gets a
`DeferredLogits`: a tensor with the logits' shape, dtype and device that holds the rows (N x d), the
head's weight and bias, and the elementwise ops applied to the logits so far (casts, scaling,
soft-capping). Then:

* views, reshapes, flatten, leading-dim slices and splits (`logits[:, :-1]`, `.reshape(-1, V)`,
  `.split(128)`), a class dim moved to dim 1 (`.transpose(1, 2)`), casts and scalar scaling give
  another `DeferredLogits`: the same op on the rows, or one more op in its transform;
* `F.cross_entropy` (and `nn.CrossEntropyLoss`) on it runs chunked: reduction "mean" or "sum" as
  the LM-head rewrite runs it (`torch.ops.mst.linear_cross_entropy`, gradients in forward);
  "none" gives `DeferredTokenLosses` (`per_token_loss.py`): concatenated and summed, as litgpt's
  chunked loss does over its splits, they are one summed loss again, computed as above; anything
  else computes them per token, chunked, with recompute in backward;
* row-wise ops (softmax, log_softmax, exp, ... over the last dim) stay deferred, and reductions of
  each row (log-probs by gather, logsumexp, an entropy's sum, argmax) run chunked, per token
  (`deferred_rows.py`): what RL and preference trainers compute outside the model;
* a backward hook (`register_hook`, as Lightning Fabric adds) observes the rows' gradient;
* anything else computes the logits, once per `DeferredLogits`, through autograd (gradients stay
  exact) and says so at WARNING level, once: the saving is lost there, nothing else.

Every op on a `DeferredLogits` runs eagerly: inside another `torch.compile` region Dynamo breaks the
graph there (the handler is `torch._dynamo.disable`d), which keeps a compiled loss correct.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from . import deferred_rows
from .chunk_bodies import autocast, plain_linear
from .chunked_ops import AdapterForm, ChunkedLinearCrossEntropy, CrossEntropyForm, head_logits, site_group
from .dropped_logits import READABLE
from .per_token_loss import DeferredTokenLosses, per_token_cross_entropy
from .site_options import SiteOptions

log = logging.getLogger(__name__)

_warned: set[str] = set()
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
    """The LM head a `DeferredLogits` will project through, and what follows it on the logits."""

    params: tuple[Tensor | None, ...]  # weight, bias, and the LoRA adapter's A and B (None: absent)
    transposed: bool  # weight stored (in, out): GPT-2's Conv1D
    adapter: AdapterForm | None  # a LoRA adapter on the head
    transform: fx.GraphModule  # elementwise ops on the logits: casts, scaling, soft-capping
    dtype: torch.dtype  # of the logits after `transform`
    autocast_dtype: torch.dtype | None  # the head ran under autocast in the model's graph
    options: SiteOptions
    location: str

    @property
    def weight(self) -> Tensor:
        return self.params[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def form(self, reduction: str, ignore_index: int, label_smoothing: float) -> CrossEntropyForm:
        return CrossEntropyForm(reduction, ignore_index, label_smoothing, self.transposed, self.adapter)

    def project(self, rows: Tensor) -> Tensor:
        form = self.form("sum", -100, 0.0)
        flat = rows.reshape(-1, rows.shape[-1])  # the chunk functions' linears take 2-D rows
        with autocast(rows.device.type, self.autocast_dtype):
            logits = head_logits(plain_linear(self.params), flat, self.params, form)
            return self.transform(logits.view(*rows.shape[:-1], logits.shape[-1]))

    def then(self, func, rest: tuple, kwargs: dict, dtype: torch.dtype) -> Head:
        """This head with one more elementwise op, `func(logits, *rest, **kwargs)`, on its logits."""
        graph = fx.Graph()
        logits = graph.graph_copy(self.transform.graph, {})
        graph.output(graph.call_function(func, (logits, *rest), kwargs))
        transform = fx.GraphModule(torch.nn.Module(), graph, "LogitTransform")
        return dataclasses.replace(self, transform=transform, dtype=dtype)


class DeferredLogits(Tensor):
    """Logits not computed yet: `rows` (..., d) through `head` (see the module docstring).

    `class_dim`: -1, or 1 for logits (B, V, N) made by moving a (B, N, V) tensor's last dim to 1."""

    rows: Tensor
    head: Head
    class_dim: int

    @staticmethod
    def __new__(cls, rows: Tensor, head: Head, class_dim: int = -1):
        shape = [*rows.shape[:-1], head.vocab]
        if class_dim == 1:
            shape.insert(1, shape.pop())
        needs_grad = rows.requires_grad or any(p is not None and p.requires_grad for p in head.params)
        self = Tensor._make_wrapper_subclass(cls, shape, dtype=head.dtype, device=rows.device, requires_grad=needs_grad)
        self.rows, self.head, self.class_dim, self._logits = rows, head, class_dim, None
        return self

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype}, head={self.head.location})"

    def __format__(self, spec) -> str:
        return repr(self)

    @classmethod
    @torch._dynamo.disable  # runs eagerly: inside a compiled region, Dynamo breaks the graph here
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _handle(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"mst: {func} reached DeferredLogits below autograd; please report this")

    def meta(self) -> Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def with_rows(self, rows: Tensor) -> DeferredLogits:
        return DeferredLogits(rows, self.head, self.class_dim)

    def logits(self, why: str) -> Tensor:
        """The logits themselves, computed once (with one WARNING per process, naming `why`)."""
        if self._logits is None:
            _warn_materialised(self, why)
            logits = self.head.project(self.rows)
            self._logits = logits if self.class_dim == -1 else logits.movedim(-1, 1)
        return self._logits


def _handle(func, args, kwargs):
    if func in READABLE:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    first = args[0] if args else None
    if isinstance(first, DeferredLogits):
        rules = (
            _cross_entropy, _reshaped, _indexed, _split, _class_dim_moved, _elementwise, _hook, _detached, _row_wise,
            _combined, _per_token,
        )  # fmt: skip
        for rule in rules:
            result = rule(func, first, args[1:], kwargs)
            if result is not NotImplemented:
                return result
    return _with_logits(func, args, kwargs)


def _with_logits(func, args, kwargs):
    why = getattr(func, "__name__", str(func))
    real = torch.utils._pytree.tree_map_only(DeferredLogits, lambda d: d.logits(why), (args, kwargs))
    return func(*real[0], **real[1])


def _warn_materialised(deferred: DeferredLogits, why: str) -> None:
    location = deferred.head.location
    if location in _warned:
        return
    _warned.add(location)
    mib = deferred.numel() * deferred.dtype.itemsize / 2**20
    log.warning(
        "mst: '%s' on the deferred logits of %s computed them in full (%s, %.0f MiB), which is the "
        "memory mst saves: cross_entropy on them (after views, slices, splits and casts), and per-token "
        "log-probs, logsumexp and entropies, run chunked without them. Compile with options={'keep_logits': True} to get plain logits.",
        why, location, "x".join(map(str, deferred.shape)), mib,
    )  # fmt: skip


# ---------------------------------------------------------------- the loss


def _cross_entropy(func, deferred: DeferredLogits, rest, kwargs):
    if func is not F.cross_entropy:
        return NotImplemented
    a = _CE_SIGNATURE.bind(deferred, *rest, **kwargs).arguments
    target, reduction = a["target"], a.get("reduction", "mean")
    ignore_index, smoothing = a.get("ignore_index", -100), a.get("label_smoothing", 0.0)
    if any(a.get(k) is not None for k in ("weight", "size_average", "reduce")) or reduction not in ("mean", "sum", "none"):
        return NotImplemented
    if not isinstance(target, Tensor) or isinstance(target, DeferredLogits) or target.dtype.is_floating_point:
        return NotImplemented
    rows = _rows_by_class_layout(deferred, target)
    if rows is None:
        return NotImplemented
    head, flat_target = deferred.head, target.reshape(-1)
    kept = reduction == "none"  # then summed, if at all, only once the losses are added up
    loss = HeadLoss(head, head.form("sum" if kept else reduction, ignore_index, float(smoothing)))
    if not kept:
        return loss.reduced(rows, flat_target)
    if target.dim() == 1:
        return DeferredTokenLosses(loss, [(rows, flat_target)], head.dtype)
    return loss.per_token(rows, flat_target).view(target.shape)


@dataclasses.dataclass(frozen=True)
class HeadLoss:
    """Cross-entropy through one head (`form`): reduced as the form says, or one value per token."""

    head: Head
    form: CrossEntropyForm

    def reduced(self, rows: Tensor, target: Tensor) -> Tensor:
        weight, bias, *adapter = self.head.params
        adapter = adapter if self.head.adapter is not None else []
        with autocast(rows.device.type, self.head.autocast_dtype):
            return _site(self.form, self.head, rows.shape[-1])(rows, weight, bias, target, *adapter)

    def per_token(self, rows: Tensor, target: Tensor) -> Tensor:
        head = self.head
        with autocast(rows.device.type, head.autocast_dtype):
            return per_token_cross_entropy(rows, list(head.params), target, self.form, head.transform, head.options)


def _rows_by_class_layout(deferred: DeferredLogits, target: Tensor) -> Tensor | None:
    """The rows as (tokens, d) in the target's order, or None for a layout cross_entropy reads
    otherwise (a 3-D input with V last is classes at dim 1 to PyTorch: computed as it is)."""
    if deferred.class_dim == 1 and deferred.dim() == 3 and target.shape == deferred.rows.shape[:-1]:
        return deferred.rows.flatten(0, 1)
    if deferred.class_dim == -1 and deferred.dim() == 2 and target.shape == deferred.rows.shape[:1]:
        return deferred.rows
    return None


def _site(form: CrossEntropyForm, head: Head, width: int) -> ChunkedLinearCrossEntropy:
    """The chunked LM head + loss for this head's description, made once per compiled graph (its
    site group, `site_group`) and reused every step."""
    key = ("cross_entropy", form, head.transform.code, width, head.vocab, head.options)
    make = lambda: ChunkedLinearCrossEntropy(form, head.transform, (width, head.vocab), head.options)  # noqa: E731
    return site_group(head.options).made(key, make)


# ---------------------------------------------------------------- ops that keep the logits deferred

_RESHAPES = {
    Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unflatten, torch.unflatten,
    Tensor.squeeze, torch.squeeze, Tensor.unsqueeze, torch.unsqueeze, Tensor.contiguous,
}  # fmt: skip
# op -> (position of its dim argument, counting the tensor, and its default)
_SPLITS = {
    Tensor.split: (2, 0), torch.split: (2, 0), Tensor.chunk: (2, 0), torch.chunk: (2, 0),
    Tensor.tensor_split: (2, 0), torch.tensor_split: (2, 0), Tensor.unbind: (1, 0), torch.unbind: (1, 0),
    Tensor.narrow: (1, None), torch.narrow: (1, None), Tensor.select: (1, None), torch.select: (1, None),
}  # fmt: skip
_MOVES = {Tensor.transpose, torch.transpose, Tensor.swapaxes, Tensor.permute, torch.permute, Tensor.movedim, torch.movedim}
_CASTS = {Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.to, Tensor.type}
_SCALINGS = {
    Tensor.mul, torch.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.div, torch.div, Tensor.__truediv__,
    Tensor.tanh, torch.tanh,
}  # fmt: skip


def _on_meta(func, deferred: DeferredLogits, rest, kwargs):
    """`func` on an empty meta tensor like the logits: the shape it gives, or None if it fails."""
    if any(isinstance(t, Tensor) for t in torch.utils._pytree.tree_leaves((rest, kwargs))):
        return None
    try:
        return func(deferred.meta(), *rest, **kwargs)
    except Exception:
        return None


def _reshaped(func, deferred, rest, kwargs):
    """A reshape whose result still ends in V regroups whole rows only (row-major order)."""
    if func not in _RESHAPES or deferred.class_dim != -1:
        return NotImplemented
    out = _on_meta(func, deferred, rest, kwargs)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[-1] != deferred.shape[-1] or out.dtype != deferred.dtype:
        return NotImplemented
    return deferred.with_rows(deferred.rows.reshape(*out.shape[:-1], deferred.rows.shape[-1]))


def _indexed(func, deferred, rest, kwargs):
    """`logits[:, :-1]`, `logits[..., 1:, :]`: ints and slices of the leading dims, V whole; or a
    boolean mask of the leading dims."""
    if func is not Tensor.__getitem__ or deferred.class_dim != -1:
        return NotImplemented
    if _is_row_mask(rest[0], deferred):  # logits[mask]: the rows the mask selects (DPO's metrics)
        return deferred.with_rows(deferred.rows[rest[0]])
    index = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
    if index.count(Ellipsis) > 1 or not all(isinstance(i, (int, slice)) or i is Ellipsis for i in index):
        return NotImplemented
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (deferred.dim() - len(index) + 1) + index[at + 1 :]
    if len(index) > deferred.dim() or (len(index) == deferred.dim() and index[-1] != slice(None)):
        return NotImplemented
    return deferred.with_rows(deferred.rows[index])


def _is_row_mask(index, deferred) -> bool:
    return (
        type(index) is Tensor and index.dtype == torch.bool and tuple(index.shape) == tuple(deferred.shape[:-1])
    )


def _split(func, deferred, rest, kwargs):
    """Splits, narrows and selects along a leading dim: the same op on the rows."""
    if func not in _SPLITS or deferred.class_dim != -1:
        return NotImplemented
    position, default = _SPLITS[func]
    args, given_positionally = list(rest), len(rest) >= position
    dim = kwargs.get("dim", args[position - 1] if given_positionally else default)
    if not isinstance(dim, int) or dim % deferred.dim() == deferred.dim() - 1:
        return NotImplemented
    dim %= deferred.dim()  # the same dim of the rows, which have as many dims
    if "dim" in kwargs:
        kwargs = {**kwargs, "dim": dim}
    elif given_positionally:
        args[position - 1] = dim
    out = func(deferred.rows, *args, **kwargs)
    return deferred.with_rows(out) if isinstance(out, Tensor) else tuple(deferred.with_rows(t) for t in out)


def _class_dim_moved(func, deferred, rest, kwargs):
    """(B, N, V) -> (B, V, N) (`transpose(1, 2)`, einops' `b n c -> b c n`): cross_entropy's layout
    with the classes at dim 1."""
    if func not in _MOVES or deferred.class_dim != -1 or deferred.dim() != 3:
        return NotImplemented
    out = _on_meta(func, deferred, rest, kwargs)
    b, n, v = deferred.shape
    if not isinstance(out, Tensor) or tuple(out.shape) != (b, v, n) or out.stride() != (n * v, 1, v):
        return NotImplemented
    return DeferredLogits(deferred.rows, deferred.head, class_dim=1)


def _elementwise(func, deferred, rest, kwargs):
    """Casts, scaling by a number, tanh: one more op of the head's transform, applied per chunk."""
    if func not in _CASTS and func not in _SCALINGS:
        return NotImplemented
    if func in _SCALINGS and not all(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in rest):
        return NotImplemented
    out = _on_meta(func, deferred, rest, kwargs)
    if not isinstance(out, Tensor) or out.shape != deferred.shape or out.device.type != "meta":
        return NotImplemented
    head = deferred.head.then(func, tuple(rest), dict(kwargs), out.dtype)
    return DeferredLogits(deferred.rows, head, deferred.class_dim)


def _detached(func, deferred, rest, kwargs):
    """`logits.detach()` (metrics read off the logits): the same logits of detached rows and weights."""
    if func not in (Tensor.detach, torch.detach) or rest or kwargs:
        return NotImplemented
    params = tuple(None if p is None else p.detach() for p in deferred.head.params)
    return DeferredLogits(deferred.rows.detach(), dataclasses.replace(deferred.head, params=params), deferred.class_dim)


def _row_wise(func, deferred, rest, kwargs):
    """softmax / log_softmax over the last dim, exp, log, ...: one more op of the head's transform."""
    op = deferred_rows.row_wise(func, deferred, rest, kwargs)
    if op is NotImplemented:
        return op
    out = _on_meta(func, deferred, rest, kwargs)
    if not isinstance(out, Tensor) or out.shape != deferred.shape:
        return NotImplemented
    func, args, kwargs = op
    return DeferredLogits(deferred.rows, deferred.head.then(func, args, kwargs, out.dtype), deferred.class_dim)


def _combined(func, deferred, rest, kwargs):
    """`exp(logps) * logps`: two deferred logits of the same rows, one transform."""
    transform = deferred_rows.combined(func, deferred, rest, kwargs)
    if transform is NotImplemented:
        return transform
    dtype = torch.promote_types(deferred.dtype, rest[0].dtype)
    head = dataclasses.replace(deferred.head, transform=transform, dtype=dtype)
    return DeferredLogits(deferred.rows, head, deferred.class_dim)


def _per_token(func, deferred, rest, kwargs):
    """A reduction of each row (logsumexp, sum, gather, argmax over the last dim), chunked now."""
    return deferred_rows.per_token(func, deferred, rest, kwargs)


def _hook(func, deferred, rest, kwargs):
    """A backward hook (Lightning Fabric registers one on every output to check that
    `fabric.backward` is used; FSDP2 one that unshards the root's parameters for backward) goes on
    the rows: it runs when their gradient is computed, with that gradient (N x d), since the logits'
    own never exists. It may observe it, or return it as it is (FSDP2's), not replace it."""
    if func is not Tensor.register_hook:
        return NotImplemented
    (hook,) = rest

    def observe(grad):
        returned = hook(grad)
        if returned is not None and returned is not grad:
            raise RuntimeError("mst: a hook on deferred logits may not replace the gradient (it sees the rows')")

    return deferred.rows.register_hook(observe)


# ---------------------------------------------------------------- the compiled graph's side


@dataclasses.dataclass(frozen=True)
class DeferredOutput:
    """Where a graph puts the pieces of one deferred head among its outputs (see
    `passes/returned_logits.py`): rows at `rows`; weight, bias, A and B at `params` (None: absent)."""

    rows: int
    params: tuple[int | None, ...]
    transposed: bool
    adapter: AdapterForm | None
    transform: fx.GraphModule
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    options: SiteOptions
    location: str


def defer_outputs(compiled, deferred: list[DeferredOutput], extra_outputs: int):
    """`compiled` with each deferred head's rows returned as `DeferredLogits` and the `extra_outputs`
    the pass appended (the heads' parameters) taken off again."""
    if not deferred:
        return compiled

    def call(*args):
        outputs = list(compiled(*args))
        for d in deferred:
            params = tuple(None if i is None else outputs[i] for i in d.params)
            head = Head(params, d.transposed, d.adapter, d.transform, d.dtype, d.autocast_dtype, d.options, d.location)
            rows = outputs[d.rows]
            # On fake tensors (DDP's optimizer, export) there is nothing to save: plain logits.
            is_fake = torch._subclasses.fake_tensor.is_fake(rows)
            outputs[d.rows] = head.project(rows) if is_fake else DeferredLogits(rows, head)
        return outputs[: len(outputs) - extra_outputs]

    return call
