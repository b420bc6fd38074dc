"""A `ModelReport` as text: the per-site table with totals, JSON, or the graphs' code."""

from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

from tabulate import tabulate

from mst_fx.passes.report import SiteReport

from .memory_estimate import METHOD

if TYPE_CHECKING:  # for annotations only: `ModelReport.__str__` calls this module
    from .model_report import InspectedGraph, ModelReport

SITE_COLUMNS = [
    "module", "kind", "N x d -> W", "chunks x tokens", "largest before", "largest after", "memory budget",
    "left alone because",
]  # fmt: skip
TOTAL_COLUMNS = ["graph", "sites", "rewritten", "est. peak before", "est. peak after", "est. saving"]
BREAK_COLUMNS = ["graph cut at", "cause", "Dynamo's reason", "ran outside every graph", "times"]


def human_bytes(count: int | None) -> str:
    """Binary units: 1.75 GiB is 1.75 * 2**30 bytes."""
    if count is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def to_table(report: ModelReport) -> str:
    """One row per site, then the estimated peak per graph and overall, then how it is estimated."""
    several = len(report.graphs) > 1
    rows = [_site_row(g, s, several) for g in report.graphs for s in g.report.sites]
    headers = (["graph"] if several else []) + SITE_COLUMNS
    parts = [_heading(report)]
    if rows:
        parts.append(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    else:
        parts.append("no MLP, LM-head or attention-mask site found")
    sources = dict.fromkeys(s.budget_source for s in report.counted_sites if s.budget_source)
    if sources:
        parts.append("memory budget read from: " + "; ".join(sources))
    parts.append(tabulate(_total_rows(report), headers=TOTAL_COLUMNS, tablefmt="github", disable_numparse=True))
    method = METHOD
    unknown = sum(not s.has_shapes for s in report.counted_sites)
    if unknown:
        method += f" Not counted: {unknown} site(s) left alone before their shapes were read."
    parts.append(textwrap.fill(method, width=110))
    if report.graph_breaks:
        parts.append(_graph_breaks(report))
    return "\n\n".join(parts)


def _graph_breaks(report: ModelReport) -> str:
    """Dynamo's graph breaks, and what code ran outside every graph (so mst never saw it)."""
    outside = len(report.code_outside)
    summary = f"Dynamo graph breaks: {len(report.graph_breaks)}"
    if outside:
        summary += (
            f", {outside} where code ran outside every graph: any MLP, LM head or attention mask in that code "
            "was not seen, so it is not rewritten and not in the estimate."
        )
    rows = [[b.where, b.cause, b.reason, "yes" if b.outside else "no", str(b.count)] for b in report.graph_breaks]
    table = tabulate(rows, headers=BREAK_COLUMNS, tablefmt="github", disable_numparse=True)
    return textwrap.fill(summary, width=110) + "\n\n" + table


def _heading(report: ModelReport) -> str:
    lines = [f"mst-inspect: {report.target}"] if report.target else []
    if report.options is not None:
        lines.append("options: " + ", ".join(f"{k}={v}" for k, v in report.options.items() if k != "compiler"))
    return "\n".join(lines)


def _graph_name(graph: InspectedGraph, index: int) -> str:
    return graph.report.compile_id or f"#{index}"


def _site_row(graph: InspectedGraph, site: SiteReport, with_graph: bool) -> list[str]:
    largest = site.largest_intermediate_bytes or (None, None)
    shape = f"{site.tokens} x {site.in_width} -> {site.amplified_width}" if site.has_shapes else "-"
    if site.kind == "attention" and site.has_shapes:
        shape = f"mask {site.tokens} x {site.amplified_width}, {site.calls} calls"
        shape += f": {site.mask}" if site.mask else ""
    if site.kind == "moe experts" and site.has_shapes:
        shape = f"{site.tokens} x {site.in_width} -> {site.amplified_width} ({site.experts} experts, top-{site.top_k})"
    kind = f"{site.kind} (checkpointed)" if site.checkpointed else site.kind
    kind = f"{kind} (loss outside)" if site.loss_outside and site.rewritten else kind
    if site.token_outputs:
        kind = f"{kind}: {', '.join(site.token_outputs)}"
    row = [
        site.location, kind, shape, _chunking(site),
        human_bytes(largest[0]), human_bytes(largest[1]), _budget(site), "" if site.rewritten else (site.reason or "?"),
    ]  # fmt: skip
    return ([graph.report.compile_id or "-"] if with_graph else []) + row


def _budget(site: SiteReport) -> str:
    """The budget's decision at the traced length, and the budget it was made against."""
    if site.decision is None:
        return "-"
    return site.decision if site.budget is None else f"{site.decision}; of {human_bytes(site.budget)}"


def _chunking(site: SiteReport) -> str:
    """M x C at the traced length: how many chunks, of how many tokens at most."""
    if not site.rewritten:
        return "-"
    if site.kind == "attention" and not site.chunks:
        return "is_causal"
    return f"{site.chunks} x {site.chunk_rows}" if site.chunk_rows is not None else str(site.chunks)


def _total_rows(report: ModelReport) -> list[list[str]]:
    counted = report.counted_graphs
    rows = []
    for index, graph in enumerate(report.graphs):
        name = _graph_name(graph, index)
        if not any(graph is c for c in counted):
            name += " (recompiled later: not in the total)"
        elif graph.report.runs > 1:
            name += f" (one graph for {graph.report.runs} blocks: counted {graph.report.runs} times in the total)"
        rows.append(_total_row(name, graph.report.sites, graph.estimate))
    rows.append(_total_row("all graphs" if len(report.graphs) > 1 else "total", report.counted_sites, report.estimate))
    return rows


def _total_row(name: str, sites: list[SiteReport], estimate) -> list[str]:
    rewritten = sum(s.rewritten for s in sites)
    return [name, str(len(sites)), str(rewritten), human_bytes(estimate.before), human_bytes(estimate.after),
            human_bytes(estimate.saving)]  # fmt: skip


def to_json(report: ModelReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def graph_code(report: ModelReport, which: str) -> str:
    """The readable code of every graph, `which` = "before" or "after" the rewrite."""
    if which not in ("before", "after"):
        raise ValueError(f"which must be 'before' or 'after', got {which!r}")
    parts = []
    for index, graph in enumerate(report.graphs):
        code = graph.code_before if which == "before" else graph.code_after
        text = code if code is not None else "# (code not recorded: only explain() keeps it)\n"
        parts.append(f"# graph {_graph_name(graph, index)}, {which} the rewrite\n{text.strip()}\n")
    return "\n".join(parts)
