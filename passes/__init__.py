"""The graph rewrites, one file each; `manager.run_passes` applies them in its stated order, and
`manager.rewrite` runs them on a copy of a graph, leaving the graph as it is if one fails.

The passes import the runtime (`mst_fx.runtime`: the sites they build), their own modules and,
where the LM-head pass decides by estimate, `mst_fx.inspect.memory_estimate` (imported there, as
it imports this package). They read the backend's options through `PassOptions`; they never
import the backend.
"""

from .manager import PassOptions, rewrite, run_passes
from .report import GraphReport, SiteReport

__all__ = ["GraphReport", "PassOptions", "SiteReport", "rewrite", "run_passes"]
