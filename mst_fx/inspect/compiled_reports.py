"""The reports of the graphs this process compiled with mst: the backend records each one here,
and `last_report()` reads them back as a `ModelReport` (see `model_report.py` for what it counts)."""

from __future__ import annotations

from mst_fx.passes.report import GraphReport

from .model_report import InspectedGraph, ModelReport

_KEPT_REPORTS = 64
_recent_reports: list[GraphReport] = []


def record_report(report: GraphReport) -> None:
    """Called by the backend once per graph it compiles."""
    _recent_reports.append(report)
    del _recent_reports[:-_KEPT_REPORTS]


def compiled_reports() -> list[GraphReport]:
    """Reports of the graphs this process compiled with mst, oldest first (the last 64)."""
    return list(_recent_reports)


def clear_reports() -> None:
    _recent_reports.clear()


def last_report() -> ModelReport:
    """What the `mst` backend compiled since the last `mst_fx.clear_reports()`."""
    graphs = [InspectedGraph(r) for r in compiled_reports()]
    return ModelReport(graphs, None, "graphs compiled with backend='mst'")
