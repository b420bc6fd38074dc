"""The chunking a pass records for a site it rewrites, or why "auto" leaves the site alone.

The chunk policy itself (sizes, the "auto" rule) is the runtime's: `mst_fx/chunk_plan.py`. Here it
is only applied to the traced length, for the report and for the decision to rewrite.
"""

from __future__ import annotations

import torch

from mst_fx.runtime.chunk_plan import ChunkPolicy

from .graph_utils import CantChunk
from .report import SiteReport


def is_symbolic(sizes) -> bool:
    return any(isinstance(s, torch.SymInt) for s in sizes)


def plan_site(report: SiteReport, policy: ChunkPolicy, symbolic: bool, device_type: str, floor_scale: float = 1) -> None:
    """Fill `report.chunk_rows` and `report.chunks` for the traced length (its hint when symbolic);
    CantChunk when the policy says the site is better left alone."""
    n, d, w = report.tokens, report.in_width, report.amplified_width
    why = policy.why_not_rewrite(None if symbolic else n, d, w, device_type, floor_scale)
    if why is not None:
        raise CantChunk(why)
    report.chunk_rows = min(n, policy.rows_for(n, d, w, device_type, floor_scale))
    report.chunks = len(policy.chunks(n, d, w, device_type, floor_scale))
