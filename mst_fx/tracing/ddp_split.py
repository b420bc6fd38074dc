"""mst under DDP: the rewrite runs on the whole graph, before Dynamo's DDP optimizer splits it.

Dynamo compiles the forward of a `DistributedDataParallel` module through its `DDPOptimizer`: it
cuts the graph wherever a gradient bucket fills and compiles each piece with the backend, so that
each piece's backward ends with its bucket's gradients ready and DDP all-reduces them while the
backward computes the next piece. The default bucket (25 MB) is smaller than one MLP weight of a
1B-parameter model (Llama-3.2-1B: 32 MiB in bf16), so the pieces cut every MLP in two, and a
backend that only sees pieces can rewrite none.

So `DDPOptimizer.compile_fn` is wrapped, once, when an mst backend is made. Given an mst backend
(`restored_attributes.compiles_with_mst`), it first hands the whole graph to it. mst rewrites it,
then calls `split_and_compile`: each site becomes one node that takes its weights as direct
arguments (`call_site`), the optimizer's own split runs on that graph, counting each site's weight
bytes where the site is (a node is never cut), and each piece is compiled as it is. The overlap of
all-reduce with backward is kept; a site whose weights exceed a bucket makes that bucket larger.

Any other backend, and any torch whose optimizer lacks `compile_fn`, goes the usual way (mst then
sees pieces, reports the MLPs a cut leaves in two, and says how to keep the graph whole).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable

from torch import fx

from .restored_attributes import compiles_with_mst

log = logging.getLogger(__name__)

# Set while mst compiles a whole graph that the DDP optimizer will split: what splits and compiles it.
_splitter: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("mst_ddp_splitter", default=None)
# Set while the optimizer compiles the pieces of a graph mst has rewritten: compile them as they are.
_pieces: contextvars.ContextVar[bool] = contextvars.ContextVar("mst_ddp_pieces", default=False)


def install() -> None:
    """Wrap `DDPOptimizer.compile_fn` (once): an mst backend gets the whole graph first."""
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:  # torch without distributed
        return
    original = getattr(DDPOptimizer, "compile_fn", None)
    if original is None or getattr(original, "_mst_whole_graph", False):
        return

    def compile_fn(self, gm: fx.GraphModule, example_inputs, **configs):
        if _pieces.get() or not compiles_with_mst(self.backend_compile_fn):
            return original(self, gm, example_inputs, **configs)
        split = lambda rewritten: _split(original, self, rewritten, example_inputs, configs)  # noqa: E731
        with _set(_splitter, split):
            return self.backend_compile_fn(gm, example_inputs, **configs)

    compile_fn._mst_whole_graph = True
    compile_fn._mst_original = original  # what runs without mst (tests put it back to see the pieces)
    compile_fn.__doc__ = original.__doc__
    DDPOptimizer.compile_fn = compile_fn


def splitter() -> Callable[[fx.GraphModule], Callable] | None:
    """What compiles the graph mst is rewriting now, when the DDP optimizer is to split it."""
    return _splitter.get()


def compiling_pieces() -> bool:
    """The graph handed to the backend is a piece of a graph mst has already rewritten whole."""
    return _pieces.get()


def _split(original, optimizer, gm: fx.GraphModule, example_inputs, configs) -> Callable:
    with _set(_pieces, True):
        compiled = original(optimizer, sites_as_calls(gm), example_inputs, **configs)
    pieces = len(getattr(optimizer, "buckets", ()))
    log.info("mst: rewrote the whole graph before DDP's optimizer split it at %d gradient bucket(s)", pieces)
    return compiled


@contextlib.contextmanager
def _set(variable: contextvars.ContextVar, value):
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def sites_as_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each site's `call_module` node made a `call_function` of `call_site` on its
    arguments flattened: the optimizer counts the parameters a call_function node takes directly,
    and those of a called module's own (a site owns none: its weights are arguments)."""
    from mst_fx.runtime.chunked_ops import ChunkedSite

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ChunkedSite):
            continue
        site = gm.get_submodule(node.target)
        layout = tuple(len(a) if isinstance(a, (list, tuple)) else -1 for a in node.args)
        flat = [x for a in node.args for x in (a if isinstance(a, (list, tuple)) else (a,))]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(call_site, (site.key, layout, *flat), dict(node.kwargs))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def call_site(key: str, layout: tuple[int, ...], *args, **kwargs):
    """The site `key` called with `args` regrouped as `layout` says: -1 for one argument, n for a
    list of the next n."""
    from mst_fx.runtime.chunked_ops import _site

    rest, grouped = iter(args), []
    for length in layout:
        grouped.append(next(rest) if length < 0 else [next(rest) for _ in range(length)])
    return _site(key)(*grouped, **kwargs)
