"""Inside a checkpointed call, an attribute that the call sets and restores is no side effect.

Why: transformers >= 5.25 wraps its attention layers in `kernels`' `use_kernelized_func`, whose
forward does, around the layer's own:

    token = _ACTIVE_KERNEL_FUNCS.set(active_kernel_funcs)   # under compile: .global_var = {...}
    try:
        return orig_forward(self, *args, **kwargs)
    finally:
        _ACTIVE_KERNEL_FUNCS.reset(token)                   # .global_var = None again

Under activation checkpointing Dynamo traces the layer as a higher-order op, whose body may not
change anything outside it: eager checkpointing replays a forward's side effects when it recomputes
the forward in backward, and a compiled recompute runs the graph, not the Python. Dynamo (torch >=
2.13) already accepts a mutation that is undone before the body ends, but only while every value
involved is a constant: here the temporary value is a dict, so every decoder layer graph-breaks and
runs outside the graph, and mst never sees its MLP or attention mask.

An attribute the body restores is exactly as benign with a dict in between: after the call nothing
has changed, so there is nothing for the backward to replay, and the traced body reads the
temporary value where the code reads it. So, for traces that compile with an mst backend, this
module takes over Dynamo's deferred check for attribute stores on outer objects inside such bodies:

- each store is recorded as (value before the body, value now), where a value is a constant, "the
  object that was there" (a value read back from the attribute), or one object Dynamo tracks;
- the store itself goes ahead, as Dynamo's own deferred stores do;
- at the body's end Dynamo's own check runs on these records: any attribute not back to its value
  before is a graph break, with Dynamo's reason ("HOP: Non-nullified side effect"), as before.

Nothing else changes: mutations of lists and dicts, new globals, and every trace for another backend
keep Dynamo's rules. `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint` would fix
the same break but lets any side effect through, restored or not; this does not.

It patches two methods of Dynamo's `SideEffects` when they have the shape it expects (torch 2.13);
where they don't, nothing is patched, the break stays, and the report says which layers ran outside
every graph (`graph_breaks.py`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_MARK = "mst_fx_backend"
_state = threading.local()  # .deferring: how many deferred-check scopes (HOP bodies) are open
_given_up = False  # set when Dynamo's internals differ from what this reads: Dynamo's rule then decides


def mark_mst_backend(backend):
    """Tag `backend` (a Dynamo backend callable) so that traces compiling with it use this rule
    (installed with the first mark). mst's backends are marked; mark your own that runs
    `mst_fx.rewrite` on what Dynamo captures."""
    install()
    setattr(backend, _MARK, True)
    return backend


def compiles_with_mst(compiler_fn) -> bool:
    """Whether a Dynamo trace's backend is an mst one: Dynamo wraps it in its debug wrapper
    (`_torchdynamo_orig_backend`) and, when torch.compile got `options`, in `_TorchCompileWrapper`
    (`compiler_fn`)."""
    for _ in range(4):
        if compiler_fn is None:
            return False
        if getattr(compiler_fn, _MARK, False):
            return True
        compiler_fn = getattr(compiler_fn, "_torchdynamo_orig_backend", None) or getattr(compiler_fn, "compiler_fn", None)
    return False


class _Same:
    """A non-constant value, equal only to itself: an attribute counts as restored when it holds
    the very object (Dynamo's tracker of it) that it held before."""

    def __init__(self, tracked: Any):
        self.tracked = tracked

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.tracked is self.tracked

    def __repr__(self) -> str:
        return f"<{type(self.tracked).__name__}>"


class _Original:
    """The value the attribute held before the body, read back from it."""

    def __eq__(self, other) -> bool:
        return isinstance(other, _Original)

    def __repr__(self) -> str:
        return "<its value before>"


def _token(value, attribute_source) -> Any:
    if value.is_python_constant():
        constant = value.as_python_constant()
        return (type(constant), constant)  # typed: False is not restored by 0
    if attribute_source is not None and getattr(value, "source", None) == attribute_source:
        return _Original()
    return _Same(value)


def _record(side_effects, item, name: str, value) -> tuple | None:
    """Record this store for the body's end-of-trace check; None to leave it to Dynamo."""
    from torch._dynamo.source import AttrSource

    source = getattr(item, "source", None)
    attribute_source = AttrSource(source, name) if source is not None else None
    key = (id(item), name)
    if key not in side_effects.deferred_attr_mutations:
        # How Dynamo reads an attribute as it is before the store (torch 2.13: var_getattr; later
        # releases: tp_getattro_impl), as its own deferred check reads it.
        read = getattr(item, "var_getattr", None) or item.tp_getattro_impl
        try:
            before = read(side_effects.output_graph_weakref().current_tx, name)
        except NotImplementedError:
            return None
        side_effects.deferred_attr_mutations[key] = (_token(before, attribute_source), None)
    original = side_effects.deferred_attr_mutations[key][0]
    side_effects.deferred_attr_mutations[key] = record = (original, _token(value, attribute_source))
    return record


def _takes_over(side_effects, item) -> bool:
    """A store Dynamo would refuse at once inside a body whose check is deferred, in an mst trace."""
    from torch._dynamo.side_effects import AutogradFunctionContextVariable
    from torch._dynamo.variables.base import AttributeMutationExisting, is_side_effect_safe

    output_graph = side_effects.output_graph_weakref()
    return (
        getattr(_state, "deferring", 0) > 0
        and output_graph is not None
        and compiles_with_mst(getattr(output_graph, "compiler_fn", None))
        and isinstance(item.mutation_type, AttributeMutationExisting)
        and not is_side_effect_safe(item.mutation_type)
        and not isinstance(item, AutogradFunctionContextVariable)
        and not side_effects.should_allow_side_effects_in_hop()
        and not side_effects.should_allow_externally_visible_side_effects_in_subtracer()
    )


def _patched_store_attr(original_store_attr):
    def store_attr(self, item, name, value, *args, **kwargs):
        record = None if _given_up else _try_record(self, item, name, value)
        if not record:
            return original_store_attr(self, item, name, value, *args, **kwargs)
        # Recorded for the end-of-body check: store it as Dynamo stores a deferred one, and keep
        # our record where Dynamo's own deferral (constant values) writes its own over it.
        key = (id(item), name)
        self.check_allowed_side_effect = lambda _item: True
        try:
            return original_store_attr(self, item, name, value, *args, **kwargs)
        finally:
            del self.check_allowed_side_effect
            self.deferred_attr_mutations[key] = record

    store_attr.mst_fx_original = original_store_attr
    return store_attr


def _try_record(side_effects, item, name: str, value) -> tuple | None:
    try:
        return _record(side_effects, item, name, value) if _takes_over(side_effects, item) else None
    except Exception as error:  # Dynamo's internals moved: its own rule decides, as without mst
        _give_up(error)
        return None


def _give_up(error: Exception) -> None:
    global _given_up
    _given_up = True
    log.warning(
        "mst: this torch's Dynamo differs from what mst reads (%s: %s); inside checkpointed layers, attributes "
        "set and restored are left to Dynamo, which breaks the graph there",
        type(error).__name__,
        error,
    )


def _patched_defer(original_defer):
    @contextlib.contextmanager
    def defer_side_effect_checks(self):
        _state.deferring = getattr(_state, "deferring", 0) + 1
        try:
            with original_defer(self):
                yield
        finally:
            _state.deferring -= 1

    defer_side_effect_checks.mst_fx_original = original_defer
    return defer_side_effect_checks


_NEEDED = ("store_attr", "defer_side_effect_checks", "validate_deferred_attr_mutations", "check_allowed_side_effect")


def install() -> bool:
    """Patch Dynamo's `SideEffects` (once); False, and nothing patched, where its shape differs."""
    try:
        from torch._dynamo import side_effects as module
        from torch._dynamo.variables.base import AttributeMutationExisting, is_side_effect_safe  # noqa: F401
    except ImportError as error:
        log.debug("mst: Dynamo's side-effect tracking is not as expected (%s); restored attributes not accepted", error)
        return False
    cls = module.SideEffects
    if hasattr(cls.store_attr, "mst_fx_original"):
        return True
    missing = [name for name in _NEEDED if not hasattr(cls, name)]
    if missing:
        log.debug("mst: Dynamo's SideEffects lacks %s; restored attributes under checkpoint not accepted", missing)
        return False
    cls.store_attr = _patched_store_attr(cls.store_attr)
    cls.defer_side_effect_checks = _patched_defer(cls.defer_side_effect_checks)
    return True
