"""The `mst` torch.compile backend: options -> passes -> hand-off to a compiler.

    torch.compile(model, backend="mst", options={"chunks": 8})   # found through the entry point
    torch.compile(model, backend=mst_fx.backend(chunks=8))       # same, configured in Python

The passes run on a copy of Dynamo's graph. If they raise, or the compiler rejects the rewritten
graph, the original graph is compiled instead and one log line says why: a rewrite may fail to
save memory, but never fails training.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from mst_fx.inspect.compiled_reports import record_graph, record_report
from mst_fx.options import MstOptions
from mst_fx.passes import GraphReport, rewrite
from mst_fx.passes.lm_head import dropped_logits_outputs
from mst_fx.passes.returned_logits import deferred_outputs
from mst_fx.runtime import memory_budget
from mst_fx.runtime.chunked_ops import ChunkedSite
from mst_fx.runtime.deferred_logits import defer_outputs
from mst_fx.runtime.dropped_logits import mark_outputs
from mst_fx.tracing import ddp_split, restored_attributes

log = logging.getLogger(__name__)


def _skip_transformers_warning_once() -> None:
    """Let Dynamo trace through `logger.warning_once(...)` calls in Hugging Face models' forward.

    transformers adds `warning_once` to every `logging.Logger`; Dynamo can't trace it, so each call
    is a graph break. `GPT2LMHeadModel` built from a plain `GPT2Config` calls it between its LM head
    and its loss (`loss_type=None`), and the break leaves the head unrewritten. Dynamo's own setting
    for this makes such calls no-ops in compiled code: the message, an advisory printed once, is
    then not printed from there."""
    import transformers.utils.logging  # noqa: F401  (it installs Logger.warning_once)

    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None:
        torch._dynamo.config.ignore_logger_methods.add(warning_once)


_skip_transformers_warning_once()
ddp_split.install()


@restored_attributes.mark_mst_backend
def mst_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None):
    """The entry point `torch.compile(backend="mst")` calls; `options` come from torch.compile."""
    return compile_graph(gm, example_inputs, MstOptions.from_mapping(options), mode)


def backend(**options):
    """The `mst` backend with these options, validated now (a bad one raises ValueError)."""
    configured = MstOptions.from_mapping(options)

    @restored_attributes.mark_mst_backend
    def mst(gm: fx.GraphModule, example_inputs, options=None, mode=None):
        if options:
            raise ValueError("mst_fx.backend(...) is already configured; pass options to it, not to torch.compile")
        return compile_graph(gm, example_inputs, configured, mode)

    return mst


def compile_graph(gm: fx.GraphModule, example_inputs, options: MstOptions, mode=None, model_training=None):
    """`model_training`: the compiled model's `training` flag when known (`mst_fx.compile`), else None.

    Under DDP (`mst_fx.tracing.ddp_split`) this gets the whole graph, rewrites it and has Dynamo's
    DDP optimizer split the result; the pieces come back here and are compiled as they are."""
    if ddp_split.compiling_pieces():
        return hand_off(gm, example_inputs, options.compiler, mode)
    split = ddp_split.splitter()
    compile_whole = split or (lambda graph: hand_off(graph, example_inputs, options.compiler, mode))
    record_graph(gm)
    options = options.in_group(memory_budget.SiteGroup())  # this graph's sites reserve room for each other
    rewritten, report = rewrite(gm, example_inputs, options, model_training)
    sites = [m for m in rewritten.modules() if isinstance(m, ChunkedSite)]  # before DDP's split moves them
    try:
        compiled = compile_whole(rewritten)
        compiled = mark_outputs(defer_outputs(compiled, *deferred_outputs(rewritten)), dropped_logits_outputs(rewritten))
    except torch._dynamo.exc.RestartAnalysis:
        raise  # Dynamo's own control flow (it traces again), not a failure
    except Exception as error:  # the compiler rejected our graph: compile the user's instead
        if rewritten is gm:
            raise
        log.warning(
            "mst: compiling the rewritten graph failed (%s: %s); compiling it unrewritten", type(error).__name__, error
        )
        compiled, rewritten = compile_whole(gm), gm
        report = report.undone(f"the compiler rejected the rewritten graph ({type(error).__name__})")
    record_report(report)
    _warn_once_if_logits_dropped(rewritten, report)
    sites = sites if rewritten is not gm else []
    return _holding(sites, options.group, _counting_blocks(compiled, example_inputs, report))


def _holding(sites: list, group: memory_budget.SiteGroup, compiled):
    """`compiled`, holding the sites its graph calls by key (the runtime's registry holds them
    weakly, so they live as long as this compiled graph, until Dynamo drops it), and saying while
    it runs that their calls reserve room within its group (`memory_budget.SiteGroup`)."""
    if not sites:
        return compiled

    def call(*args):
        with memory_budget.running(group):
            return compiled(*args)

    call.mst_sites = sites
    return call


_warned: set[str] = set()


def _warn_once_if_logits_dropped(compiled_graph: fx.GraphModule, report: GraphReport) -> None:
    """Said here, where the compiled step is handed back with the placeholder in it, not by the
    pass: `mst_fx.explain` runs the passes too, and drops nothing."""
    if not dropped_logits_outputs(compiled_graph):
        return
    heads = [s.location for s in report.sites if s.rewritten and s.kind == "lm_head" and s.logits_returned]
    if "dropped logits" not in _warned:
        _warned.add("dropped logits")
        log.warning(
            "mst: %s returns empty logits in training to save their N x V memory; pass "
            "options={'keep_logits': True} to keep them",
            ", ".join(heads) or "the LM head",
        )


def _counting_blocks(compiled, example_inputs, report: GraphReport):
    """`compiled`, counting into `report.blocks` the distinct weights it runs with: a block compiled
    on its own (torchtitan's per-block compile) is one graph that runs for every block, and its
    sites count once per block. The graph's first parameter stands for its weights."""
    index = next((i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)), None)
    if index is None or not report.rewritten():
        return compiled
    seen = WeakIdKeyDictionary()  # by identity: a WeakSet would compare tensors with ==

    def call(*args):
        seen[args[index]] = True
        report.blocks = len(seen)
        return compiled(*args)

    return call


