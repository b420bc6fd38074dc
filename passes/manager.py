"""Applies the rewrites to one Dynamo graph, in this order:

1. `attention.py`: an SDPA whose mask is read as a function of its indices (causal, padding,
   windows, chunks, packed documents) runs with `is_causal=True` and no mask when causal is all
   it is, and otherwise by blocks of queries that never build the N x N mask; in the graph and
   its checkpoint bodies. `written_attention.py` reports attention written out as matmuls and a
   softmax (its N x N scores stay), rewriting nothing.
2. `moe_experts.py`: a mixture-of-experts layer's routed experts (top-k routing per token, dispatch,
   expert matmuls, combine) become `ChunkedExperts` (recompute per chunk in backward), in the graph
   and in its checkpoint bodies. It runs before the MLP pass, whose linears a loop over per-expert
   MLP modules would otherwise claim one expert at a time; shared experts stay MLP sites.
3. `mlp.py`: linear -> activation -> linear becomes `ChunkedMLP` (recompute per chunk in backward),
   in the graph and in every activation-checkpoint body it calls (`checkpoint_bodies.py`).
4. `lm_head.py`: linear -> cross_entropy becomes `ChunkedLinearCrossEntropy` (gradients in forward).
   `token_head.py`: a head whose logits reduce, row by row, to values kept per token (log-probs,
   entropies, unreduced cross-entropy) becomes `ChunkedLinearRows` (recompute in backward); when
   those values reduce straight to one sum over tokens (any row-wise loss: a stable cross-entropy
   written out, a focal loss), `ChunkedLinearRowLoss` (gradients in forward). It runs after
   `lm_head.py`, which takes the cross-entropy forms it knows, with the same cost.
5. `returned_logits.py`: in a training graph, an LM head whose logits are returned (the loss is
   computed outside) is taken out; the caller gets `DeferredLogits`, which chunk the loss there.
6. `budget_report.py`: rewrites nothing; records what the memory budget decides for each site at
   the traced length (the runtime decides again at every call).

No two claim the same node (an MLP ends in a linear fed by an elementwise op, an LM head in
cross_entropy or in the graph's output, attention is SDPA and its mask). The heads (4, 5) are
matched before the MLPs, so that the MLP pass's report of widening linears leaving the graph (an
MLP cut in two) leaves out the heads reported already; the report keeps the order of the forward,
where the mask is built before the first layer and the head comes last. Every site is matched
first, then all matched sites are rewritten; a site the matcher can't handle is reported with its
reason and left as it is.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import fx

from mst_fx.runtime import memory_budget
from mst_fx.runtime.site_options import SiteOptions

from .attention import find_attention_sites, rewrite_attention_site
from .budget_report import plan_budget
from .checkpoint_bodies import checkpoint_bodies
from .graph_utils import copy_graph_module, names_in_compiled_module
from .lm_head import find_lm_head_sites, rewrite_lm_head_site
from .mlp import CUT_REASON, find_mlp_sites, rewrite_mlp_site
from .moe_experts import find_expert_sites, rewrite_expert_site
from .report import GraphReport, SiteReport
from .returned_logits import find_returned_heads, rewrite_returned_head
from .token_head import find_token_head_sites, rewrite_token_head_site
from .written_attention import find_written_attention

log = logging.getLogger(__name__)

_already_logged: set[tuple] = set()


class PassOptions(SiteOptions, Protocol):
    """What the passes read of the backend's options (`mst_fx.MstOptions` is one): which rewrites
    run, whether returned logits are kept, and what the sites they build read (`SiteOptions`)."""

    @property
    def mlp(self) -> bool: ...

    @property
    def lm_head(self) -> bool: ...

    @property
    def attention(self) -> bool: ...

    @property
    def experts(self) -> bool: ...

    @property
    def keep_logits(self) -> bool: ...


def rewrite(
    gm: fx.GraphModule, example_inputs, options: PassOptions, model_training: bool | None = None
) -> tuple[fx.GraphModule, GraphReport]:
    """(rewritten copy of gm, report); (gm itself, report) when nothing was rewritten. A pass that
    raises leaves the graph as it is: a rewrite may fail to save memory, never fail training."""
    work = copy_graph_module(gm)
    try:
        report = run_passes(work, example_inputs, options, model_training)
    except Exception as error:
        log.warning(
            "mst: a pass failed on this graph (%s: %s); compiling it unrewritten",
            type(error).__name__,
            error,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        return gm, GraphReport()
    return (work if report.rewritten() else gm), report


def run_passes(gm: fx.GraphModule, example_inputs, options: PassOptions, model_training: bool | None = None) -> GraphReport:
    """Rewrite `gm` in place; return what was found. `model_training`: the model's `training` flag
    when the caller knows it (`mst_fx.compile`); a model in eval mode keeps the logits it returns."""
    with names_in_compiled_module(gm, example_inputs):  # sites' locations as the user's model names them
        report = _run_passes(gm, example_inputs, options, model_training)
    _log_report(report)
    return report


def _run_passes(gm: fx.GraphModule, example_inputs, options: PassOptions, model_training: bool | None) -> GraphReport:
    report = GraphReport()
    bodies = list(checkpoint_bodies(gm))
    training = is_training(example_inputs)
    if options.attention:
        report.sites += _rewrite_attention(gm, bodies, options)
        report.sites += [r for g in (gm, *bodies) for r in find_written_attention(g)]  # reported only
    experts = []
    if options.experts:
        experts += _rewrite_experts(gm, options, checkpointed=False)
        for body in bodies:
            experts += _rewrite_experts(body, options, checkpointed=True)
    heads, reported = [], set()
    if options.lm_head:
        logits = "keep" if options.keep_logits else "eval mode" if model_training is False else "drop"
        heads += _rewrite_lm_heads(gm, options, training, logits)
        heads = _one_report_per_head(heads, _rewrite_token_heads(gm, options, reported))
        if training and not _ddp_optimizer_split_this_graph():
            heads += _rewrite_returned_heads(gm, options, logits, reported)
    if options.mlp:
        report.sites += _rewrite_mlps(gm, options, checkpointed=False, training=training, reported=reported)
        for body in bodies:
            report.sites += _rewrite_mlps(body, options, checkpointed=True)
    report.sites += experts + heads
    plan_budget(report.sites, _budget_setting(options), _device_of(example_inputs))
    gm.graph.lint()
    gm.recompile()
    return report


def _rewrite_lm_heads(gm: fx.GraphModule, options: PassOptions, training: bool, logits: str) -> list[SiteReport]:
    sites, skipped = find_lm_head_sites(gm, options.policy, training, logits)
    for index, site in enumerate(sites):
        rewrite_lm_head_site(gm, site, index, options)
    return [s.report for s in sites] + skipped


def _one_report_per_head(loss_heads: list[SiteReport], token_heads: list[SiteReport]) -> list[SiteReport]:
    """A head the LM-head pass left alone (its logits have other uses) may be the per-token pass's:
    then that rewrite is its report. Left alone by both, it keeps the LM-head pass's reason."""
    taken = {s.location for s in token_heads if s.rewritten}
    reported = {s.location for s in loss_heads}
    kept = [s for s in loss_heads if s.rewritten or s.location not in taken]
    return kept + [s for s in token_heads if s.rewritten or s.location not in reported]


