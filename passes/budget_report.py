"""The memory budget's decision for each site at the traced length, for the report.

The runtime decides per call (`mst_fx.runtime.memory_budget`). This applies the same rule
(`memory_budget.choose`) to the sites of one graph in forward order, at the length the graph was
traced with: a site that keeps its intermediates adds them to what the sites after it see as held.
Under "auto" the budget is what the device has free now, and since the first step runs lean while
it is measured, the decision shown is that of the steps after it; on the meta device (a dry run of
a model too big for this machine) there is no device to read, and the lean chunks are shown.
"""

from __future__ import annotations

import torch

from mst_fx.runtime import memory_budget
from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.runtime.chunked_experts import ChunkedExperts
from mst_fx.runtime.chunked_ops import ChunkedLinearCrossEntropy, ChunkedMLP
from mst_fx.runtime.chunked_token_ops import ChunkedLinearRows

from .report import SiteReport

# Per kind: the runtime's site class (what one chunk holds: `WORK_TENSORS` of `WORK_ITEMSIZE` bytes,
# None for the input's), and the N x W tensors a kept MLP holds (gate and up, or fc's output)
_SITES = {
    "mlp gated": (ChunkedMLP, 2),
    "mlp fused": (ChunkedMLP, 2),
    "mlp plain": (ChunkedMLP, 1),
    "lm_head": (ChunkedLinearCrossEntropy, 0),
    "lm_head per-token": (ChunkedLinearRows, 0),
    "moe experts": (ChunkedExperts, 0),
}


def kept_row_bytes(site: SiteReport) -> int:
    """Bytes per token a site keeps when the budget lets it: an MLP's N x W tensors, routed experts'
    autograd graph (the pass's bound), a per-token head's as the runtime plans it before measuring."""
    if site.kind == "moe experts":
        return site.kept_row_bytes or 0
    if site.kind == "lm_head per-token":
        return ChunkedLinearRows.KEPT_TENSORS * site.amplified_width * ChunkedLinearRows.WORK_ITEMSIZE
    return _SITES.get(site.kind, (None, 0))[1] * site.amplified_width * site.itemsize


def plan_budget(sites: list[SiteReport], setting: int | str, device: torch.device) -> None:
    """Fill `budget` and `decision` of the budgeted sites, and their chunks as decided."""
    budgeted = [s for s in sites if s.rewritten and s.has_shapes and s.kind in _SITES]
    if setting == memory_budget.OFF or not budgeted:
        return
    if setting == memory_budget.AUTO and device.type == "meta":  # a dry run: the device is not known
        for site in budgeted:
            site.decision = "auto: decided on the device at run time"
        return
    budget, source = memory_budget.preview(setting, device)
    lean = [_lean_chunk_bytes(s) for s in budgeted]
    held = 0
    for index, site in enumerate(budgeted):
        keep_row, work_row = _row_bytes(site)
        reserve = max((b for i, b in enumerate(lean) if i != index), default=0)
        decision = memory_budget.choose(site.tokens, budget, held, reserve, keep_row, work_row, keep_row > 0)
        held += site.tokens * keep_row if decision.keep else 0
        site.budget, site.budget_source = budget, source
        site.decision = decision.describe(site.tokens, recomputes=site.kind != "lm_head")
        if setting == memory_budget.AUTO:
            site.decision = f"{site.decision} (auto: the first step is lean)"
        site.chunk_rows = min(site.tokens, decision.rows)
        site.chunks = len(ChunkPolicy(rows=decision.rows).chunks(site.tokens, 1, 1, device.type))


def _row_bytes(site: SiteReport) -> tuple[int, int]:
    site_class = _SITES[site.kind][0]
    itemsize = site_class.WORK_ITEMSIZE or site.itemsize
    return kept_row_bytes(site), site_class.WORK_TENSORS * site.amplified_width * itemsize


def _lean_chunk_bytes(site: SiteReport) -> int:
    """The site's chunk at the lean rule, in fp32: what the runtime reserves for it."""
    return min(site.tokens, site.chunk_rows or site.tokens) * _SITES[site.kind][0].WORK_TENSORS * site.amplified_width * 4