def hand_off(gm: fx.GraphModule, example_inputs, compiler: str, mode=None, observe=None):
    """Compile with the chosen compiler.

    The chunked sites are opaque custom ops (`mst_fx.runtime.chunked_ops`), so nothing the compiler does to
    the graph (CSE, the partitioner's choice of what to save, scheduling) reaches inside a chunk.

    `observe(graph_module, is_backward)`: called with each partitioned graph; the forward's outputs
    past the user's are what is saved for backward (caches are bypassed so that it always runs).
    """
    if compiler == "eager":
        return gm.forward
    if compiler == "inductor":
        return _inductor(gm, example_inputs, mode, observe)
    return _aot_eager(gm, example_inputs, observe)


def _inductor(gm, example_inputs, mode, observe):
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if observe is None:
        return compile_fx(gm, example_inputs, config_patches=patches or None)

    def observing_inner_compile(graph_module, inputs, **kwargs):
        observe(graph_module, kwargs.get("is_backward", False))
        return compile_fx_inner(graph_module, inputs, **kwargs)

    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, observing_inner_compile, {**patches, "fx_graph_cache": False})


def _aot_eager(gm, example_inputs, observe=None):
    """AOTAutograd without codegen, partitioned as Inductor partitions (min-cut), so what is saved
    for backward is what Inductor would save."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def observed(is_backward):
        def compile_nothing(graph_module, _inputs):
            if observe is not None:
                observe(graph_module, is_backward)
            return graph_module

        return make_boxed_compiler(compile_nothing)

    compiler = aot_autograd(
        fw_compiler=observed(False),
        bw_compiler=observed(True),
        partition_fn=min_cut_rematerialization_partition,
    )
    return compiler(gm, example_inputs)
