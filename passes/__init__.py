"""The graph rewrites, one file each; `manager.run_passes` applies them in its stated order."""

from .manager import run_passes
from .report import GraphReport, SiteReport

__all__ = ["GraphReport", "SiteReport", "run_passes"]