def _rewrite_token_heads(gm: fx.GraphModule, options: PassOptions, reported: set) -> list[SiteReport]:
    sites, skipped, left_alone = find_token_head_sites(gm, options.policy)
    for index, site in enumerate(sites):
        rewrite_token_head_site(gm, site, index, options)
    reported.update(left_alone)
    return [s.report for s in sites] + skipped


def _rewrite_returned_heads(gm: fx.GraphModule, options: PassOptions, logits: str, reported: set) -> list[SiteReport]:
    """`reported` receives the nodes of the heads left alone, which the MLP pass must not report."""
    sites, skipped, left_alone = find_returned_heads(gm, options.policy, logits)
    for site in sites:
        rewrite_returned_head(gm, site, options)
    reported.update(left_alone)
    return [s.report for s in sites] + skipped


def _rewrite_attention(gm: fx.GraphModule, bodies: list[fx.GraphModule], options: PassOptions) -> list[SiteReport]:
    sites = find_attention_sites(gm, bodies, options.policy)
    for site in sites:
        if site.report.rewritten:
            rewrite_attention_site(gm, site)
    for body in bodies:
        body.graph.lint()
        body.recompile()
    return [s.report for s in sites]


def _rewrite_experts(gm: fx.GraphModule, options: PassOptions, checkpointed: bool) -> list[SiteReport]:
    sites, skipped = find_expert_sites(gm, options.policy)
    return _apply(gm, sites, skipped, rewrite_expert_site, options, checkpointed)


