"""The reports of the graphs this process compiled with mst: the backend records each one here,
and `last_report()` reads them back as a `ModelReport` (see `model_report.py` for what it counts),
with the graph breaks Dynamo met meanwhile (`mst_fx.tracing.graph_breaks`: in this process, for any
backend, since the last `clear_reports()`)."""

from __future__ import annotations

from torch import fx

from mst_fx.passes.report import GraphReport
from mst_fx.tracing.graph_breaks import GraphBreakMonitor

from .model_report import InspectedGraph, ModelReport

_KEPT_REPORTS = 64
_recent_reports: list[GraphReport] = []
_graph_breaks = GraphBreakMonitor()


def record_graph(gm: fx.GraphModule) -> None:
    """Called by the backend with each graph Dynamo hands it, before the passes: what code ran in a
    graph, and which graph breaks Dynamo met before it (logged as they are decided)."""
    _graph_breaks.graph_compiled(gm)


def record_report(report: GraphReport) -> None:
    """Called by the backend once per graph it compiles."""
    _recent_reports.append(report)
    del _recent_reports[:-_KEPT_REPORTS]


def compiled_reports() -> list[GraphReport]:
    """Reports of the graphs this process compiled with mst, oldest first (the last 64)."""
    return list(_recent_reports)


def clear_reports() -> None:
    global _graph_breaks
    _recent_reports.clear()
    _graph_breaks = GraphBreakMonitor()


def last_report() -> ModelReport:
    """What the `mst` backend compiled since the last `mst_fx.clear_reports()`."""
    graphs = [InspectedGraph(r) for r in compiled_reports()]
    return ModelReport(graphs, None, "graphs compiled with backend='mst'", _graph_breaks.breaks())
