"""Routed-experts pass: a mixture-of-experts layer's dispatch -> experts -> combine, rewritten
into a `ChunkedExperts` that runs it over chunks of tokens.

Found by graph structure alone (`expert_region.py`), proven row-wise (`dispatch_rules.py`): a top-k over each token's expert scores, the
slots it routes through a matmul, and their combine back into one row per token. That covers, among
others:

    transformers 5 grouped_mm   sort slots by expert, gather rows, grouped matmuls with offsets,
                                un-permute, view(T, k, d).sum(1)
    transformers 5 batched_mm   repeat rows k times, gather one weight per slot, bmm, sum(1)
    loops over experts          one_hot -> where(mask[e]) -> expert e's MLP -> index_add_
                                (needs Dynamo to capture nonzero: see `docs/coverage.md`)
    torchtitan GroupedExperts   sort, gather, torch._grouped_mm with offsets, scatter_add

Before (transformers' grouped_mm, abridged):

    topk = torch.topk(router_probs, 8, dim=-1);  values = topk[0];  ids = topk[1]
    sort = torch.sort(ids.reshape(-1));  perm = sort[1]
    rows = hidden[perm // 8];  offsets = cumsum(histc(sort[0].float(), bins=E), 0)
    h = grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offsets) ... grouped_mm(h, w_down...)
    out = (h * values.reshape(-1)[perm].unsqueeze(-1))[inv_perm].view(T, 8, d).sum(dim=1)

After:

    out = self.mst_experts_0(hidden, values, ids, w_gate_up, w_down)

Shared experts are ordinary dense MLPs and stay the MLP pass's sites. A layer whose dispatch is
not row-wise (capacity limits, expert-choice routing, token dropping) is left alone and reported
with the op that makes it so.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_experts import ChunkedExperts
from mst_fx.runtime.site_options import SiteOptions

from .chunk_count import plan_site
from .dispatch_rules import check_row_wise
from .expert_region import (
    ExpertRegion,
    check_lift,
    collect_region,
    combine_groups,
    is_batch_of_one,
    kept_bytes_per_token,
    stacked_input,
    unmatched_routings,
    unrouted_expert_weights,
    lift_region,
    routing_topks,
    slot_bytes,
)
from .graph_utils import CantChunk, example_value, module_path, shape_of, size_hint
from .report import SiteReport

KIND = "moe experts"


@dataclasses.dataclass
class ExpertSite:
    region: ExpertRegion
    lifted: fx.GraphModule
    report: SiteReport


def find_expert_sites(gm: fx.GraphModule, policy: ChunkPolicy) -> tuple[list[ExpertSite], list[SiteReport]]:
    """Sites to rewrite, and reports of the mixture-of-experts layers left alone (with reasons)."""
    sites, skipped, used = [], [], set()
    topks = routing_topks(gm)
    for combines, output, topks_here in combine_groups(gm, topks):
        used.update(topks_here)
        site = _site_or_report(combines, output, topks_here, policy)
        (sites if isinstance(site, ExpertSite) else skipped).append(site)
    for topk, matmul in unmatched_routings(gm, topks, used):
        skipped.append(SiteReport(KIND, _owner(matmul.all_input_nodes) or f"<routing at '{topk.name}'>", False, NO_COMBINE))
    reported = [s.report.location for s in sites] + [s.location for s in skipped]
    for owner, (matmul, experts) in unrouted_expert_weights(gm, reported).items():
        why = f"{experts} stacked expert weights feed '{matmul.name}', but {NO_ROUTING}"
        skipped.append(SiteReport(KIND, owner, False, why, experts=experts))
    return sites, skipped


NO_ROUTING = (
    "no top-k routing per token was found whose slots reach them and come back per token (a router "
    "without top-k, such as a max with masks, or a dispatch in another graph): the experts pass does not "
    "take this layer"
)


NO_COMBINE = (
    "a top-k routing per token feeds expert matmuls, but their outputs are combined back in a form the "
    "experts pass does not take (it takes index_add_/scatter_add into a (T, d) buffer and a sum over the k "
    "slots; Llama-4's dense dispatch sums every expert's (T, d) output)"
)


def _site_or_report(combines, output, topks, policy: ChunkPolicy):
    """An ExpertSite to rewrite, or the SiteReport of a layer left alone."""
    report = SiteReport(KIND, _location(combines), False)
    try:
        region = collect_region(combines, output, topks)
        report.location = _owner(region.whole) or report.location
        _describe(report, region)
        check_row_wise(region)
        _check_outputs(region)
        lifted = lift_region(region)
        check_lift(lifted, region)
        value = example_value(region.rows[0])
        symbolic = isinstance(value.shape[0], torch.SymInt)
        plan_site(report, policy, symbolic, value.device.type, floor_scale=region.experts / region.top_k)
    except CantChunk as why:
        report.reason = str(why)
        return report
    report.rewritten = True
    return ExpertSite(region, lifted, report)


def rewrite_expert_site(gm: fx.GraphModule, site: ExpertSite, index: int, options: SiteOptions) -> None:
    region, name = site.region, f"mst_experts_{index}"
    out = example_value(region.output)
    widths = (site.report.in_width, site.report.amplified_width)
    output = (tuple(out.shape[1:]), out.dtype)
    sparsity, keep_row = region.experts / region.top_k, site.report.kept_row_bytes
    module = ChunkedExperts(site.lifted, len(region.rows), output, widths, sparsity, keep_row, options)
    gm.add_submodule(name, module)
    last = region.nodes[-1]
    with gm.graph.inserting_before(last.next):
        rows = [gm.graph.call_function(torch.squeeze, (r, 0)) if is_batch_of_one(example_value(r)) else r for r in region.rows]
        chunked = gm.graph.call_module(name, (*rows, *region.whole))
    chunked.meta.update(region.output.meta)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    after = order[chunked]
    for user in list(region.output.users):
        if order.get(user, -1) > after:
            user.replace_input_with(region.output, chunked)
    for node in reversed(region.nodes):  # the dispatch, and index values nothing else reads
        if not node.users:
            gm.graph.erase_node(node)


def _check_outputs(region: ExpertRegion) -> None:
    """No token-sized intermediate of the region may be read outside it: it would have to exist whole."""
    inside = set(region.nodes)
    for node in region.nodes:
        if node is region.output or node in region.combines:
            continue
        outside = [u for u in node.users if u not in inside]
        value = example_value(node)
        if outside and value is not None and value.is_floating_point() and value.numel() >= region.tokens:
            raise CantChunk(f"'{node.name}' of the expert computation is also used by '{outside[0].name}'")


def _describe(report: SiteReport, region: ExpertRegion) -> None:
    per_token, itemsize = slot_bytes(region)
    hidden = shape_of(region.output)
    report.tokens, report.in_width = region.tokens, size_hint(hidden[-1])
    report.amplified_width, report.itemsize = max(per_token, 1), itemsize
    report.experts, report.top_k = region.experts, region.top_k
    report.kept_row_bytes = kept_bytes_per_token(region)


def _location(combines, limit: int = 200) -> str:
    """The module of the stacked expert weights the combine is computed from, when there are any
    (the region is not known yet: it may not be collectable), else the combine's node."""
    todo, seen = list(combines), set()
    while todo and len(seen) < limit:
        node = todo.pop(0)
        stacked = stacked_input(node)
        if stacked is not None:
            return module_path(stacked)
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return f"<experts at '{combines[-1].name}'>"


def _owner(nodes) -> str | None:
    """The module holding the weights among `nodes` (their common parent), if any are weights."""
    weights = [w for w in nodes if w.op in ("placeholder", "get_attr")]
    return module_path(*weights) if weights else None