def _rewrite_mlps(
    gm: fx.GraphModule, options: PassOptions, checkpointed: bool, training=False, reported=frozenset()
) -> list[SiteReport]:
    sites, skipped = find_mlp_sites(gm, options.policy, training, reported)
    return _apply(gm, sites, skipped, rewrite_mlp_site, options, checkpointed)


def _apply(gm: fx.GraphModule, sites, skipped, rewrite_site, options: PassOptions, checkpointed: bool) -> list[SiteReport]:
    """Rewrite every site found in `gm` (inside a checkpoint body or not); return all reports."""
    for index, site in enumerate(sites):
        rewrite_site(gm, site, index, options)
    if sites:
        gm.graph.lint()
        gm.recompile()
    reports = [s.report for s in sites] + skipped
    for report in reports:
        report.checkpointed = checkpointed
    return reports


def _budget_setting(options: PassOptions) -> int | str:
    """The budget's setting, or "off" where the chunking is fixed (as the runtime's sites read it)."""
    fixed = options.policy.rows is not None or options.policy.count is not None
    return memory_budget.OFF if fixed else options.budget


def _device_of(example_inputs) -> torch.device:
    return next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


def is_training(example_inputs) -> bool:
    """Dynamo compiles separate graphs per grad mode; this one needs gradients if any input does."""
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs)


def _log_report(report: GraphReport) -> None:
    cut = [s for s in report.sites if s.reason == CUT_REASON]
    if cut and _ddp_optimizer_split_this_graph():
        _log_once(
            ("ddp_optimizer",),
            logging.WARNING,
            "mst: DDP's graph optimizer split the model's graph at its gradient buckets, cutting MLPs "
            "in two (the first at %s), and a cut MLP can't be rewritten; set "
            "torch._dynamo.config.optimize_ddp = False before the first compiled step to keep each "
            "graph whole",
            cut[0].location,
        )
    for site in report.sites:
        if site.rewritten:
            log.debug("mst: rewrote %s at %s: %s", site.kind, site.location, _what_was_done(site))
        else:
            _log_once(
                (site.kind, site.location, site.reason),
                logging.INFO,
                "mst: left %s at %s alone: %s",
                site.kind,
                site.location,
                site.reason,
            )


def _what_was_done(site: SiteReport) -> str:
    if site.decision is not None:
        return f"{site.decision}, within a memory budget of {site.budget} bytes"
    if site.kind != "attention":
        return f"{site.chunks} chunks"
    if not site.chunks:
        return f"mask {site.mask}: SDPA with is_causal, no mask"
    return f"mask {site.mask}: {site.chunks} blocks of {site.chunk_rows} queries, no N x N mask"


def _ddp_optimizer_split_this_graph() -> bool:
    """Dynamo is compiling a DDP module's forward with its `DDPOptimizer`, which cuts the graph
    wherever a gradient bucket fills (`torch._dynamo.convert_frame` decides it the same way)."""
    if not torch.distributed.is_available():
        return False
    from torch._dynamo.utils import get_optimize_ddp_mode
    from torch.nn.parallel import DistributedDataParallel

    from mst_fx.tracing import ddp_split

    if ddp_split.splitter() is not None:  # mst rewrites the whole graph; the optimizer splits the result
        return False
    return get_optimize_ddp_mode() == "ddp_optimizer" and DistributedDataParallel._get_active_ddp_module() is not None


def _log_once(key: tuple, level: int, message: str, *args) -> None:
    if key not in _already_logged:
        _already_logged.add(key)
        log.log(level, message, *args)
